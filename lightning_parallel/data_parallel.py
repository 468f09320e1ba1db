"""Data parallelism: the same model on every data-parallel rank, each rank reading its own shard.

Every sharding mode is FSDP2's `fully_shard` (public API), so tensor parallelism (DTensor
parameters), gradient accumulation, mixed precision and clipping work the same way in each:
- "none": the (dp_replicate=dp, dp_shard=1) mesh: FSDP2's HSDP with shards of one rank, i.e.
  DDP (parameters replicated, gradients all-reduced). Without tensor or pipeline parallelism,
  torch's DistributedDataParallel instead: its bucketed all-reduces overlap the backward and its
  parameters are plain tensors (FSDP2 reduces each block on its own, and where the backend
  cannot overlap that, as gloo on CPU, the backward waits for each: ~10% of a step measured).
- "full": the dp_shard mesh: parameters, gradients and optimizer state sharded over dp.
- "hybrid": the (dp_replicate, dp_shard) mesh: sharded within a replica (a node), gradients
  reduce-scattered there and all-reduced across replicas (HSDP).
torch 2.13's `fully_shard(dp_mesh_dims=...)` is not used: it wants every parameter (and so every
activation) as a DTensor on the whole mesh, which a user's module does not compute with.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.algorithms.ddp_comm_hooks import default_hooks
from torch.distributed.fsdp import FSDPModule, MixedPrecisionPolicy, fully_shard
from torch.nn.parallel import DistributedDataParallel
from torch.distributed.tensor import DTensor

from lightning_parallel.layout import Layout


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


def data_parallel_mesh(mesh: DeviceMesh, layout: Layout) -> DeviceMesh:
    """The mesh FSDP2 runs on: 1-D (shard) when nothing is replicated, else 2-D (replicate, shard)."""
    return mesh["dp_shard"] if layout.dp_replicate == 1 else mesh["dp_replicate", "dp_shard"]


def apply_data_parallel(root: nn.Module, dp_mesh: DeviceMesh, mp_policy: MixedPrecisionPolicy,
                        reshard_after_forward: bool = True, ignored_params: set | None = None) -> None:
    """Wraps each block, then `root` (the module every step enters through: the step runner,
    or a pipeline stage), with `fully_shard` over `dp_mesh`. `reshard_after_forward=False`
    keeps each block gathered from its forward to its backward (pipeline stages, whose
    micro-batches would otherwise gather every block again for each of them). `ignored_params`
    (outside the blocks) stay plain and unreduced: their caller reduces them."""
    for unit in data_parallel_units(root):
        fully_shard(unit, mesh=dp_mesh, mp_policy=mp_policy, reshard_after_forward=reshard_after_forward)
    # The root's own parameters stay gathered after its forward unless told otherwise (FSDP2's default).
    fully_shard(root, mesh=dp_mesh, mp_policy=mp_policy, reshard_after_forward=None if reshard_after_forward else False,
                ignored_params=ignored_params)


def replicate_with_ddp(runner: nn.Module, dp_group, device: torch.device, reduce_dtype: str | None) -> DistributedDataParallel:
    """torch's DDP around the step runner. Gradients are reduced through a Python comm hook (in
    bf16 when `reduce_dtype` says so), which also lets torch's debug tools see the reductions.
    Buffers are not broadcast every step: FSDP2 does not either, and they start equal."""
    ddp = DistributedDataParallel(runner, device_ids=[device.index] if device.type == "cuda" else None,
                                  process_group=dp_group, broadcast_buffers=False)
    hook = _allreduce_in_bf16 if reduce_dtype == "bfloat16" else default_hooks.allreduce_hook
    ddp.register_comm_hook(dp_group, hook)
    return ddp


@contextlib.contextmanager
def unused_parameters_explained(model: nn.Module) -> Iterator[None]:
    """Names the problem and the fix when torch's DDP finds a parameter that got no gradient in the
    previous step (each rank raises where its own backward left one out)."""
    try:
        yield
    except RuntimeError as error:
        if not isinstance(model, DistributedDataParallel) or "Expected to have finished reduction" not in str(error):
            raise
        raise RuntimeError(
            "Under sharding='none' without tensor or pipeline parallelism the model is torch's DistributedDataParallel, "
            "which needs a gradient for every parameter on every step; the last step left some without one (experts "
            "no token was routed to, a layer the step does not call). Fix: sharding='full' or 'hybrid' (FSDP2 reduces "
            "the gradients there are), expert_parallel for a mixture-of-experts model, or requires_grad=False on "
            "parameters the step never uses.") from error


def _allreduce_in_bf16(group, bucket):
    """A DDP comm hook averaging a gradient bucket in bf16 (torch's bf16_compress_hook refuses
    backends other than NCCL and XCCL)."""
    buffer = bucket.buffer()
    compressed = buffer.to(torch.bfloat16).div_(group.size())
    reduced = dist.all_reduce(compressed, group=group, async_op=True).get_future()

    def decompress(future):
        buffer.copy_(future.value()[0])
        return buffer

    return reduced.then(decompress)


def mixed_precision_policy(precision: str, reduce_dtype: str | None) -> MixedPrecisionPolicy:
    """Under bf16-mixed, parameters are gathered and computed in bf16 (the sharded fp32 ones stay
    the master weights the optimizer updates) and gradients reduced in fp32 unless `reduce_dtype`
    says bf16. Lightning's autocast stays on around the step, as in one process, so the ops it
    keeps in fp32 (softmax, norms, losses) still run in fp32."""
    param_dtype = torch.bfloat16 if precision == "bf16-mixed" else None
    reduce = {None: torch.float32 if param_dtype else None, "float32": torch.float32, "bfloat16": torch.bfloat16}[reduce_dtype]
    return MixedPrecisionPolicy(param_dtype=param_dtype, reduce_dtype=reduce)


def set_gradient_sync(module: nn.Module, enabled: bool, keep_sharded: bool = False) -> None:
    """Turns the dp gradient reduction of every FSDP2 module under `module` on or off. With
    `keep_sharded`, gradients are still reduce-scattered (accumulated as shards); only the
    all-reduce across replicas waits (nothing under full sharding)."""
    for sub in module.modules():
        if isinstance(sub, FSDPModule):
            if keep_sharded:
                sub.set_requires_all_reduce(enabled, recurse=False)
            else:
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
