"""Data parallelism: the same model on every data-parallel rank, each rank reading its own shard.

Both sharding modes use PyTorch's FSDP2 machinery, so tensor parallelism (DTensor parameters),
gradient accumulation without communication, and clipping work the same way in each:
- "none": `replicate` (FSDP2's DDP): parameters replicated, gradients all-reduced (averaged).
- "full": `fully_shard` (FSDP2): parameters, gradients and optimizer state sharded over dp.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.fsdp import FSDPModule, fully_shard
from torch.distributed.tensor import DTensor

# FSDP2's DDP lives in a private module in torch 2.13; it composes with DTensor tensor
# parallelism, which torch.nn.parallel.DistributedDataParallel does not.
from torch.distributed._composable.replicate_with_fsdp import replicate


class StepRunner(nn.Module):
    """Holds the LightningModule so that every step enters through this module's forward.

    Lightning's forward redirection calls `runner(*batch)`, which runs `training_step` (or
    another step) inside this forward. FSDP2's root hooks sit on this module, so parameters
    that belong to no block (embeddings, heads, ...) are gathered around the whole step.
    """

    def __init__(self, module: nn.Module) -> None:
        super().__init__()
        self.module = module

    def forward(self, *args, **kwargs):
        return self.module(*args, **kwargs)


def data_parallel_units(module: nn.Module) -> list[nn.Module]:
    """The modules that get their own FSDP2 group: the parameter-holding elements of every
    ModuleList/Sequential/ModuleDict (the repeated blocks), outermost first; nothing inside a unit."""
    units: list[nn.Module] = []

    def visit(parent: nn.Module) -> None:
        is_container = isinstance(parent, (nn.ModuleList, nn.Sequential, nn.ModuleDict))
        for child in parent.children():
            if is_container and any(True for _ in child.parameters()):
                units.append(child)
            else:
                visit(child)

    visit(module)
    return units


def apply_data_parallel(root: nn.Module, dp_mesh: DeviceMesh, sharding: str) -> None:
    """Wraps each block, then `root` (the module every step enters through: the step runner,
    or a pipeline stage), with `replicate` or `fully_shard` over dp."""
    wrap = fully_shard if sharding == "full" else replicate
    for unit in data_parallel_units(root):
        wrap(unit, mesh=dp_mesh)
    wrap(root, mesh=dp_mesh)


def set_gradient_sync(module: nn.Module, enabled: bool) -> None:
    """Turns the dp gradient reduction of every FSDP2 module under `module` on or off."""
    for sub in module.modules():
        if isinstance(sub, FSDPModule):
            sub.set_requires_gradient_sync(enabled, recurse=False)


def is_parallelized(module: nn.Module) -> bool:
    """Whether some parallelism was already applied to `module` (DTensor parameters or FSDP2)."""
    return any(isinstance(p, DTensor) for p in module.parameters()) or any(
        isinstance(sub, FSDPModule) for sub in module.modules()
    )


def reshard(module: nn.Module) -> None:
    """Frees the gathered copies of sharded parameters (a no-op for replicated ones)."""
    for sub in module.modules():
        if isinstance(sub, FSDPModule):
            sub.reshard()


@torch.no_grad()
def broadcast_module_state(module: nn.Module, src: int = 0) -> None:
    """Copies rank `src`'s parameters and buffers to every rank, as DDP does at start-up, so an
    unseeded initialization cannot silently differ between ranks."""
    for tensor in [*module.parameters(), *module.buffers()]:
        if tensor.device.type != "meta":
            dist.broadcast(tensor.data, src=src)
