"""Throughput: samples/s, tokens/s and peak memory logged at the logging steps, over the global batch."""

import lightning.pytorch as pl
import pytest
import torch

from lightning_parallel.throughput import Throughput, batch_counts, compute_dtype, data_parallel_degree
from tests.harness import run

SEQ_LEN, BATCH = 16, 8
KEYS = {"throughput/samples_per_sec", "throughput/tokens_per_sec", "throughput/peak_memory_gib"}


class LoggedMetrics(pl.Callback):
    """The trainer's callback_metrics after each training batch (what the progress bar and loggers see)."""

    def __init__(self):
        self.record = {"callback_metrics": []}

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.record["callback_metrics"].append({k: float(v) for k, v in trainer.callback_metrics.items()})


def spec_for(strategy: dict, callbacks: list, max_steps: int) -> dict:
    return dict(model="tests.models:tiny_gpt", model_kwargs={"n_layers": 4}, data="tests.models:token_data",
                data_kwargs={"seq_len": SEQ_LEN}, batch_size=BATCH, max_steps=max_steps, devices=2,
                record_params=False, strategy=strategy, callbacks=[*callbacks, "tests.test_throughput:LoggedMetrics"])


def check_entry(entry: dict, samples: int) -> None:
    assert entry["samples"] == samples and entry["tokens"] == samples * SEQ_LEN
    assert entry["throughput/samples_per_sec"] == pytest.approx(samples / entry["seconds"])
    assert entry["throughput/tokens_per_sec"] == pytest.approx(entry["throughput/samples_per_sec"] * SEQ_LEN)
    assert entry["throughput/samples_per_sec"] > 0 and 0.05 < entry["throughput/peak_memory_gib"] < 64
    assert "throughput/mfu" not in entry  # no peak FLOPs known for a CPU


def test_pipeline_run_logs_throughput_every_step_and_the_bubble(tmp_path):
    timeline = ["lightning_parallel.timeline:PipelineTimeline", {"output_dir": str(tmp_path), "steps": [1]}]
    record = run(spec_for({"pipeline_parallel": 2, "micro_batches": 4, "schedule": "1f1b"},
                          [timeline, ["lightning_parallel.throughput:Throughput", {"log_every_n_steps": 1}]], 3))
    entries = record["throughput"]
    assert [e["step"] for e in entries] == [1, 2, 3]
    for entry in entries:
        check_entry(entry, BATCH)  # pp ranks read the same batch: dp = 1
    # The timeline's bubble once it has one (after step 2, the recorded second step).
    assert "throughput/pipeline_bubble" not in entries[0]
    assert entries[1]["throughput/pipeline_bubble"] == entries[2]["throughput/pipeline_bubble"] == record["timeline_bubble"]
    for logged, entry in zip(record["callback_metrics"], entries):
        assert KEYS <= set(logged)
        assert logged["throughput/samples_per_sec"] == pytest.approx(entry["throughput/samples_per_sec"], rel=1e-6)


def test_data_parallel_run_counts_the_global_batch_at_the_logging_steps():
    record = run(spec_for({"data_parallel": 2}, [["lightning_parallel.throughput:Throughput", {"log_every_n_steps": 2}]], 4))
    entries = record["throughput"]
    assert [e["step"] for e in entries] == [2, 4]
    for entry in entries:
        check_entry(entry, 2 * BATCH)  # two steps of the global batch (4 samples on each of 2 ranks)
    assert KEYS <= set(record["callback_metrics"][1]) and not KEYS & set(record["callback_metrics"][0])


# ---------------------------------------------------------------------- without processes


def test_batch_counts():
    ids = torch.zeros(4, 16, dtype=torch.long)
    assert batch_counts((ids, ids)) == (4, 64)
    assert batch_counts({"input_ids": ids, "labels": ids}) == (4, 64)
    assert batch_counts([torch.zeros(4, 16), ids]) == (4, None)  # first tensor not token ids
    assert batch_counts(torch.zeros(4, 3, 8, 8)) == (4, None)
    assert batch_counts({"x": [torch.zeros(5, 2, dtype=torch.int32)]}) == (5, 10)


def test_data_parallel_degree_and_dtype():
    class Other:
        world_size = 8

    assert data_parallel_degree(Other()) == 8
    assert compute_dtype("bf16-mixed") is torch.bfloat16 and compute_dtype("16-mixed") is torch.float16
    assert compute_dtype("32-true") is torch.float32


def test_rejects_a_bad_cadence():
    with pytest.raises(ValueError, match="log_every_n_steps"):
        Throughput(log_every_n_steps=0)
