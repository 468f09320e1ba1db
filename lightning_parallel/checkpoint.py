"""Model and optimizer state in the model's own names, whatever the layout.

For now a checkpoint holds full (unsharded) tensors gathered to rank 0 and is an ordinary
Lightning checkpoint file; loading scatters them back onto the current layout.
"""

from __future__ import annotations

from typing import Any

import torch.distributed as dist
from torch import nn
from torch.distributed.tensor import DTensor
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_optimizer_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
)
from torch.optim import Optimizer

# Collective: every rank must call; rank 0 receives the full tensors (on CPU), others nothing.
_GATHER = StateDictOptions(full_state_dict=True, cpu_offload=True)
# Rank 0 holds the full tensors; every rank takes its own shard of them.
_SCATTER = StateDictOptions(full_state_dict=True, broadcast_from_rank0=True)


def full_model_state(module: nn.Module, pp_group=None) -> dict[str, Any]:
    """Every parameter and buffer as a full CPU tensor under its own name, on every rank.
    Collective over the data/tensor groups (DTensor gathers) and the pipeline group (each
    stage contributes what it holds; other stages' tensors sit on the meta device)."""
    state = {}
    for name, value in module.state_dict().items():
        if value.is_meta:
            continue
        if isinstance(value, DTensor):
            value = value.full_tensor()
        state[name] = value.detach().cpu().clone()
    if pp_group is not None and dist.get_world_size(pp_group) > 1:
        parts: list[Any] = [None] * dist.get_world_size(pp_group)
        dist.all_gather_object(parts, state, group=pp_group)
        state = {name: value for part in parts for name, value in part.items()}
    return state


def full_optimizer_state(module: nn.Module, optimizer: Optimizer) -> dict[str, Any]:
    return get_optimizer_state_dict(module, optimizer, options=_GATHER)


def load_full_model_state(module: nn.Module, state: dict[str, Any], strict: bool = True) -> None:
    options = StateDictOptions(full_state_dict=True, broadcast_from_rank0=True, strict=strict)
    set_model_state_dict(module, state, options=options)


def load_full_optimizer_state(module: nn.Module, optimizer: Optimizer, state: dict[str, Any]) -> None:
    set_optimizer_state_dict(module, optimizer, state, options=_SCATTER)
