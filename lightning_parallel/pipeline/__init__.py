"""Pipeline parallelism: split the model into stages, place them, run the schedules.

`split_model` (before tensor and data parallelism) finds the module the steps call, cuts its
forward into stages of equal counted cost, frees what this rank's stages do not hold, and
returns its stage modules. `PipelineRunner` (after them) runs Lightning's steps.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import torch
from torch import nn

from lightning_parallel.layout import LayoutError
from lightning_parallel.pipeline.balance import Split, auto_split, named_split, stage_costs
from lightning_parallel.pipeline.cost import Hardware
from lightning_parallel.pipeline.runner import PipelineRunner, capture_call, concrete_args_for, split_batch
from lightning_parallel.pipeline.schedules import SCHEDULES, ScheduleSpec, check_schedule, stages_of_rank
from lightning_parallel.pipeline.split import StageModule, free_unowned, plan_stages, stage_tensors, units_of


@dataclass
class SplitModel:
    entry: str  # the module the steps call: "" for the LightningModule's own forward, else a child's name
    stage_modules: list[nn.Module]
    stage_ids: list[int]
    num_stages: int
    owned_names: set[str]  # names (in the LightningModule) of every module inside this rank's stages
    outside: list[str]  # parameters no stage's forward uses (a loss's, say): held by the last stage
    report: str  # the chosen split, for the start-up log


def split_model(module: nn.Module, probe_step: str, probe_batch, pp: int, pp_rank: int, spec: ScheduleSpec,
                micro_batches: int, pipeline_split, hardware: Hardware) -> SplitModel:
    num_stages = pp * spec.stages_per_rank
    entry_name, args, kwargs = capture_call(module, probe_step, probe_batch, 0)
    entry = module.get_submodule(entry_name)
    prefix = f"{entry_name}." if entry_name else ""
    (micro_args, micro_kwargs), *_ = split_batch((args, kwargs), micro_batches)
    concrete = concrete_args_for(entry, args, kwargs)
    if pipeline_split == "auto":
        split = auto_split(entry, num_stages, micro_args, micro_kwargs, concrete, hardware)
    else:
        names = [_relative(name, prefix) for name in pipeline_split]
        split = named_split(entry, names, num_stages, micro_args, micro_kwargs, concrete, hardware)
    plan = plan_stages(entry, split.graph, split.unit_stage, num_stages, split.measured)

    stage_ids = stages_of_rank(spec, pp_rank, pp)
    stage_modules = [StageModule(entry, plan, s) for s in stage_ids]
    used = {id(t) for t in stage_tensors(entry, plan, range(num_stages))}
    outside = [(name, t) for name, t in [*module.named_parameters(), *module.named_buffers()] if id(t) not in used]
    keep = stage_tensors(entry, plan, stage_ids)
    if num_stages - 1 in stage_ids:  # the training step runs on the last stage
        keep += [t for _, t in outside]
    report = _report(module, entry, prefix, plan, split, outside, pipeline_split == "auto")
    free_unowned(module, keep)
    owned_names = {
        f"{prefix}{name}.{sub}".rstrip(".")
        for s in stage_ids for name in plan.owned_modules[s] for sub, _ in entry.get_submodule(name).named_modules()
    }
    outside_params = [name for name, t in outside if isinstance(t, nn.Parameter)]
    return SplitModel(entry_name, stage_modules, stage_ids, num_stages, owned_names, outside_params, report)


def _relative(name: str, prefix: str) -> str:
    if prefix and not name.startswith(prefix):
        raise LayoutError(f"pipeline_split point {name!r} is not inside {prefix[:-1]!r}, the module the steps call.")
    return name[len(prefix):]


def _report(module, entry, prefix, plan, split: Split, outside, balanced: bool) -> str:
    how = "balanced by counted cost" if balanced else "at the given split points"
    costs = stage_costs(split.costs, split.unit_stage, plan.num_stages)  # forward + backward
    lines = [f"Pipeline split ({how}), {plan.num_stages} stages:"]
    for s in range(plan.num_stages):
        units = [prefix + node.target for node, stage in zip(units_of(split.graph), split.unit_stage) if stage == s]
        what = _compact(list(dict.fromkeys(units)))
        if plan.owned_params[s]:
            what += " + " + ", ".join(prefix + name for name in plan.owned_params[s])
        params = sum(t.numel() for t in stage_tensors(entry, plan, [s]) if isinstance(t, nn.Parameter))
        lines.append(f"  stage {s}: {what} ({params:,} parameters, est. {costs[s] * 1e3:.3g} ms fwd+bwd per micro-batch)")
    outside_params = [(name, t) for name, t in outside if isinstance(t, nn.Parameter)]
    if outside_params:
        count = sum(t.numel() for _, t in outside_params)
        names = ", ".join(name for name, _ in outside_params)
        lines.append(f"  used outside the forward, held by the last stage: {names} ({count:,} parameters)")
    lines.append(f"  estimated stage costs differ by {(max(costs) - min(costs)) / max(costs):.0%}")
    return "\n".join(lines)


def _compact(names: list[str]) -> str:
    """"blocks.0, blocks.1, blocks.2" -> "blocks.0-2"."""
    parts: list[list] = []
    for name in names:
        match = re.fullmatch(r"(.*)\.(\d+)", name)
        if match and parts and parts[-1][0] == match[1] and parts[-1][2] == int(match[2]) - 1:
            parts[-1][2] = int(match[2])
        elif match:
            parts.append([match[1], int(match[2]), int(match[2])])
        else:
            parts.append([name, None, None])
    return ", ".join(
        p[0] if p[1] is None else f"{p[0]}.{p[1]}" if p[1] == p[2] else f"{p[0]}.{p[1]}-{p[2]}" for p in parts
    )


__all__ = ["PipelineRunner", "SCHEDULES", "SplitModel", "check_schedule", "split_model"]
