"""Model and optimizer state in the model's own names, whatever the layout.

For now a checkpoint holds full (unsharded) tensors gathered to rank 0 and is an ordinary
Lightning checkpoint file; loading scatters them back onto the current layout.
"""

from __future__ import annotations

from typing import Any

from torch import nn
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_optimizer_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
)
from torch.optim import Optimizer

# Collective: every rank must call; rank 0 receives the full tensors (on CPU), others nothing.
_GATHER = StateDictOptions(full_state_dict=True, cpu_offload=True)
# Rank 0 holds the full tensors; every rank takes its own shard of them.
_SCATTER = StateDictOptions(full_state_dict=True, broadcast_from_rank0=True)


def full_model_state(module: nn.Module) -> dict[str, Any]:
    return get_model_state_dict(module, options=_GATHER)


def full_optimizer_state(module: nn.Module, optimizer: Optimizer) -> dict[str, Any]:
    return get_optimizer_state_dict(module, optimizer, options=_GATHER)


def load_full_model_state(module: nn.Module, state: dict[str, Any], strict: bool = True) -> None:
    options = StateDictOptions(full_state_dict=True, broadcast_from_rank0=True, strict=strict)
    set_model_state_dict(module, state, options=options)


def load_full_optimizer_state(module: nn.Module, optimizer: Optimizer, state: dict[str, Any]) -> None:
    set_optimizer_state_dict(module, optimizer, state, options=_SCATTER)
