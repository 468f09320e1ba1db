"""Pipeline parallelism: split the model into stages, place them, run the schedules.

`split_model` (before tensor and data parallelism) finds the module the steps call, cuts its
forward into stages of equal counted cost, frees what this rank's stages do not hold, and
returns its stage modules. `PipelineRunner` (after them) runs Lightning's steps.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

from torch import nn

from lightning_parallel.layout import LayoutError
from lightning_parallel.pipeline.balance import (
    auto_split,
    balanced_split,
    named_split,
    redo_split,
    stage_costs,
    stages_from_starts,
)
from lightning_parallel.pipeline.cost import Hardware
from lightning_parallel.pipeline.declared import DeclaredStage, declared_costs, declared_units, declares_plan
from lightning_parallel.pipeline.runner import PipelineRunner, capture_call, concrete_args_for, split_batch
from lightning_parallel.pipeline.schedules import SCHEDULES, ScheduleSpec, check_schedule, stages_of_rank
from lightning_parallel.pipeline.tied import Tie, find_ties
from lightning_parallel.pipeline.split import (
    StageModule,
    StagePlan,
    free_unowned,
    plan_stages,
    stage_tensors,
    trace,
    units_of,
)


@dataclass
class SplitModel:
    entry: str  # the module the steps call: "" for the LightningModule's own forward, else a child's name
    stage_modules: list[nn.Module]
    stage_ids: list[int]
    num_stages: int
    owned_names: set[str]  # names (in the LightningModule) of every module inside this rank's stages
    outside: list[str]  # parameters no stage's forward uses (a loss's, say): held by the last stage
    held: set[str]  # names (in the LightningModule) of every parameter and buffer this rank holds
    report: str  # the chosen split, for the start-up log
    declared: bool = False  # stages cut at the pieces the model declares (DeclaredStage)
    ties: list[Tie] = field(default_factory=list)  # weights held by several stages, names relative to `entry`


@dataclass
class StageCut:
    """Where the model is cut (decided alike on every rank) and what each stage holds; nothing
    freed or built yet. `split_model` applies it on a rank; the planner reads it."""

    entry_name: str
    entry: nn.Module
    plan: StagePlan
    declared: bool  # cut at the pieces the model declares (a Hugging Face `_pp_plan`)
    call: tuple[tuple, dict]  # the entry's call on the whole batch
    outside: list[tuple[str, object]]  # (name, tensor) no stage's forward uses: the last stage holds them
    stage_costs: list[float]  # counted seconds of forward + backward per micro-batch, per stage
    report: str

    def tensors(self, stage_ids: list[int]) -> list:
        held = stage_tensors(self.entry, self.plan, stage_ids)
        if self.plan.num_stages - 1 in stage_ids:  # the training step runs on the last stage
            held += [t for _, t in self.outside]
        return held

    def held_names(self, module: nn.Module, stage_ids: list[int]) -> set[str]:
        """Names (in the LightningModule) of the parameters and buffers these stages hold."""
        ids = {id(t) for t in self.tensors(stage_ids)}
        named = [*module.named_parameters(remove_duplicate=False), *module.named_buffers(remove_duplicate=False)]
        return {name for name, t in named if id(t) in ids}


def cut_stages(module: nn.Module, probe_step: str, probe_batch, pp: int, spec: ScheduleSpec, micro_batches: int,
               pipeline_split, hardware: Hardware, agree=lambda decision: decision) -> StageCut:
    """`agree(decision)` returns one rank's decision to every rank (global rank 0's), so that
    probe batches of other shapes on other ranks cannot give different splits."""
    num_stages = pp * spec.stages_per_rank
    entry_name, args, kwargs = _find_entry(module, probe_step, probe_batch)
    entry = module.get_submodule(entry_name)
    prefix = f"{entry_name}." if entry_name else ""
    (micro_args, micro_kwargs), *_ = split_batch((args, kwargs), micro_batches)
    names = None if pipeline_split == "auto" else [_relative(name, prefix) for name in pipeline_split]

    declared = declared_units(entry)
    if declared is not None:
        costs = declared_costs(entry, declared, micro_args, micro_kwargs, hardware)
        unit_stage = agree(_declared_split(declared, costs, names, num_stages))
        plan = _declared_plan(entry, declared, unit_stage, num_stages)
    else:
        concrete = concrete_args_for(entry, args, kwargs)
        if names is None:
            split = auto_split(entry, num_stages, micro_args, micro_kwargs, concrete, hardware)
        else:
            split = named_split(entry, names, num_stages, micro_args, micro_kwargs, concrete, hardware)
        opened, unit_stage = agree((sorted(split.opened), split.unit_stage))
        if set(opened) != split.opened:
            split = redo_split(entry, set(opened), unit_stage, micro_args, micro_kwargs, concrete, hardware)
        costs = split.costs
        plan = plan_stages(entry, split.graph, unit_stage, num_stages, split.measured)

    used = {id(t) for t in stage_tensors(entry, plan, range(num_stages))}
    outside = [(name, t) for name, t in [*module.named_parameters(), *module.named_buffers()] if id(t) not in used]
    per_stage = stage_costs(costs, unit_stage, num_stages)
    report = _report(entry, prefix, plan, per_stage, outside, names is None)
    return StageCut(entry_name, entry, plan, declared is not None, (args, kwargs), outside, per_stage, report)


def split_model(module: nn.Module, probe_step: str, probe_batch, pp: int, pp_rank: int, spec: ScheduleSpec,
                micro_batches: int, pipeline_split, hardware: Hardware, agree=lambda decision: decision) -> SplitModel:
    """This rank's stages of the cut `cut_stages` decides; frees every tensor they do not hold."""
    cut = cut_stages(module, probe_step, probe_batch, pp, spec, micro_batches, pipeline_split, hardware, agree)
    entry, plan = cut.entry, cut.plan
    stage_ids = stages_of_rank(spec, pp_rank, pp)
    if cut.declared:
        args, kwargs = cut.call
        stage_modules = [DeclaredStage(entry, plan.owned_modules[s], s == 0, s == plan.num_stages - 1, args, kwargs)
                         for s in stage_ids]
    else:
        stage_modules = [StageModule(entry, plan, s) for s in stage_ids]
    held = cut.held_names(module, stage_ids)
    free_unowned(module, cut.tensors(stage_ids))
    prefix = f"{cut.entry_name}." if cut.entry_name else ""
    owned_names = {
        f"{prefix}{name}.{sub}".rstrip(".")
        for s in stage_ids for name in plan.owned_modules[s] for sub, _ in entry.get_submodule(name).named_modules()
    }
    outside_params = [name for name, t in cut.outside if isinstance(t, nn.Parameter)]
    return SplitModel(cut.entry_name, stage_modules, stage_ids, plan.num_stages, owned_names, outside_params, held,
                      cut.report, cut.declared, plan.ties)


def _find_entry(module: nn.Module, probe_step: str, probe_batch) -> tuple[str, tuple, dict]:
    """The module to cut into stages and its call: the one the step calls (the LightningModule
    or a child), or, where the LightningModule's forward only wraps a model that declares its
    pipeline plan (`return self.model(input_ids=x).logits`), that model as the forward calls it."""
    entry_name, args, kwargs = capture_call(module, probe_step, probe_batch, 0)
    if entry_name == "" and not declares_plan(module):
        declaring = [name for name, child in module.named_children() if declares_plan(child)]
        if len(declaring) == 1 and _only_calls(module, declaring[0], concrete_args_for(module, args, kwargs)):
            return capture_call(module, probe_step, probe_batch, 0, entry=declaring[0])
    return entry_name, args, kwargs


def _only_calls(module: nn.Module, child: str, concrete: dict) -> bool:
    """Whether `child` is the only module holding parameters that the forward calls."""
    try:
        graph = trace(module, set(), concrete)
    except LayoutError:
        return False
    called = {node.target for node in units_of(graph) if any(True for _ in module.get_submodule(node.target).parameters())}
    return called == {child}


def _declared_split(units: list[str], costs: list[float], names, num_stages: int) -> list[int]:
    if names is None:
        return balanced_split(costs, [True] * len(units), num_stages) or _too_few(units, num_stages)
    if len(names) != num_stages - 1 or any(name not in units[1:] for name in names):
        raise LayoutError(
            f"pipeline_split needs {num_stages - 1} of the model's pieces that begin stages 1..{num_stages - 1}, "
            f"in order; the model's pieces are {', '.join(units)}; got {names}."
        )
    return stages_from_starts(names, [units.index(name) for name in names], len(units))


def _too_few(units: list[str], num_stages: int):
    raise LayoutError(f"{num_stages} pipeline stages need at least {num_stages} pieces to cut between; the model has {len(units)}.")


def _declared_plan(entry: nn.Module, units: list[str], unit_stage: list[int], num_stages: int) -> StagePlan:
    """Who owns what: each stage its units; buffers outside every unit (rotary frequencies, say)
    are read by every stage's run of the model's forward."""
    owned = [[u for u, s in zip(units, unit_stage) if s == stage] for stage in range(num_stages)]
    empty = [[] for _ in range(num_stages)]
    ties = find_ties(entry, owned, empty)
    in_units = {id(b) for u in units for b in entry.get_submodule(u).buffers()}
    shared = [name for name, b in entry.named_buffers() if id(b) not in in_units]
    return StagePlan(None, {}, empty, empty, owned, [[] for _ in range(num_stages)], [list(shared) for _ in range(num_stages)],
                     ties)


def _relative(name: str, prefix: str) -> str:
    if prefix and not name.startswith(prefix):
        raise LayoutError(f"pipeline_split point {name!r} is not inside {prefix[:-1]!r}, the module the steps call.")
    return name[len(prefix):]


def _report(entry, prefix, plan, costs, outside, balanced: bool) -> str:
    how = "balanced by counted cost" if balanced else "at the given split points"
    lines = [f"Pipeline split ({how}), {plan.num_stages} stages:"]
    for s in range(plan.num_stages):
        what = _compact([prefix + name for name in plan.owned_modules[s]])
        if plan.owned_params[s]:
            what += " + " + ", ".join(prefix + name for name in plan.owned_params[s])
        params = sum(t.numel() for t in stage_tensors(entry, plan, [s]) if isinstance(t, nn.Parameter))
        lines.append(f"  stage {s}: {what} ({params:,} parameters, est. {costs[s] * 1e3:.3g} ms fwd+bwd per micro-batch)")
    outside_params = [(name, t) for name, t in outside if isinstance(t, nn.Parameter)]
    if outside_params:
        count = sum(t.numel() for _, t in outside_params)
        names = ", ".join(name for name, _ in outside_params)
        lines.append(f"  used outside the forward, held by the last stage: {names} ({count:,} parameters)")
    for tie in plan.ties:
        names = " = ".join(prefix + name for name in tie.names)
        lines.append(f"  tied across stages {', '.join(map(str, sorted(set(tie.stages))))}: {names} (gradients summed)")
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


__all__ = ["PipelineRunner", "SCHEDULES", "SplitModel", "StageCut", "check_schedule", "cut_stages", "split_model"]
