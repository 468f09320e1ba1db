"""PipelineTimeline: every action of the recorded step, in the schedule's order, as a trace and a PNG."""

import json
import sys
import warnings

import lightning.pytorch as pl
import pytest
import torch.distributed as dist

from lightning_parallel.timeline import (
    PipelineTimeline,
    busy_seconds,
    bubble_fraction,
    ideal_bubble,
    trace_events,
    write_outputs,
)
from tests.harness import run

P, M = 2, 4


def spec_for(schedule: str, output_dir) -> dict:
    return dict(
        model="tests.models:tiny_gpt", model_kwargs={"n_layers": 4}, data="tests.models:token_data",
        batch_size=8, max_steps=3, devices=P, record_params=False,
        strategy={"pipeline_parallel": P, "micro_batches": M, "schedule": schedule},
        callbacks=[["lightning_parallel.timeline:PipelineTimeline", {"output_dir": str(output_dir), "steps": [1]}],
                   "tests.test_timeline:ScheduleOrder"],
    )


class ScheduleOrder(pl.Callback):
    """Every rank's lowered action order as torch's multi-stage runtime executes it
    (`pipeline_order_with_comms`), gathered; None for the single-stage schedules, which have none."""

    def __init__(self):
        self.record = {}

    def on_train_end(self, trainer, pl_module):
        runner = trainer.strategy._pipeline
        schedule = next(s for key, s in runner._schedules.items() if key[0] == "train")
        lowered = getattr(schedule, "pipeline_order_with_comms", None)
        order = None
        if lowered is not None:
            order = [(a.computation_type.value, a.stage_index, a.microbatch_index)
                     for action in lowered[dist.get_rank(runner.pp_group)]
                     for a in (action.sub_actions or (action,))
                     if a.computation_type.value in ("F", "B", "I", "W", "SEND_F", "RECV_F", "SEND_B", "RECV_B")]
        orders = [None] * dist.get_world_size()
        dist.all_gather_object(orders, order)
        self.record = {"torch_order": orders}


def one_f_one_b_order(stage: int, stages: int, micro_batches: int) -> list[tuple]:
    """The actions torch's Schedule1F1B runs on `stage`, sends and receives where they are
    posted: a warm-up of forwards, then backward-forward pairs whose sends go out with the
    next receive, then the remaining backwards."""
    first, last = stage == 0, stage == stages - 1
    recv_f = lambda mb: [] if first else [("RECV_F", stage, mb)]  # noqa: E731
    send_f = lambda mb: [] if last else [("SEND_F", stage, mb)]  # noqa: E731
    recv_b = lambda mb: [] if last else [("RECV_B", stage, mb)]  # noqa: E731
    send_b = lambda mb: [] if first else [("SEND_B", stage, mb)]  # noqa: E731
    order, held = [], []
    warmup = min(micro_batches, stages - stage)
    fwd = bwd = 0
    for _ in range(warmup):
        order += recv_f(fwd) + [("F", stage, fwd)]
        held = send_f(fwd)
        if fwd != warmup - 1:
            order, held = order + held, []
        fwd += 1
    while True:
        order += held + recv_b(bwd) + [("B", stage, bwd)]
        held = send_b(bwd)
        bwd += 1
        if fwd == micro_batches:
            break
        order += held + recv_f(fwd) + [("F", stage, fwd)]
        held = send_f(fwd)
        fwd += 1
    order += held
    for mb in range(bwd, micro_batches):
        order += recv_b(mb) + [("B", stage, mb)] + send_b(mb)
    return order


def name_of(action: tuple) -> str:
    return f"{action[0]} s{action[1]} mb{action[2]}"


def trace_order(trace: dict, pid: int) -> list[str]:
    """The schedule's actions of one rank in the trace, in the order they began (loss and the step slice left out)."""
    events = [e for e in trace["traceEvents"] if e["ph"] == "X" and e["pid"] == pid and e["cat"] not in ("loss", "step")]
    return [e["name"] for e in sorted(events, key=lambda e: e["ts"])]


def assert_slices_nest(trace: dict) -> None:
    """On each thread, slices nest or follow one another, as trace viewers require."""
    threads = {}
    for event in trace["traceEvents"]:
        if event["ph"] == "X":
            threads.setdefault((event["pid"], event["tid"]), []).append(event)
    for events in threads.values():
        open_ends = []
        for event in sorted(events, key=lambda e: (e["ts"], -e["dur"])):
            while open_ends and open_ends[-1] <= event["ts"]:
                open_ends.pop()
            assert not open_ends or event["ts"] + event["dur"] <= open_ends[-1] + 1e-3, event
            open_ends.append(event["ts"] + event["dur"])


def check_outputs(record: dict, output_dir) -> dict:
    png = (output_dir / "timeline.png").read_bytes()
    assert png.startswith(b"\x89PNG\r\n\x1a\n") and len(png) > 10_000
    trace = json.loads((output_dir / "timeline.json").read_text())
    names = {e["pid"]: e["args"]["name"] for e in trace["traceEvents"] if e["ph"] == "M" and e["name"] == "process_name"}
    assert names == {0: "rank 0 (pipeline rank 0)", 1: "rank 1 (pipeline rank 1)"}  # one row per rank
    for event in trace["traceEvents"]:
        if event["ph"] == "X":
            assert event["dur"] >= 0 and event["ts"] >= 0
            if event["cat"] not in ("step", "send", "recv"):
                assert event["tid"] == 0 and {"stage", "micro_batch", "kind"} <= set(event["args"])
    assert_slices_nest(trace)
    # Recorded actions and trace agree; the bubble is measured, between none and all of the step.
    for rank, actions in enumerate(record["timeline_actions"]):
        assert [name_of((a["action"], a["stage"], a["micro_batch"])) for a in actions if a["kind"] != "loss"] \
            == trace_order(trace, rank)
        assert all(a["end"] >= a["start"] >= 0 and a["step"] == 1 for a in actions)
    assert 0 < record["timeline_bubble"] < 1
    assert record["timeline_info"]["ideal_bubble"] == pytest.approx(ideal_bubble(P, M))
    return trace


def test_one_f_one_b_timeline(tmp_path):
    record = run(spec_for("1f1b", tmp_path))
    trace = check_outputs(record, tmp_path)
    for rank in range(P):
        expected = [name_of(a) for a in one_f_one_b_order(rank, P, M)]
        assert trace_order(trace, rank) == expected
    # Each stage's forward and backward of every micro-batch, each activation and gradient crossing once.
    recorded = {(a["action"], a["stage"], a["micro_batch"]) for actions in record["timeline_actions"] for a in actions}
    for mb in range(M):
        assert {("F", 0, mb), ("B", 0, mb), ("F", 1, mb), ("B", 1, mb), ("loss", 1, mb)} <= recorded
        assert {("SEND_F", 0, mb), ("RECV_F", 1, mb), ("SEND_B", 1, mb), ("RECV_B", 0, mb)} <= recorded


def test_split_backward_timeline_follows_torchs_order(tmp_path):
    record = run(spec_for("zbv", tmp_path))
    trace = check_outputs(record, tmp_path)
    for rank in range(P):
        assert trace_order(trace, rank) == [name_of(a) for a in record["torch_order"][rank]]
    kinds = {(a["kind"], a["stage"], a["micro_batch"]) for actions in record["timeline_actions"] for a in actions}
    for stage in range(2 * P):  # zbv: rank r holds stages r and 2P-1-r
        for mb in range(M):
            assert {("F", stage, mb), ("I", stage, mb), ("W", stage, mb)} <= kinds
    assert not any(kind == "B" for kind, _, _ in kinds)


# ---------------------------------------------------------------------- without processes


def test_bubble_arithmetic():
    assert ideal_bubble(2, 4) == pytest.approx(0.2)
    assert ideal_bubble(4, 8) == pytest.approx(3 / 11)
    assert busy_seconds([(0, 2), (1, 3), (5, 6), (5.5, 5.7)]) == pytest.approx(4)
    actions = [{"kind": "F", "start": 0.0, "end": 1.0}, {"kind": "recv", "start": 0.0, "end": 4.0},
               {"kind": "W", "start": 2.0, "end": 3.0}]
    assert bubble_fraction(actions, 0.0, 4.0) == pytest.approx(0.5)  # sends and receives are not busy


def _synthetic():
    def action(kind, label, start, end, **extra):
        return {"kind": kind, "action": label, "stage": 0, "micro_batch": 0, "start": start, "end": end, "step": 1,
                **extra}

    actions = [[action("F", "F", 0.001, 0.002), action("send", "SEND_F", 0.002, 0.009, wait=0.001, waits=[[0.008, 0.009]]),
                action("send", "SEND_F", 0.003, 0.009, wait=0.0, waits=[]), action("B", "B", 0.005, 0.006)]]
    info = {"schedule": "Schedule1F1B", "pipeline_parallel": 1, "micro_batches": 1, "steps": [1], "pp_ranks": [0],
            "bubble_fraction": 0.8, "bubble_fractions": [0.8], "ideal_bubble": 0.0}
    return actions, [[(0.0, 0.01)]], info


def test_overlapping_sends_get_threads_of_their_own():
    events = trace_events(*_synthetic())
    assert_slices_nest({"traceEvents": events})
    sends = [e for e in events if e["ph"] == "X" and e["cat"] == "send"]
    assert len({e["tid"] for e in sends}) == 2 and 0 not in {e["tid"] for e in sends}
    threads = {e["tid"]: e["args"]["name"] for e in events if e["name"] == "thread_name"}
    assert threads == {0: "compute", 1: "send", 2: "send 2"}


def test_without_matplotlib_the_trace_is_written_and_the_png_missing_is_explained(tmp_path, monkeypatch):
    for name in ("matplotlib", "matplotlib.backends.backend_agg", "matplotlib.figure", "matplotlib.patches"):
        monkeypatch.setitem(sys.modules, name, None)  # importing it raises ImportError
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        written = write_outputs(tmp_path, *_synthetic())
    assert written == [tmp_path / "timeline.json"]
    assert not (tmp_path / "timeline.png").exists()
    assert any("pip install matplotlib" in str(w.message) for w in caught)


def test_without_pipeline_parallelism_it_records_nothing_and_says_so():
    class Trainer:
        strategy = object()  # not HybridParallel

    timeline = PipelineTimeline()
    with pytest.warns(UserWarning, match="no pipeline parallelism"):
        timeline.on_train_start(Trainer(), None)
    timeline.on_train_batch_start(Trainer(), None, None, 0)
    timeline.on_train_batch_start(Trainer(), None, None, 1)  # the step it would record
    assert timeline.actions is None and timeline.bubble_fraction is None


def test_steps_must_name_batches():
    with pytest.raises(ValueError, match="steps"):
        PipelineTimeline(steps=[])
