"""The parallel degrees of a run, their checks, and the device mesh built from them.

Every rank computes the same `Layout` from the same arguments and world size, so a bad
configuration raises on every rank before any process group exists.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Union

import torch
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh

# Outermost to innermost. Tensor parallelism is innermost so that its groups, which talk
# the most, are made of consecutive ranks and so stay inside one node; for the same reason
# FSDP's shard groups (all-gathers in every block) sit inside the replicas (one all-reduce).
MESH_DIMS = ("pp", "dp_replicate", "dp_shard", "tp")
# The experts' mesh: the same ranks in the same order, the data-parallel ones regrouped as
# (edp_replicate x edp_shard) x ep, ep innermost (a rank's dp index is edp index * ep + ep index).
# Each ep group holds every expert once, spread over ranks that read different batches.
EXPERT_MESH_DIMS = ("pp", "edp_replicate", "edp_shard", "ep", "tp")
SHARDING_CHOICES = ("none", "full", "hybrid")

Degree = Union[int, str]


class LayoutError(ValueError):
    """A parallel configuration that cannot run. The message names the problem and the fix."""


def check_degree(name: str, value: Degree, allow_auto: bool = False) -> None:
    """Rejects a degree that is not a positive int (or "auto" where allowed)."""
    if allow_auto and value == "auto":
        return
    if isinstance(value, bool) or not isinstance(value, int):
        hint = ' or "auto"' if allow_auto else ""
        raise LayoutError(f"{name} must be a positive int{hint}, got {value!r} ({type(value).__name__}).")
    if value < 1:
        raise LayoutError(f"{name} must be >= 1, got {value}. Use 1 to turn this form of parallelism off.")


def check_type(name: str, value: Any, expected: tuple[type, ...], what: str) -> None:
    """Rejects a value of the wrong type now, rather than letting it mean something else later
    (e.g. the string "no" is true)."""
    if not isinstance(value, expected) or (isinstance(value, bool) and bool not in expected):
        raise LayoutError(f"{name} must be {what}, got {value!r} ({type(value).__name__}).")


def check_sharding(sharding: str) -> None:
    if sharding not in SHARDING_CHOICES:
        raise LayoutError(
            f"sharding={sharding!r} is not one of {SHARDING_CHOICES}: use 'none' to replicate parameters "
            "(gradients all-reduced, as DDP does) or 'full' to shard parameters, gradients and optimizer "
            "state over the data-parallel ranks (FSDP2), or 'hybrid' to shard within groups of "
            "data_parallel_shard ranks (a node) and replicate across them (HSDP)."
        )


def check_shard_degree(sharding: str, data_parallel_shard: Degree) -> None:
    check_degree("data_parallel_shard", data_parallel_shard, allow_auto=True)
    if data_parallel_shard != "auto" and sharding != "hybrid":
        raise LayoutError(
            f"data_parallel_shard={data_parallel_shard!r} applies to sharding='hybrid' only (sharding={sharding!r}): "
            "set sharding='hybrid', or leave data_parallel_shard unset."
        )


def resolve_shard_degree(sharding: str, dp: int, data_parallel_shard: Degree, per_node: int) -> int:
    """How many data-parallel ranks shard parameters among themselves: 1 when replicating, all
    of them under full sharding, `data_parallel_shard` under hybrid sharding (by default the
    data-parallel ranks of a node, `per_node`, as far as they divide dp)."""
    check_shard_degree(sharding, data_parallel_shard)
    if sharding != "hybrid":
        return dp if sharding == "full" else 1
    if data_parallel_shard == "auto":
        return math.gcd(dp, max(1, per_node))
    if dp % data_parallel_shard:
        raise LayoutError(
            f"data_parallel_shard={data_parallel_shard} does not divide the data-parallel degree {dp}: hybrid sharding "
            f"splits the {dp} data-parallel ranks into replicas of data_parallel_shard ranks each. Choose a divisor of {dp} "
            "(the devices of a node, typically)."
        )
    return data_parallel_shard


def check_expert_degree(ep: int, dp: int, dp_shard: int, sharding: str) -> None:
    """Expert parallelism shards experts over `ep` of the data-parallel ranks: it must divide dp,
    and under hybrid sharding nest with the shard groups."""
    check_degree("expert_parallel", ep)
    if dp % ep:
        raise LayoutError(
            f"expert_parallel={ep} does not divide the data-parallel degree {dp}: experts are sharded over groups of "
            f"expert_parallel data-parallel ranks (each reading its own batch), and the {dp} data-parallel ranks must "
            f"form whole groups. Choose a divisor of {dp}, or raise data_parallel."
        )
    if sharding == "hybrid" and dp_shard % ep and ep % dp_shard:
        raise LayoutError(
            f"expert_parallel={ep} and data_parallel_shard={dp_shard}: under sharding='hybrid' one must divide the "
            "other, so that a group of expert ranks lies inside one shard group (a node) or spans whole ones. "
            "Choose an expert_parallel that divides data_parallel_shard (or a multiple of it)."
        )


@dataclass(frozen=True)
class Layout:
    """Degrees of pipeline (pp), data (dp) and tensor (tp) parallelism; pp * dp * tp == world size.
    The dp ranks form dp_replicate groups of dp_shard ranks: parameters are sharded within a
    group and replicated across groups (dp_shard is 1 when replicating, dp under full sharding).
    Experts (of a mixture-of-experts model) are sharded over groups of ep consecutive dp ranks,
    and sharded or replicated over the edp = dp / ep ranks that hold the same experts as the
    dense parameters are over dp."""

    pp: int
    dp: int
    tp: int
    dp_shard: int = 1
    ep: int = 1

    @classmethod
    def resolve(cls, world_size: int, data_parallel: Degree, tensor_parallel: int, pipeline_parallel: int,
                sharding: str = "none", data_parallel_shard: Degree = "auto", per_node: int = 1,
                expert_parallel: int = 1) -> Layout:
        """Fills in data_parallel="auto" (and data_parallel_shard) and checks that the degrees
        tile the world exactly."""
        check_degree("data_parallel", data_parallel, allow_auto=True)
        check_degree("tensor_parallel", tensor_parallel)
        check_degree("pipeline_parallel", pipeline_parallel)
        check_sharding(sharding)
        model_parallel = tensor_parallel * pipeline_parallel
        if data_parallel == "auto":
            if world_size % model_parallel:
                raise LayoutError(
                    f"The world size {world_size} (devices x num_nodes) is not divisible by "
                    f"tensor_parallel x pipeline_parallel = {tensor_parallel} x {pipeline_parallel} = "
                    f"{model_parallel}, so data_parallel='auto' has no whole value. Launch a multiple of "
                    f"{model_parallel} processes or change the degrees."
                )
            data_parallel = world_size // model_parallel
        if data_parallel * model_parallel != world_size:
            raise LayoutError(
                f"pipeline_parallel x data_parallel x tensor_parallel = {pipeline_parallel} x {data_parallel} x "
                f"{tensor_parallel} = {data_parallel * model_parallel}, but the world size (devices x num_nodes) "
                f"is {world_size}. Make the product equal the number of processes, or set data_parallel='auto'."
            )
        # tp is the innermost dim: a node of `per_node` processes holds per_node / tp data-parallel ranks.
        dp_shard = resolve_shard_degree(sharding, data_parallel, data_parallel_shard, per_node // tensor_parallel)
        check_expert_degree(expert_parallel, data_parallel, dp_shard, sharding)
        return cls(pp=pipeline_parallel, dp=data_parallel, tp=tensor_parallel, dp_shard=dp_shard, ep=expert_parallel)

    @property
    def dp_replicate(self) -> int:
        return self.dp // self.dp_shard

    @property
    def edp(self) -> int:
        """The data-parallel ranks that hold the same experts."""
        return self.dp // self.ep

    @property
    def edp_shard(self) -> int:
        """Of those, how many shard the experts among themselves: the shard groups of the dense
        parameters regrouped (an ep group inside a shard group leaves dp_shard / ep of them;
        one spanning shard groups, 1)."""
        return self.dp_shard // self.ep if self.dp_shard % self.ep == 0 else 1

    @property
    def world_size(self) -> int:
        return self.pp * self.dp * self.tp

    def build_mesh(self, device_type: str) -> tuple[DeviceMesh, DeviceMesh]:
        """The (pp, dp_replicate, dp_shard, tp) mesh, and its data-parallel ranks as one dim "dp"
        (what a sampler, metrics and Lightning's reductions use). Keep the second: slicing a
        flattened dim out of the root mesh is deprecated."""
        shape = (self.pp, self.dp_replicate, self.dp_shard, self.tp)
        mesh = init_device_mesh(device_type, shape, mesh_dim_names=MESH_DIMS)
        # DeviceMesh has no public way to merge dims in torch 2.13 (_flatten is torchtitan's way too).
        # Modules written for Lightning's ModelParallelStrategy ask for the long names.
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            dp_mesh = mesh["dp_replicate", "dp_shard"]._flatten("dp")
            mesh["dp_replicate", "dp_shard"]._flatten("data_parallel")
            mesh["tp"]._flatten("tensor_parallel")
        return mesh, dp_mesh

    def build_expert_mesh(self, device_type: str) -> DeviceMesh:
        """The experts' (pp, edp_replicate, edp_shard, ep, tp) mesh over the same ranks, in the
        same order as `build_mesh`'s (see EXPERT_MESH_DIMS)."""
        shape = (self.pp, self.edp // self.edp_shard, self.edp_shard, self.ep, self.tp)
        return init_device_mesh(device_type, shape, mesh_dim_names=EXPERT_MESH_DIMS)

    def __str__(self) -> str:
        experts = f" (experts over ep={self.ep} x edp={self.edp})" if self.ep > 1 else ""
        if 1 < self.dp_shard < self.dp:
            return (f"pp={self.pp} x dp={self.dp} ({self.dp_replicate} replicas x {self.dp_shard} shards){experts} "
                    f"x tp={self.tp}")
        return f"pp={self.pp} x dp={self.dp}{experts} x tp={self.tp}"


def tensor_groups_across_nodes(layout: Layout, node_of_rank: Sequence[int]) -> list[list[int]]:
    """The tensor-parallel groups (lists of global ranks) whose ranks are on more than one node.
    tp is the innermost mesh dim, so each group is a run of `layout.tp` consecutive ranks."""
    groups = [list(range(start, start + layout.tp)) for start in range(0, layout.world_size, layout.tp)]
    return [group for group in groups if len({node_of_rank[rank] for rank in group}) > 1]


def default_backend(device: torch.device) -> str:
    return "nccl" if device.type == "cuda" else "gloo"


def check_backend(backend: str | None, device: torch.device) -> None:
    """Rejects accelerators and backends that cannot run this layout, before the process group starts."""
    if device.type not in ("cpu", "cuda"):
        raise LayoutError(
            f"HybridParallel runs on CPU (gloo) and CUDA (nccl) devices, not on {device.type!r}. "
            "Use accelerator='cpu' or accelerator='cuda'."
        )
    if backend is None:
        return
    # A composite backend such as "cpu:gloo,cuda:nccl" names one backend per device type.
    per_device = dict(part.split(":", 1) for part in backend.split(",")) if ":" in backend else None
    chosen = per_device.get(device.type) if per_device else backend
    if chosen is None:
        raise LayoutError(f"backend={backend!r} names no backend for {device.type!r} devices; add '{device.type}:...'.")
    if chosen == "nccl" and device.type != "cuda":
        raise LayoutError(
            f"backend='nccl' needs CUDA devices, but the accelerator is {device.type!r}. "
            "Use backend='gloo' (or leave backend unset) on CPU."
        )
    if chosen == "gloo" and device.type == "cuda":
        raise LayoutError(
            "backend='gloo' cannot run FSDP2's reduce-scatter on CUDA tensors. Use backend='nccl' "
            "(or leave backend unset) on GPUs."
        )
    if chosen not in ("gloo", "nccl", "mpi", "ucc", "xccl"):
        raise LayoutError(f"Unknown process-group backend {chosen!r}: use 'gloo' on CPU or 'nccl' on CUDA.")
