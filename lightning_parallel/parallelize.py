"""The model made parallel, in one fixed order: pipeline split, experts, tensor parallelism,
activation checkpointing, compile, data sharding; then, for a model built empty, each rank's share
allocated and initialized (and `init_from` read into it). Every check runs before the first
collective. The strategy's `setup` calls `parallelize` once per module; the options are the
strategy's arguments.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Optional

import torch
import torch.distributed as dist
from lightning.pytorch.utilities.rank_zero import rank_zero_warn
from torch import nn

from lightning_parallel import materialize, weights
from lightning_parallel.activation_checkpointing import apply_activation_checkpointing
from lightning_parallel.compiling import apply_compile
from lightning_parallel.data_parallel import (
    StepRunner,
    apply_data_parallel,
    broadcast_module_state,
    data_parallel_mesh,
    data_parallel_units,
    is_parallelized,
    mixed_precision_policy,
    replicate_with_ddp,
)
from lightning_parallel.expert_parallel import (
    apply_expert_data_parallel,
    apply_expert_parallel,
    check_expert_parallel,
    expert_data_parallel_mesh,
    find_experts,
)
from lightning_parallel.layout import LayoutError
from lightning_parallel.manual_optimization import ReplicatedGradients, apply_manual_data_parallel
from lightning_parallel.pipeline import PipelineRunner, SplitModel, split_model
from lightning_parallel.pipeline.cost import hardware_for
from lightning_parallel.pipeline.tied import tied_weights
from lightning_parallel.tensor_parallel import apply_tensor_parallel, format_plan, resolve_plan


@dataclass
class Parallelized:
    runner: Optional[nn.Module] = None  # the module every step enters through, where data parallelism needs one
    pipeline: Optional[PipelineRunner] = None
    manual: Optional[ReplicatedGradients] = None  # manual optimization's replicated gradients
    report: list[str] = field(default_factory=list)  # the tensor plan and the pipeline split, for the start-up report
    experts_per_layer: list[int] = field(default_factory=list)


def parallelize(strategy, module: nn.Module, trainer) -> Parallelized:
    done = Parallelized()
    empty = materialize.is_empty(module)
    # Names init_from provides (read from the checkpoint's key list once): init leaves them.
    loaded = weights.checkpoint_names(module, strategy.init_from) if strategy.init_from else set()
    if empty:
        materialize.check_initializable(module, loaded)

    def fill(roots, held=None):
        _fill(strategy, module, roots, held, empty, loaded)

    if is_parallelized(module):
        # The module parallelized itself in configure_model (ModelParallelStrategy's convention).
        if strategy.activation_checkpointing != "none" or strategy.compile:
            raise LayoutError("The module applied its own parallelism in configure_model: apply activation "
                              "checkpointing and compile there too, and leave those HybridParallel options unset.")
        done.report.append("The module applied its own parallelism in configure_model; used as is.")
        fill([module])
        return done
    layout, mesh = strategy.layout, strategy.device_mesh
    plan = None
    if layout.tp > 1 and not callable(strategy.tensor_plan):
        source, plan = resolve_plan(module, strategy.tensor_plan, layout.tp, strategy.sequence_parallel,
                                    strategy.loss_parallel)
        done.report.append(f"Tensor-parallel plan ({source}), tp={layout.tp}:\n{format_plan(plan)}")
    experts = find_experts(module, strategy.expert_plan) if layout.ep > 1 else []
    check_expert_parallel(module, experts, layout.ep, strategy.expert_plan)
    done.experts_per_layer = [module.get_submodule(name).num_experts for name in experts]
    if not empty:
        broadcast_module_state(module)

    split = _split(strategy, module, trainer) if layout.pp > 1 else None
    if split is not None:
        done.report.append(split.report)
        tied = tied_weights(module.get_submodule(split.entry), split.ties, split.stage_ids, strategy._schedule_spec,
                            mesh, layout.tp > 1 or layout.dp > 1, plan, f"{split.entry}." if split.entry else "")
    if experts:
        experts = [name for name in experts if split is None or name in split.owned_names]
        apply_expert_parallel(module, experts, strategy.expert_mesh["ep"])
    if layout.tp > 1:
        if plan is None:
            strategy.tensor_plan(module, mesh["tp"])
        else:
            apply_tensor_parallel(module, mesh["tp"], plan, strategy.sequence_parallel, strategy.loss_parallel,
                                  split.owned_names if split else None)

    roots = split.stage_modules if split is not None else [module]
    blocks = [block for root in roots for block in data_parallel_units(root)]
    apply_activation_checkpointing(blocks, strategy.activation_checkpointing)
    if strategy.compile:
        apply_compile(blocks)

    dp_mesh = data_parallel_mesh(mesh, layout)
    mp_policy = mixed_precision_policy(strategy.precision_plugin.precision, strategy.reduce_dtype)
    if experts:
        # Under pipelines the experts stay gathered over a step's micro-batches, as the stages do.
        apply_expert_data_parallel(module, experts, expert_data_parallel_mesh(strategy.expert_mesh, layout), mp_policy,
                                   reshard_after_forward=split is None or strategy.reshard_per_micro_batch)
    dp_group = strategy.dp_mesh.get_group()
    if split is not None:
        for stage in split.stage_modules:
            if layout.dp > 1:
                # Parameters stay gathered over a step's micro-batches (torchtitan's choice) unless
                # reshard_per_micro_batch asks for the least memory.
                apply_data_parallel(stage, dp_mesh, mp_policy, reshard_after_forward=strategy.reshard_per_micro_batch)
        tied.share()
        fill(split.stage_modules, split.held)
        if empty:  # each stage initialized its own copy of a tied weight
            tied.copy_from_first()
        for stage in split.stage_modules:
            stage.publish_parameters()
        done.pipeline = PipelineRunner(module, split, strategy._schedule_spec, strategy.micro_batches,
                                       mesh["pp"].get_group(), dp_group, strategy.root_device,
                                       strategy.reshard_per_micro_batch, tied)
        return done
    runner = StepRunner(module) if layout.dp > 1 else None
    if runner is not None and not module.automatic_optimization:
        done.manual = apply_manual_data_parallel(runner, dp_mesh, mp_policy, dp_group)
    elif runner is not None and layout.dp_shard == 1 and layout.tp == 1 and layout.ep == 1:
        fill([runner])  # DDP wants values: it broadcasts rank 0's
        done.runner = replicate_with_ddp(runner, dp_group, strategy.root_device, strategy.reduce_dtype)
        return done
    elif runner is not None:
        apply_data_parallel(runner, dp_mesh, mp_policy)
    fill([runner or module])
    done.runner = runner
    return done


def _fill(strategy, module: nn.Module, roots: list[nn.Module], held: Optional[set], empty: bool, loaded: set) -> None:
    """Gives the parallelized model its values: for a model built empty, allocates what this
    rank holds (under `roots`, and the `held` names of the rest) and initializes it; then reads
    `init_from` into it."""
    device = strategy.root_device
    if empty:
        materialize.materialize(module, roots, held, device)
        materialize.set_device(module, device)
        seed = strategy.broadcast(torch.initial_seed())
        materialize.initialize(module, device, strategy.device_mesh, seed, loaded, strategy.expert_mesh)
    if strategy.init_from:
        # Tensors the checkpoint lacks keep their values: their init's (check_initializable
        # refused those that have none), or those the model was built with.
        read = weights.load_weights(module, strategy.init_from, strict=False)
        if read.missing:
            rank_zero_warn(f"init_from {strategy.init_from} lacks {len(read.missing)} of the model's tensors, which "
                           f"keep their initialization: {_first(read.missing)}")
        if read.unused:
            rank_zero_warn(f"init_from {strategy.init_from}: {len(read.unused)} tensors name nothing in the model "
                           f"and were not read: {_first(read.unused)}")
    if empty:
        missed: list[Any] = [None] * dist.get_world_size()
        dist.all_gather_object(missed, materialize.uninitialized(module))
        materialize.refuse_uninitialized(sorted({name for names in missed for name in names}))


def _first(names: list[str], n: int = 8) -> str:
    return ", ".join(names[:n]) + (", ..." if len(names) > n else "")


def _split(strategy, module: nn.Module, trainer) -> SplitModel:
    step, batch = strategy._probe(trainer)
    return split_model(module, step, batch, strategy.layout.pp, strategy.device_mesh["pp"].get_local_rank(),
                       strategy._schedule_spec, strategy.micro_batches, strategy.pipeline_split,
                       hardware_for(strategy.root_device), agree=strategy.broadcast)
