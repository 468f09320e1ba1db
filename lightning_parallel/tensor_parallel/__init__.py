"""Tensor parallelism: choose a plan, check it, apply it with DTensor's `parallelize_module`.

Plan sources, in order: an explicit `tensor_plan` (dict of globs to style names, or a callable
(module, tp_mesh)); under "auto", the model's own declared plan (Hugging Face `_tp_plan`); else a
plan inferred from structure where the math provably holds, or an error showing what to write.
(A module that parallelizes itself in `configure_model` is left as it is: see strategy.py.)
"""

from __future__ import annotations

from typing import Callable, Union

from torch import nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor.parallel import ParallelStyle, parallelize_module

from lightning_parallel.layout import LayoutError
from lightning_parallel.tensor_parallel.conv1d import conv1d_style, is_conv1d, narrow_split_size
from lightning_parallel.tensor_parallel.infer import infer_plan
from lightning_parallel.tensor_parallel.plans import check_plan, declared_plan, expand, format_plan, rotary_dim
from lightning_parallel.tensor_parallel.styles import make_style
from lightning_parallel.tensor_parallel.ties import retie, shared_parameters

PlanSource = Union[str, dict, Callable[[nn.Module, DeviceMesh], None]]


def resolve_plan(
    module: nn.Module, tensor_plan: PlanSource, tp: int, sequence_parallel: bool = False, loss_parallel: bool = False
) -> tuple[str, dict[str, str]]:
    """(where the plan came from, concrete module name -> style), checked against the model.
    Runs on every rank before any collective, so a bad plan fails everywhere alike."""
    if isinstance(tensor_plan, dict):
        source, plan = "given", expand(tensor_plan, module)
    elif tensor_plan == "auto":
        declared = declared_plan(module)
        if declared is not None:
            declared, declared_by = declared
            if sequence_parallel:
                raise LayoutError(
                    "sequence_parallel=True needs a tensor_plan that marks where the sequence is split "
                    "('shard_sequence') and which norms run on sequence shards ('sequence_parallel'); "
                    "the model's declared plan has neither. Pass tensor_plan explicitly."
                )
            source, plan = "declared by the model", expand(declared, module, declared_by)
        else:
            if sequence_parallel:
                raise LayoutError("sequence_parallel=True needs an explicit tensor_plan; 'auto' infers none.")
            source, plan = "inferred", infer_plan(module)
    else:
        raise LayoutError(
            f"tensor_plan must be 'auto', a dict of module-name globs to style names, or a callable "
            f"(module, tp_mesh); got {tensor_plan!r}."
        )
    check_plan(plan, module, tp)
    sequence_styles = sorted({style for style in plan.values() if style in ("sequence_parallel", "shard_sequence")})
    if sequence_styles and not sequence_parallel:
        raise LayoutError(f"The plan uses {sequence_styles}, which need HybridParallel(sequence_parallel=True).")
    if loss_parallel and "colwise_gather_output" not in plan.values():
        raise LayoutError(
            "loss_parallel=True needs the output head in the plan with style 'colwise_gather_output' "
            "(its logits then stay split over the vocabulary)."
        )
    return source, plan


def apply_tensor_parallel(module: nn.Module, tp_mesh: DeviceMesh, plan: dict[str, str],
                          sequence_parallel: bool, loss_parallel: bool, only: list[str] | None = None) -> None:
    """Applies the plan; with `only` (the modules of this rank's pipeline stages), to those alone.
    Weights that modules share stay shared (see ties.py)."""
    ties = shared_parameters(module)
    for name, style in plan.items():
        sub = module.get_submodule(name)
        if is_conv1d(sub):
            parallelize = conv1d_style(name, style, sequence_parallel)
        else:
            rotary = rotary_dim(module, name) if style == "mla_kv_a_proj" else None
            parallelize = make_style(style, sequence_parallel, loss_parallel, rotary)
        if parallelize is None or (only is not None and name not in only):
            continue
        if isinstance(parallelize, ParallelStyle):
            parallelize_module(sub, tp_mesh, parallelize)
        else:
            parallelize(sub, tp_mesh)
        if style == "qkv_colwise":
            narrow_split_size(module.get_submodule(name.rpartition(".")[0]), sub, tp_mesh.size())
    retie(ties, only)


__all__ = ["resolve_plan", "apply_tensor_parallel", "format_plan"]
