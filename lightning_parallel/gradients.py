"""Gradient norm and clipping over every shard of the model.

A rank's gradients may be plain tensors, DTensors on a data- or tensor-parallel mesh, or a
mix; with pipeline parallelism each rank holds only its stages. The norm is the one a single
process would compute for the whole model.
"""

from __future__ import annotations

import math
from collections.abc import Iterable

import torch
import torch.distributed as dist
from torch.distributed.tensor import DTensor


def _by_mesh(tensors: list[torch.Tensor]) -> list[list[torch.Tensor]]:
    """Groups tensors by the mesh they are spread over (None for plain tensors): torch's
    foreach kernels take one kind at a time."""
    groups: dict[object, list[torch.Tensor]] = {}
    for tensor in tensors:
        groups.setdefault(tensor.device_mesh if isinstance(tensor, DTensor) else None, []).append(tensor)
    return list(groups.values())


def total_grad_norm(parameters: Iterable[torch.Tensor], norm_type: float = 2.0, pp_group=None,
                    device: torch.device | str = "cpu") -> torch.Tensor:
    """The global norm of all gradients (a replicated plain tensor, the same on every rank).
    `device` is where a rank whose parameters got no gradient makes its zero (NCCL takes no
    CPU tensor): the strategy's device."""
    norm_type = float(norm_type)
    parameters = list(parameters)
    norms = []
    for grads in _by_mesh([p.grad for p in parameters if p.grad is not None]):
        norm = torch.nn.utils.get_total_norm(grads, norm_type)
        # A DTensor norm is partial over the mesh; full_tensor() reduces it across ranks.
        norms.append(norm.full_tensor() if isinstance(norm, DTensor) else norm)
    if norms:
        total = torch.linalg.vector_norm(torch.stack([n.float() for n in norms]), norm_type)
    else:  # a rank whose parameters got no gradient still joins the pipeline reduction below
        total = torch.zeros((), device=device)

    if pp_group is not None and dist.get_world_size(pp_group) > 1:
        if math.isinf(norm_type):
            dist.all_reduce(total, op=dist.ReduceOp.MAX, group=pp_group)
        else:
            total = total.pow(norm_type)
            dist.all_reduce(total, group=pp_group)
            total = total.pow(1.0 / norm_type)
    return total


def clip_grad_norm_(parameters: Iterable[torch.Tensor], max_norm: float, norm_type: float = 2.0, pp_group=None,
                    device: torch.device | str = "cpu", counted: Iterable[torch.Tensor] | None = None):
    """Scales all gradients in place so that their global norm is at most `max_norm`. `counted`:
    the parameters whose gradients the norm counts on this rank (default: all; a weight tied
    across pipeline stages is counted on one of the ranks holding it)."""
    parameters = list(parameters)
    total = total_grad_norm(parameters if counted is None else counted, norm_type, pp_group, device)
    for group in _by_mesh([p for p in parameters if p.grad is not None]):
        torch.nn.utils.clip_grads_with_norm_(group, max_norm, total)
    return total


def average_over(grads: list[torch.Tensor], group, reduce_dtype: torch.dtype | None = None) -> None:
    """Averages gradients in place over `group` (the data-parallel ranks), in one all-reduce per
    dtype (in `reduce_dtype` when given). DTensor gradients are averaged shard by shard."""
    if not grads or group is None or dist.get_world_size(group) == 1:
        return
    locals_ = [g.to_local() if isinstance(g, DTensor) else g for g in grads]
    by_dtype: dict[torch.dtype, list[torch.Tensor]] = {}
    for g in locals_:
        by_dtype.setdefault(g.dtype, []).append(g)
    for dtype, same in by_dtype.items():
        flat = torch.cat([g.reshape(-1) for g in same]).to(reduce_dtype or dtype)
        dist.all_reduce(flat, op=dist.ReduceOp.AVG, group=group)
        for g, averaged in zip(same, flat.split([g.numel() for g in same])):
            g.copy_(averaged.view_as(g))
