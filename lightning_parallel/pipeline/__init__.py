"""Pipeline parallelism: split the model into stages, place them, run the schedules.

`split_model` (before tensor and data parallelism) traces the forward, cuts the trunk into
stages (balanced by measured cost, or at given layer names), frees what this rank's stages do
not own, and returns its stage modules. `PipelineRunner` (after them) runs Lightning's steps.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from lightning_parallel.layout import LayoutError

from lightning_parallel.pipeline.balance import balanced_split, profile, split_from_names, stage_costs
from lightning_parallel.pipeline.runner import PipelineRunner, capture_forward_call, concrete_args_for, split_batch
from lightning_parallel.pipeline.schedules import SCHEDULES, ScheduleSpec, check_schedule, stages_of_rank
from lightning_parallel.pipeline.split import StageModule, find_trunk, free_unowned, plan_stages, trace


@dataclass
class SplitModel:
    stage_modules: list[StageModule]
    stage_ids: list[int]
    num_stages: int
    owned_names: set[str]  # names (in the model) of every module inside this rank's stages
    report: str  # the chosen split, for the start-up log


def split_model(module: nn.Module, probe_step: str, probe_batch, pp: int, pp_rank: int, spec: ScheduleSpec,
                micro_batches: int, pipeline_split) -> SplitModel:
    num_stages = pp * spec.stages_per_rank
    trunk, blocks = find_trunk(module)
    if num_stages > len(blocks):
        per_rank = f" ({pp} ranks x {spec.stages_per_rank} stages each)" if spec.stages_per_rank > 1 else ""
        raise LayoutError(
            f"{num_stages} pipeline stages{per_rank} need at least {num_stages} layers in the trunk {trunk!r} to cut "
            f"between; it has {len(blocks)}. Lower pipeline_parallel or pick a schedule with one stage per rank."
        )
    args, kwargs = capture_forward_call(module, probe_step, probe_batch, 0)
    graph = trace(module, blocks, concrete_args_for(module, args, kwargs))

    measured = None
    if pipeline_split == "auto":
        micro_args = split_batch((args, kwargs), micro_batches)[0]
        measured = profile(module, blocks, lambda: module(*micro_args[0], **micro_args[1]))
        block_stage = balanced_split(measured.blocks, measured.prologue, measured.epilogue, num_stages)
    else:
        block_stage = split_from_names(trunk, list(pipeline_split), len(blocks), num_stages)
    plan = plan_stages(module, graph, trunk, block_stage, num_stages)
    report = _report(plan, trunk, block_stage, num_stages, measured, module)

    stage_ids = stages_of_rank(spec, pp_rank, pp)
    stage_modules = [StageModule(module, plan, s) for s in stage_ids]
    free_unowned(module, plan, stage_ids)
    owned_names = {
        f"{name}.{sub}" if sub else name
        for s in stage_ids for name in plan.owned_modules[s] for sub, _ in module.get_submodule(name).named_modules()
    }
    return SplitModel(stage_modules, stage_ids, num_stages, owned_names, report)


def _report(plan, trunk, block_stage, num_stages, measured, module) -> str:
    how = "balanced by measured cost" if measured else "at the given split points"
    lines = [f"Pipeline split ({how}), {num_stages} stages:"]
    costs = stage_costs(measured, block_stage, num_stages) if measured else None
    for s in range(num_stages):
        blocks = [i for i, stage in enumerate(block_stage) if stage == s]
        others = [n for n in plan.owned_modules[s] if not n.startswith(f"{trunk}.")] + plan.owned_attrs[s]
        params = sum(p.numel() for n in plan.owned_modules[s] for p in module.get_submodule(n).parameters())
        what = f"{trunk}.{blocks[0]}-{blocks[-1]}" if len(blocks) > 1 else f"{trunk}.{blocks[0]}"
        if others:
            what += " + " + ", ".join(others)
        cost = f", {costs[s] * 1e3:.2f} ms fwd+bwd per micro-batch" if costs else ""
        lines.append(f"  stage {s}: {what} ({params:,} parameters{cost})")
    if costs:
        lines.append(f"  measured stage costs differ by {(max(costs) - min(costs)) / max(costs):.0%}")
    return "\n".join(lines)


__all__ = ["PipelineRunner", "SCHEDULES", "SplitModel", "check_schedule", "split_model"]
