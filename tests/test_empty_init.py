"""Models built empty (trainer.init_module(empty_init=True), configure_model): each rank
allocates only its share, initialized after sharding, never a full copy."""

import math

import pytest
import torch
from torch import nn

from lightning_parallel import materialize, parity
from lightning_parallel.layout import LayoutError
from tests.harness import REPO, reference, run
from tests.models import GPT_PLAN, LARGE_GPT, ScaledGPT

GPT_SPEC = dict(model="tests.models:tiny_gpt", model_kwargs=dict(d_model=64, n_layers=4),
                data="tests.models:token_data", batch_size=8, val_batch_size=8, max_steps=2)
THREE_D = dict(pipeline_parallel=2, tensor_parallel=2, data_parallel=2, tensor_plan=GPT_PLAN)
MB = 2**20


def _large_run(model: str, build: str) -> dict:
    return run(dict(model=model, data="tests.models:token_data",
                    data_kwargs=dict(n_train=16, n_val=8, seq_len=LARGE_GPT["seq_len"], vocab=LARGE_GPT["vocab_size"]),
                    batch_size=8, val_batch_size=8, max_steps=2, devices=8, build=build, record_params=False,
                    strategy={**THREE_D, "sharding": "full", "reshard_per_micro_batch": True},
                    trainer=dict(num_sanity_val_steps=1)))


@pytest.mark.parametrize("model, build", [
    pytest.param("tests.models:large_gpt", "empty", id="init_module_empty"),
    pytest.param("tests.models:large_configured_gpt", "init", id="configure_model", marks=pytest.mark.slow),
])
def test_a_model_no_rank_can_hold_trains_with_each_rank_allocating_its_share(model, build, monkeypatch):
    # glibc's allocator keeps freed blocks of up to 32 MB in its heap: resident memory would
    # count what a step freed as held. A fixed threshold returns them, so RSS tracks live memory.
    monkeypatch.setenv("MALLOC_MMAP_THRESHOLD_", str(128 * 1024))
    record = _large_run(model, build)
    assert all(math.isfinite(loss) for loss in record["losses"]) and len(record["losses"]) == 2
    total = record["summary_total_params"]
    assert 95e6 < total < 100e6
    fp32_bytes = 4 * total
    # Each rank holds about an eighth of the weights (stages differ by a few percent).
    assert all(held < 0.16 * total for held in record["elements_held"]), record["elements_held"]
    setup = [(peak - start) / MB for peak, start in zip(record["setup_peak_rss"], record["rss_after_imports"])]
    print(f"peak resident memory above imports per rank by the first step (MB): {[round(g) for g in setup]}")
    # Its share (1/8) and a working set: never a full copy. The peak is VmHWM: getrusage's
    # ru_maxrss survives exec, so rank 0 (forked from pytest) reported pytest's size (up to 215 MB).
    assert max(setup) < 0.5 * fp32_bytes / MB, setup
    grown = [(peak - start) / MB for peak, start in zip(record["peak_rss"], record["rss_after_imports"])]
    print(f"peak resident memory above imports per rank (MB): {[round(g) for g in grown]}; model {fp32_bytes / MB:.0f} MB")
    assert max(grown) < fp32_bytes / MB, grown


def _ranks(record):
    # Coordinates on the (pp, dp_replicate, dp_shard, tp) mesh; a dp rank is its (replica, shard).
    return [(dict(pp=pp, dp=(replica, shard), tp=tp), tensors) for (pp, replica, shard, tp), tensors in record["init_ranks"]]


@pytest.fixture(scope="module")
def one_process_init():
    return reference({**GPT_SPEC, "callbacks": ["tests.probes:InitRecord"]})["init_full"]


@pytest.mark.parametrize("sharding", [pytest.param("none", marks=pytest.mark.slow), "full"])
def test_initialization_after_sharding_has_one_process_statistics_equal_replicas_and_distinct_shards(
        sharding, one_process_init):
    record = run({**GPT_SPEC, "devices": 8, "build": "empty", "callbacks": ["tests.probes:InitRecord"],
                  "strategy": {**THREE_D, "sharding": sharding}})
    full = record["init_full"]
    assert full.keys() == one_process_init.keys()
    for name, expected in one_process_init.items():
        got = full[name]
        assert not got.isnan().any(), name
        if expected.numel() >= 1024:  # enough samples for the statistics to be sharp
            assert float(got.std()) == pytest.approx(float(expected.std()), rel=0.05), name
            assert abs(got.mean() - expected.mean()) < 4 * expected.std() / math.sqrt(expected.numel()) + 1e-6, name
        elif expected.std() == 0:  # a constant init (norm weights, zero biases)
            assert torch.equal(got, expected), name

    ranks = _ranks(record)
    for a, tensors_a in ranks:
        for b, tensors_b in ranks:
            if a["pp"] != b["pp"] or a == b:
                continue
            for name, (sum_a, kind) in tensors_a.items():
                same_tp = a["tp"] == b["tp"]
                if a["dp"] != b["dp"] and same_tp and sharding == "none":
                    assert sum_a == tensors_b[name][0], f"dp replicas differ: {name}"
                if not same_tp and a["dp"] == b["dp"] and sharding == "none":
                    if kind == "replicate":
                        assert sum_a == tensors_b[name][0], f"tp replicas differ: {name}"
                    elif full[name].std() > 0:
                        assert sum_a != tensors_b[name][0], f"tp shards equal: {name}"
    # Different pipeline stages and FSDP shards draw independently too.
    assert not torch.equal(full["blocks.0.mlp.fc1.weight"], full["blocks.3.mlp.fc1.weight"])
    rows = full["tok_emb.weight"].shape[0] // 2
    assert not torch.equal(full["tok_emb.weight"][:rows], full["tok_emb.weight"][rows:])


def test_a_module_that_cannot_initialize_itself_is_refused_naming_it():
    with torch.device("meta"):
        model = ScaledGPT(vocab_size=64, seq_len=16, d_model=32, n_heads=4, n_layers=2)
    with pytest.raises(LayoutError, match=r"ScaledGPT \(ScaledGPT: logit_scale\)"):
        materialize.check_initializable(model)
    materialize.check_initializable(model, loaded={"logit_scale"})  # a checkpoint that provides it will do


def test_the_refusal_reaches_every_rank_of_a_run(tmp_path):
    spec = {**GPT_SPEC, "model": "tests.models:scaled_gpt", "model_kwargs": {}, "devices": 2, "build": "empty",
            "strategy": {"data_parallel": 2}}
    proc = parity.run_processes(spec, tmp_path / "record.pt", [str(REPO)], timeout=120)
    assert proc.returncode != 0
    for rank in (0, 1):
        assert f"[rank{rank}]: lightning_parallel.layout.LayoutError: ScaledGPT was built empty" in proc.stderr


class _MaskedMixer(nn.Module):
    """Its reset_parameters forgets the mask buffer it computed in __init__."""

    def __init__(self):
        super().__init__()
        self.proj = nn.Linear(4, 4)
        self.register_buffer("mask", torch.tril(torch.ones(4, 4)))
        self.weight = nn.Parameter(torch.empty(4))
        self.reset_parameters()

    def reset_parameters(self):
        nn.init.ones_(self.weight)


def test_a_tensor_no_init_sets_is_found():
    with torch.device("meta"):
        model = _MaskedMixer()
    materialize.materialize(model, [model], None, torch.device("cpu"))
    materialize.run_inits(model)
    assert materialize.uninitialized(model) == ["mask (_MaskedMixer)"]
    with pytest.raises(LayoutError, match=r"mask \(_MaskedMixer\) not initialized"):
        materialize.refuse_uninitialized(materialize.uninitialized(model))


def test_loading_weights_inside_configure_model_is_refused():
    weights = {"weight": torch.ones(2, 2), "bias": torch.zeros(2)}
    with pytest.raises(LayoutError, match="init_from"):
        with materialize.empty_init():
            nn.Linear(2, 2).load_state_dict(weights)


def test_tied_weights_stay_tied_when_materialized():
    with torch.device("meta"):
        model = nn.Sequential(nn.Embedding(8, 4), nn.Linear(4, 8, bias=False))
        model[1].weight = model[0].weight
    materialize.materialize(model, [model], None, torch.device("cpu"))
    assert model[1].weight is model[0].weight and not model[0].weight.is_meta


def test_a_metric_built_empty_is_refused():
    from tests.models import ResidualMLP

    with torch.device("meta"):
        model = ResidualMLP()
    with pytest.raises(LayoutError, match=r"The metric\(s\) val_mse were built empty"):
        materialize.check_initializable(model)
