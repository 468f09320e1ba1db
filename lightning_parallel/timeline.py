"""PipelineTimeline: what every rank's pipeline schedule did during chosen training steps, drawn.

An opt-in Lightning callback for runs with pipeline_parallel > 1. On the recorded steps it
times, on every rank, each action the schedule executes: forward (F), full backward (B),
backward-input (I) and backward-weight (W) per stage and micro-batch, the last stage's loss
(the user's training_step run on the stage output), and the sends and receives of activations
and gradients. After the last recorded step the records are gathered to rank 0, which writes
`timeline.json` (Chrome trace format: open it in https://ui.perfetto.dev or chrome://tracing)
and `timeline.png` (needs matplotlib: `pip install matplotlib`), and every rank gets
`actions`, `bubble_fractions` and `bubble_fraction`.

How actions are seen (public torch 2.13 names only):
- Compute: while the schedule's `step()` runs, `PipelineStage.forward_one_chunk`,
  `backward_one_chunk` (full_backward=True: B, False: I) and `backward_weight_one_chunk` (W)
  are wrapped; the wrappers are removed when the step returns, whatever happens.
- Sends and receives: the wrapped `get_{fwd,bwd}_{send,recv}_ops` hand the schedule their
  `P2POp`s with each tensor swapped for a view of a tensor subclass. `dist.isend` and
  `dist.irecv` dispatch on it through `__torch_function__`, which posts the real operation on
  the original tensor and returns the request with a timed `wait()`. A send or receive lasts
  from its post to the end of the schedule's wait on it; how long the rank was blocked in that
  wait is kept too. (Where torch posts a batch as one coalesced NCCL group, its waits are not
  seen: a receive then ends when the compute that uses it starts, a send when it was posted.)

Times: on CPU `time.perf_counter()`; on CUDA `torch.cuda.Event(enable_timing=True)` pairs,
read only after the step (no host sync inside it). Before each recorded step the ranks meet at a
barrier, which is time zero of that step on every rank; steps are placed at rank 0's distance
from the first recorded one. The bubble of a rank in a step is 1 - busy / wall, where wall is
the schedule's step() and busy the union of its compute (F, B, I, W and loss).
"""

from __future__ import annotations

import inspect
import json
import time
from pathlib import Path
from typing import Any, Iterable, Sequence

import lightning.pytorch as pl
import torch
import torch.distributed as dist
from lightning.pytorch.utilities import rank_zero_warn
from torch.distributed.pipelining import PipelineStage

COMPUTE_KINDS = ("F", "B", "I", "W", "loss")
COMM_KINDS = ("send", "recv")
COLORS = {"F": "#4C72B0", "B": "#DD8452", "I": "#C44E52", "W": "#55A868", "loss": "#9A9A9A",
          "send": "#8172B3", "recv": "#2A9D8F"}
OPS_METHODS = {"get_fwd_send_ops": "SEND_F", "get_fwd_recv_ops": "RECV_F",
               "get_bwd_send_ops": "SEND_B", "get_bwd_recv_ops": "RECV_B"}
BACKWARD_SIGNATURE = inspect.signature(PipelineStage.backward_one_chunk)


def ideal_bubble(pipeline_parallel: int, micro_batches: int) -> float:
    """The bubble fraction of a 1F1B or GPipe step with equal stages and free communication."""
    return (pipeline_parallel - 1) / (micro_batches + pipeline_parallel - 1)


def busy_seconds(intervals: Iterable[tuple[float, float]]) -> float:
    """Length of the union of (start, end) intervals."""
    total, reach = 0.0, float("-inf")
    for start, end in sorted(intervals):
        if end > reach:
            total += end - max(start, reach)
            reach = end
    return total


def bubble_fraction(actions: list[dict], start: float, end: float) -> float:
    """1 - busy / wall for one rank's actions within one step's [start, end]."""
    busy = busy_seconds((a["start"], a["end"]) for a in actions if a["kind"] in COMPUTE_KINDS)
    return 1.0 - busy / (end - start) if end > start else 0.0


# ------------------------------------------------------------------------ clocks


class _HostClock:
    def mark(self) -> float:
        return time.perf_counter()

    def seconds(self, mark: float, zero: float) -> float:
        return mark - zero

    def settle(self) -> None:
        pass


class _CudaClock:
    """Marks are events on the current stream; read once the step is over."""

    def mark(self):
        event = torch.cuda.Event(enable_timing=True)
        event.record()
        return event

    def seconds(self, mark, zero) -> float:
        return zero.elapsed_time(mark) / 1e3

    def settle(self) -> None:
        torch.cuda.synchronize()


# ------------------------------------------------------------------------ recording


class _Action:
    """One action as it is recorded: clock marks, turned into seconds after the step."""

    def __init__(self, kind: str, label: str, stage: int, micro_batch: int, start=None):
        self.kind, self.label, self.stage, self.micro_batch = kind, label, stage, micro_batch
        self.start, self.end = start, None
        self.posts: list[tuple] = []  # sends and receives: (start, end) of each operation's post
        self.waits: list[tuple] = []  # and of each wait on it
        self.unwaited = 0  # operations whose wait was not seen

    def resolve(self, clock, zero, consumer_start: float | None) -> dict | None:
        def sec(mark):
            return clock.seconds(mark, zero)

        if self.kind in COMM_KINDS:
            if not self.posts:
                return None
            start = min(sec(s) for s, _ in self.posts)
            ends = [sec(e) for _, e in self.posts + self.waits]
            if self.unwaited and self.kind == "recv" and consumer_start is not None:
                ends.append(consumer_start)
            waits = [[sec(s), sec(e)] for s, e in self.waits]
            extra = {"waits": waits, "wait": sum(e - s for s, e in waits)}
            return self._as_dict(start, max(ends), extra)
        return self._as_dict(sec(self.start), sec(self.end), {})

    def _as_dict(self, start: float, end: float, extra: dict) -> dict:
        return {"kind": self.kind, "action": self.label, "stage": self.stage, "micro_batch": self.micro_batch,
                "start": start, "end": end, **extra}


class _TimedWork:
    """A posted send or receive whose wait() is timed; anything else goes to the request."""

    def __init__(self, work, action: _Action, clock):
        self.work, self.action, self.clock = work, action, clock
        action.unwaited += 1

    def wait(self, *args, **kwargs):
        start = self.clock.mark()
        result = self.work.wait(*args, **kwargs)
        self.action.waits.append((start, self.clock.mark()))
        self.action.unwaited -= 1
        return result

    def __getattr__(self, name):
        return getattr(self.work, name)


class _TaggedTensor(torch.Tensor):
    """Carries a P2POp's tensor to dist.isend/irecv, which dispatch on it: the real operation
    runs on the original tensor and its request comes back timed."""

    @classmethod
    def __torch_function__(cls, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is dist.isend or func is dist.irecv:
            original, action, clock = args[0].timeline_tag
            start = clock.mark()
            work = func(original, *args[1:], **kwargs)
            action.posts.append((start, clock.mark()))
            return _TimedWork(work, action, clock) if work is not None else work
        return super().__torch_function__(func, types, args, kwargs)


def _tagged(tensor: torch.Tensor, action: _Action, clock) -> torch.Tensor:
    tagged = tensor.detach().as_subclass(_TaggedTensor)
    tagged.timeline_tag = (tensor, action, clock)
    return tagged


class _StepRecorder:
    """Records one rank's actions during one schedule step."""

    def __init__(self, clock):
        self.clock = clock
        self.actions: list[_Action] = []
        self.step_start = self.step_end = None

    def compute(self, kind: str, stage: int, micro_batch: int, run):
        action = _Action(kind, kind, stage, micro_batch, self.clock.mark())
        try:
            return run()
        finally:
            action.end = self.clock.mark()
            self.actions.append(action)

    def loss(self, run):
        """The user's step on the last stage, right after that stage's forward of the micro-batch.
        (On a schedule's first step, shape inference calls it before any forward: not recorded.)"""
        last = next((a for a in reversed(self.actions) if a.kind in COMPUTE_KINDS), None)
        if last is None or last.kind != "F":
            return run()
        return self.compute("loss", last.stage, last.micro_batch, run)

    def communication(self, label: str, stage: int, micro_batch: int, ops: list) -> list:
        if ops:
            action = _Action("send" if label.startswith("SEND") else "recv", label, stage, micro_batch)
            self.actions.append(action)
            for op in ops:
                op.tensor = _tagged(op.tensor, action, self.clock)
        return ops

    def resolve(self, zero) -> tuple[list[dict], tuple[float, float]]:
        computes = {(a.label, a.stage, a.micro_batch): a for a in self.actions if a.kind in ("F", "B", "I")}
        resolved = []
        for action in self.actions:
            consumer = None
            if action.kind == "recv":
                uses = ("F",) if action.label == "RECV_F" else ("B", "I")
                consumer = next((computes[(u, action.stage, action.micro_batch)] for u in uses
                                 if (u, action.stage, action.micro_batch) in computes), None)
            consumer_start = self.clock.seconds(consumer.start, zero) if consumer else None
            record = action.resolve(self.clock, zero, consumer_start)
            if record is not None:
                resolved.append(record)
        resolved.sort(key=lambda a: a["start"])
        window = (self.clock.seconds(self.step_start, zero), self.clock.seconds(self.step_end, zero))
        return resolved, window


def _stage_wrappers(recorder: _StepRecorder) -> dict[str, Any]:
    """PipelineStage methods that record what they do, by name."""
    originals = {name: getattr(PipelineStage, name) for name in
                 ("forward_one_chunk", "backward_one_chunk", "backward_weight_one_chunk", *OPS_METHODS)}

    def forward_one_chunk(stage, fwd_chunk_id, *args, **kwargs):
        run = lambda: originals["forward_one_chunk"](stage, fwd_chunk_id, *args, **kwargs)  # noqa: E731
        return recorder.compute("F", stage.stage_index, fwd_chunk_id, run)

    def backward_one_chunk(stage, bwd_chunk_id, *args, **kwargs):
        full = BACKWARD_SIGNATURE.bind(stage, bwd_chunk_id, *args, **kwargs).arguments.get("full_backward", True)
        run = lambda: originals["backward_one_chunk"](stage, bwd_chunk_id, *args, **kwargs)  # noqa: E731
        return recorder.compute("B" if full else "I", stage.stage_index, bwd_chunk_id, run)

    def backward_weight_one_chunk(stage, bwd_chunk_id, *args, **kwargs):
        run = lambda: originals["backward_weight_one_chunk"](stage, bwd_chunk_id, *args, **kwargs)  # noqa: E731
        return recorder.compute("W", stage.stage_index, bwd_chunk_id, run)

    def ops_method(name, label):
        def get_ops(stage, chunk_id, *args, **kwargs):
            ops = originals[name](stage, chunk_id, *args, **kwargs)
            return recorder.communication(label, stage.stage_index, chunk_id, ops)

        return get_ops

    wrappers = {"forward_one_chunk": forward_one_chunk, "backward_one_chunk": backward_one_chunk,
                "backward_weight_one_chunk": backward_weight_one_chunk}
    wrappers.update({name: ops_method(name, label) for name, label in OPS_METHODS.items()})
    return wrappers


def _patch(owner, wrappers: dict[str, Any]):
    """Sets attributes on `owner`; returns what puts them back as they were."""
    absent = object()
    saved = {name: vars(owner).get(name, absent) for name in wrappers}
    for name, wrapper in wrappers.items():
        setattr(owner, name, wrapper)

    def undo():
        for name, before in saved.items():
            if before is absent:
                delattr(owner, name)
            else:
                setattr(owner, name, before)

    return undo


def _recording_step(schedule, module, recorder: _StepRecorder):
    """A stand-in for `schedule.step` that records while the real one runs."""
    real_step = schedule.step
    real_training_step = module.training_step

    def step(*args, **kwargs):
        undo_stage = _patch(PipelineStage, _stage_wrappers(recorder))
        # The last stage's loss_fn runs the user's training_step inside the schedule.
        undo_module = _patch(module, {"training_step": lambda *a, **k: recorder.loss(lambda: real_training_step(*a, **k))})
        recorder.step_start = recorder.clock.mark()
        try:
            return real_step(*args, **kwargs)
        finally:
            recorder.step_end = recorder.clock.mark()
            undo_module()
            undo_stage()

    return step


# ------------------------------------------------------------------------ the callback


class PipelineTimeline(pl.Callback):
    """Records the pipeline schedule's actions on every rank during `steps` (indices of this
    fit's training batches, from 0; the default, the second, skips the first step's shape
    inference) and writes `output_dir/timeline.json` and `output_dir/timeline.png` on rank 0.

    After the last recorded step, on every rank:
    - `actions`: per global rank, a list of dicts (kind, action, stage, micro_batch, start, end
      and step; sends and receives also `wait`, the seconds the rank was blocked waiting on
      them), seconds from the first recorded step's start, in the order they began;
    - `bubble_fractions`: per rank, 1 - busy compute / schedule step time (mean over steps);
    - `bubble_fraction`: their mean over ranks; compare with `ideal_bubble(P, M)`.
    """

    def __init__(self, output_dir: str | Path | None = None, steps: Sequence[int] = (1,)):
        super().__init__()
        self.output_dir = Path(output_dir) if output_dir is not None else None
        self.steps = sorted(set(int(s) for s in steps))
        if not self.steps or self.steps[0] < 0:
            raise ValueError(f"steps must name training batches to record (0, 1, ...), got {list(steps)}.")
        self.actions: list[list[dict]] | None = None
        self.bubble_fractions: list[float] | None = None
        self.bubble_fraction: float | None = None
        self.record: dict[str, Any] = {}
        self._reset()

    def _reset(self) -> None:
        self._batch_index = -1
        self._runner = None
        self._clock = None
        self._recorder: _StepRecorder | None = None
        self._undo = None
        self._zero = None
        self._local: list[dict] = []  # one entry per recorded step on this rank
        self._done = False

    # -- hooks

    def on_train_start(self, trainer, pl_module) -> None:
        from lightning_parallel.strategy import HybridParallel

        self._reset()
        runner = trainer.strategy._pipeline if isinstance(trainer.strategy, HybridParallel) else None
        if runner is None:
            rank_zero_warn("PipelineTimeline records pipeline schedules, and this run has no pipeline parallelism "
                           "(HybridParallel with pipeline_parallel > 1): nothing is recorded.")
            self._done = True
            return
        self._runner = runner
        self._clock = _CudaClock() if trainer.strategy.root_device.type == "cuda" else _HostClock()
        if self.output_dir is None:
            self.output_dir = Path(trainer.default_root_dir) / "pipeline_timeline"

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self._batch_index += 1
        if self._done or self._batch_index not in self.steps:
            return
        schedule = self._runner._schedule("train", batch)  # the schedule train_step is about to run
        self._recorder = _StepRecorder(self._clock)
        self._undo = _patch(schedule, {"step": _recording_step(schedule, pl_module, self._recorder)})
        self._clock.settle()
        trainer.strategy.barrier("PipelineTimeline")  # time zero of this step, on every rank
        self._zero = (self._clock.mark(), time.perf_counter())

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if self._recorder is None:
            return
        self._stop_recording()
        if self._batch_index >= self.steps[-1]:
            self._finish(trainer)

    def on_train_end(self, trainer, pl_module) -> None:
        if self._done:
            return
        if self._local:  # training ended before the last step to record
            self._finish(trainer)
        else:
            rank_zero_warn(f"PipelineTimeline recorded nothing: training ended after {self._batch_index + 1} "
                           f"batches, before step(s) {self.steps}.")

    def on_exception(self, trainer, pl_module, exception) -> None:
        if self._undo is not None:
            self._undo()
            self._undo = None
        self._recorder = None

    # -- after the recorded steps

    def _stop_recording(self) -> None:
        self._undo()
        self._undo = None
        self._clock.settle()
        zero_mark, zero_host = self._zero
        if self._recorder.step_start is not None:  # the schedule ran
            actions, window = self._recorder.resolve(zero_mark)
            self._local.append({"step": self._batch_index, "zero": zero_host, "window": window, "actions": actions})
        self._recorder = None

    def _finish(self, trainer) -> None:
        self._done = True
        runner = self._runner
        local = {"rank": dist.get_rank(), "pp_rank": dist.get_rank(runner.pp_group), "steps": self._local}
        gathered: list[Any] = [None] * dist.get_world_size()
        dist.all_gather_object(gathered, local)
        self.actions, self.bubble_fractions, windows = _lay_out(gathered)
        self.bubble_fraction = sum(self.bubble_fractions) / len(self.bubble_fractions)
        pp = dist.get_world_size(runner.pp_group)
        info = {"schedule": runner.spec.cls_name, "pipeline_parallel": pp, "micro_batches": runner.micro_batches,
                "steps": [s["step"] for s in self._local], "bubble_fraction": self.bubble_fraction,
                "bubble_fractions": self.bubble_fractions,
                "ideal_bubble": ideal_bubble(pp, runner.micro_batches),
                "pp_ranks": [g["pp_rank"] for g in gathered]}
        self.record = {"timeline_actions": self.actions, "timeline_bubble": self.bubble_fraction,
                       "timeline_info": info, "timeline_dir": str(self.output_dir)}
        if trainer.is_global_zero:
            write_outputs(self.output_dir, self.actions, windows, info)


def _lay_out(gathered: list[dict]) -> tuple[list[list[dict]], list[float], list[list[tuple]]]:
    """Every rank's actions on one time line (each step at rank 0's distance from the first),
    each rank's bubble (mean over steps), and each rank's step windows."""
    offsets = {s["step"]: s["zero"] - gathered[0]["steps"][0]["zero"] for s in gathered[0]["steps"]}
    actions, bubbles, windows = [], [], []
    for rank in gathered:
        rank_actions, rank_bubbles, rank_windows = [], [], []
        for step in rank["steps"]:
            shift = offsets[step["step"]]
            start, end = step["window"]
            rank_bubbles.append(bubble_fraction(step["actions"], start, end))
            rank_windows.append((start + shift, end + shift))
            for action in step["actions"]:
                moved = {**action, "step": step["step"], "start": action["start"] + shift, "end": action["end"] + shift}
                if "waits" in action:
                    moved["waits"] = [[s + shift, e + shift] for s, e in action["waits"]]
                rank_actions.append(moved)
        actions.append(rank_actions)
        bubbles.append(sum(rank_bubbles) / len(rank_bubbles) if rank_bubbles else 0.0)
        windows.append(rank_windows)
    return actions, bubbles, windows


# ------------------------------------------------------------------------ output


def action_name(action: dict) -> str:
    return f"{action['action']} s{action['stage']} mb{action['micro_batch']}"


def _lanes(actions: list[dict]) -> list[int]:
    """A lane per action such that actions in one lane do not overlap (first lane that is free)."""
    lane_ends: list[float] = []
    lanes = []
    for action in actions:
        lane = next((i for i, end in enumerate(lane_ends) if end <= action["start"]), len(lane_ends))
        if lane == len(lane_ends):
            lane_ends.append(action["end"])
        lane_ends[lane] = action["end"]
        lanes.append(lane)
    return lanes


def trace_events(actions: list[list[dict]], windows: list[list[tuple]], info: dict) -> list[dict]:
    """Chrome trace events: a process per rank; its compute on thread 0 (inside a slice per
    step), its sends and receives on threads of their own, as many as overlap."""
    events = []
    for rank, rank_actions in enumerate(actions):
        label = f"rank {rank} (pipeline rank {info['pp_ranks'][rank]})"
        events.append({"ph": "M", "name": "process_name", "pid": rank, "tid": 0, "args": {"name": label}})
        events.append({"ph": "M", "name": "process_sort_index", "pid": rank, "tid": 0, "args": {"sort_index": rank}})
        events.append({"ph": "M", "name": "thread_name", "pid": rank, "tid": 0, "args": {"name": "compute"}})
        for step, (start, end) in zip(info["steps"], windows[rank]):
            events.append(_complete(f"step {step}", "step", rank, 0, start, end, {"step": step}))
        computes = [a for a in rank_actions if a["kind"] in COMPUTE_KINDS]
        for action in computes:
            events.append(_complete(action_name(action), action["kind"], rank, 0, action["start"], action["end"],
                                    _args(action)))
        tid = 1
        for kind in COMM_KINDS:
            comms = [a for a in rank_actions if a["kind"] == kind]
            lanes = _lanes(comms)
            for lane in range(max(lanes, default=-1) + 1):
                name = kind if lane == 0 else f"{kind} {lane + 1}"
                events.append({"ph": "M", "name": "thread_name", "pid": rank, "tid": tid + lane, "args": {"name": name}})
            for action, lane in zip(comms, lanes):
                events.append(_complete(action_name(action), kind, rank, tid + lane, action["start"], action["end"],
                                        _args(action)))
            tid += max(lanes, default=-1) + 1
    return events


def _args(action: dict) -> dict:
    args = {"kind": action["kind"], "stage": action["stage"], "micro_batch": action["micro_batch"],
            "step": action["step"]}
    if "wait" in action:
        args["blocked_ms"] = round(action["wait"] * 1e3, 4)
    return args


def _complete(name: str, category: str, pid: int, tid: int, start: float, end: float, args: dict) -> dict:
    return {"ph": "X", "name": name, "cat": category, "pid": pid, "tid": tid, "ts": start * 1e6,
            "dur": max(end - start, 0.0) * 1e6, "args": args}


def write_trace(path: Path, actions: list[list[dict]], windows: list[list[tuple]], info: dict) -> None:
    trace = {"traceEvents": trace_events(actions, windows, info), "displayTimeUnit": "ms", "otherData": info}
    Path(path).write_text(json.dumps(trace))


def write_outputs(output_dir: Path, actions: list[list[dict]], windows: list[list[tuple]], info: dict) -> list[Path]:
    """Writes timeline.json and, with matplotlib installed, timeline.png; returns what it wrote."""
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    written = [output_dir / "timeline.json"]
    write_trace(written[0], actions, windows, info)
    try:
        draw_timeline(output_dir / "timeline.png", actions, windows, info)
    except ImportError:
        rank_zero_warn(f"PipelineTimeline wrote {written[0]} but not timeline.png: the PNG needs matplotlib "
                       "(pip install matplotlib, or lightning-parallel[plot]).")
    else:
        written.append(output_dir / "timeline.png")
    return written


def draw_timeline(path: Path, actions: list[list[dict]], windows: list[list[tuple]], info: dict) -> None:
    """One row per rank: compute boxes (micro-batch numbers where they fit) and, beneath them,
    thin bars for sends and receives (solid where the rank was blocked waiting)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.patches import Patch

    ranks = len(actions)
    fig = Figure(figsize=(14, 1.0 + 0.9 * ranks), dpi=120)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    span = max([a["end"] for rank in actions for a in rank] + [end for rank in windows for _, end in rank] + [1e-3])
    ax.set_xlim(0, span * 1e3)
    ax.set_ylim(ranks - 0.45, -0.6)
    width_px = fig.get_figwidth() * fig.dpi * 0.8  # the axes' share of the figure
    ms_per_char = span * 1e3 / width_px * 6.0  # about 6 px per character at font size 7

    several_stages = False
    for row, rank_actions in enumerate(actions):
        first_stage = min((a["stage"] for a in rank_actions if a["kind"] in COMPUTE_KINDS), default=0)
        for action in rank_actions:
            start, width = action["start"] * 1e3, (action["end"] - action["start"]) * 1e3
            if action["kind"] in COMPUTE_KINDS:
                later = action["stage"] != first_stage  # a rank's second stage (interleaved, V-shaped)
                several_stages |= later
                ax.broken_barh([(start, width)], (row - 0.38, 0.56), facecolors=COLORS[action["kind"]],
                               edgecolor="white", linewidth=0.4, hatch="//" if later else None)
                text = str(action["micro_batch"])
                if width > ms_per_char * (len(text) + 1):
                    ax.text(start + width / 2, row - 0.1, text, ha="center", va="center", fontsize=7, color="white")
            else:
                y = row + 0.22 if action["kind"] == "send" else row + 0.34
                ax.broken_barh([(start, width)], (y, 0.09), facecolors=COLORS[action["kind"]], alpha=0.3)
                waits = [(s * 1e3, (e - s) * 1e3) for s, e in action.get("waits", [])]
                ax.broken_barh(waits, (y, 0.09), facecolors=COLORS[action["kind"]])
        for start, end in windows[row]:
            ax.axvline(start * 1e3, color="black", linewidth=0.5, linestyle=":")

    ax.set_yticks(range(ranks))
    ax.set_yticklabels([f"rank {r}\n(pp {info['pp_ranks'][r]})" for r in range(ranks)], fontsize=8)
    ax.set_xlabel("time (ms)")
    present = {a["kind"] for rank in actions for a in rank}
    names = {"F": "forward (F)", "B": "backward (B)", "I": "backward input (I)", "W": "backward weight (W)",
             "loss": "loss", "send": "send", "recv": "receive"}
    handles = [Patch(color=COLORS[k], label=names[k]) for k in (*COMPUTE_KINDS, *COMM_KINDS) if k in present]
    if several_stages:
        handles.append(Patch(facecolor="white", edgecolor="grey", hatch="//", label="the rank's later stage"))
    fig.legend(handles=handles, loc="lower center", ncol=len(handles), fontsize=8, frameon=False)
    ax.set_title(f"{info['schedule']}, pp={info['pipeline_parallel']}, M={info['micro_batches']}, "
                 f"step {', '.join(map(str, info['steps']))}: bubble {info['bubble_fraction']:.1%} "
                 f"(ideal (P-1)/(M+P-1) = {info['ideal_bubble']:.1%})", fontsize=10)
    fig.tight_layout(rect=(0, 0.07, 1, 1))
    fig.savefig(path)
