"""Pipeline schedules by name: torch.distributed.pipelining's classes, where each rank's stages
sit, and the micro-batch counts each schedule needs."""

from __future__ import annotations

from dataclasses import dataclass

from torch.distributed import pipelining

from lightning_parallel.layout import LayoutError


@dataclass(frozen=True)
class ScheduleSpec:
    cls_name: str
    stages_per_rank: int  # virtual stages a rank holds
    v_shape: bool  # rank r holds stages r and 2P-1-r (else looped: r, r+P, ...)
    min_microbatches_per_rank: int  # M >= this x P
    split_backward: bool = False  # input and weight gradients computed apart (zero-bubble family)


SCHEDULES = {
    "gpipe": ScheduleSpec("ScheduleGPipe", 1, False, 0),
    "1f1b": ScheduleSpec("Schedule1F1B", 1, False, 1),
    "interleaved_1f1b": ScheduleSpec("ScheduleInterleaved1F1B", 2, False, 1),
    "looped_bfs": ScheduleSpec("ScheduleLoopedBFS", 2, False, 0),
    "zero_bubble": ScheduleSpec("ScheduleInterleavedZeroBubble", 2, False, 1, True),
    "zbv": ScheduleSpec("ScheduleZBVZeroBubble", 2, True, 1, True),
    "dualpipev": ScheduleSpec("ScheduleDualPipeV", 2, True, 2, True),
}


def check_schedule(name: str, pp: int, micro_batches: int) -> ScheduleSpec:
    if name not in SCHEDULES:
        raise LayoutError(f"schedule={name!r}: unknown pipeline schedule; choose one of {', '.join(SCHEDULES)}.")
    spec = SCHEDULES[name]
    if isinstance(micro_batches, bool) or not isinstance(micro_batches, int) or micro_batches < 1:
        raise LayoutError(f"micro_batches must be a positive int, got {micro_batches!r}.")
    needed = spec.min_microbatches_per_rank * pp
    if micro_batches < needed:
        raise LayoutError(
            f"schedule={name!r} with pipeline_parallel={pp} needs micro_batches >= {needed}, got {micro_batches}. "
            f"Raise micro_batches (each rank's batch must divide into them) or pick schedule='gpipe'."
        )
    return spec


def stages_of_rank(spec: ScheduleSpec, rank: int, pp: int) -> list[int]:
    if spec.stages_per_rank == 1:
        return [rank]
    if spec.v_shape:
        return [rank, 2 * pp - 1 - rank]
    return [rank + k * pp for k in range(spec.stages_per_rank)]


def build_eval_schedule(spec: ScheduleSpec, stages: list, micro_batches: int, loss_fn):
    """The schedule that runs evaluation (forward only). In torch 2.13, `eval()` on the V-shaped
    schedules still executes their backward actions and fails; for those, a second instance
    keeps only the forward actions (and their sends and receives) of its lowered order, in
    their order. Dropping actions only removes waits, so the order stays deadlock-free."""
    schedule = build_schedule(spec, stages, micro_batches, loss_fn)
    if spec.v_shape:
        from torch.distributed.pipelining.schedules import _ComputationType as Op

        keep = {Op.FORWARD, Op.SEND_F, Op.RECV_F, Op.UNSHARD, Op.RESHARD}

        def forward_part(action):  # DualPipeV fuses a forward and a backward into one action
            parts = action.sub_actions if action.computation_type == Op.OVERLAP_F_B else [action]
            return [a for a in parts if a.computation_type in keep]

        schedule.pipeline_order_with_comms = {
            rank: [part for a in actions if a is not None for part in forward_part(a)]
            for rank, actions in schedule.pipeline_order_with_comms.items()
        }
    return schedule


def build_schedule(spec: ScheduleSpec, stages: list, micro_batches: int, loss_fn):
    cls = getattr(pipelining, spec.cls_name)
    # Losses are scaled by 1/micro_batches in loss_fn, so gradients accumulated over several
    # steps (Lightning's accumulate_grad_batches) are not divided again.
    if spec.stages_per_rank == 1:
        return cls(stages[0], micro_batches, loss_fn=loss_fn, scale_grads=False)
    return cls(stages, micro_batches, loss_fn=loss_fn, scale_grads=False)
