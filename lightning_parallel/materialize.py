"""Models built empty: each rank allocates only what it holds, then initializes it.

A model built under `trainer.init_module(empty_init=True)` or in `configure_model` lives on the
meta device: shapes and no memory. The strategy splits, tensor-parallelizes and shards it there,
then `materialize` allocates this rank's share on the device and `initialize` fills it:
- each module's `reset_parameters()` (Lightning's convention), or the model's own init hook
  (`init_weights()`: Hugging Face models have it, torchtitan's models too) for its whole subtree;
- draws are independent per rank (tensor-parallel shards, FSDP shards and pipeline stages all
  differ), then whatever is replicated over the data- or tensor-parallel group is broadcast
  from its first rank, so replicas are identical. The values are a one-process init's in
  distribution, not in value: exact values come from `init_from` a checkpoint.
Tensors are allocated filled with NaN, so a tensor no init touched is found and refused.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterator
from contextlib import contextmanager

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor import DTensor, Replicate

from lightning_parallel.layout import LayoutError

_META = torch.device("meta")


def is_empty(module: nn.Module) -> bool:
    """Whether `module` was built on the meta device (any of its tensors is)."""
    return any(t.is_meta for t in _tensors(module))


@contextmanager
def empty_init() -> Iterator[None]:
    """Builds modules on the meta device. A `load_state_dict` into them would silently load
    nothing (torch only warns): that is refused."""
    with torch.device(_META), warnings.catch_warnings():
        warnings.filterwarnings("error", message=r".*meta parameter in the current model, which is a no-op")
        try:
            yield
        except UserWarning as warning:
            if "meta parameter in the current model" not in str(warning):
                raise
            raise LayoutError(
                "The model was loaded with weights while it was built on the meta device (inside configure_model or "
                "trainer.init_module(empty_init=True)), where tensors hold no values and the load does nothing. "
                "Build it empty and give the weights with HybridParallel(init_from=CHECKPOINT) instead."
            ) from warning


# ------------------------------------------------------------------------ what initializes what


def _hook(module: nn.Module):
    """The module's own init for its whole subtree, if it has one."""
    init = getattr(module, "init_weights", None)
    return init if callable(init) else None


def _reset(module: nn.Module):
    """The module's init for its own tensors. torch.nn built-ins spell it `_reset_parameters`
    in places (MultiheadAttention)."""
    reset = getattr(module, "reset_parameters", None)
    if reset is None and type(module).__module__.startswith("torch.nn."):
        reset = getattr(module, "_reset_parameters", None)
    return reset if callable(reset) else None


def _own_tensors(module: nn.Module) -> list[tuple[str, torch.Tensor]]:
    return [(n, t) for n, t in [*module._parameters.items(), *module._buffers.items()] if t is not None]


def _initializers(module: nn.Module, prefix: str = "") -> Iterator[tuple[str, nn.Module, object, list[str]]]:
    """(name, module, init, names of the tensors it sets) for every module to initialize,
    outermost first; init is None for a module that holds tensors and has no way to initialize them."""
    hook = _hook(module)
    if hook is not None:
        yield prefix, module, hook, [f"{prefix}{n}" for n, _ in _named_tensors(module)]
        return
    if _own_tensors(module):
        yield prefix, module, _reset(module), [f"{prefix}{n}" for n, _ in _own_tensors(module)]
    for name, child in module.named_children():
        yield from _initializers(child, f"{prefix}{name}.")


def check_initializable(module: nn.Module, loaded: set[str] = frozenset()) -> None:
    """Refuses, on every rank alike (before any collective), a model with tensors nothing can
    initialize. `loaded`: names a checkpoint (init_from) provides."""
    missing = [
        f"{prefix[:-1] or type(module).__name__} ({type(sub).__name__}: {', '.join(n[len(prefix):] for n in names)})"
        for prefix, sub, init, names in _initializers(module)
        if init is None and not all(n in loaded for n in names)
    ]
    _refuse_empty_metrics(module)
    if missing:
        raise LayoutError(
            f"{type(module).__name__} was built empty (on the meta device, by trainer.init_module(empty_init=True) or "
            "in configure_model) and is initialized after sharding, but these modules hold tensors and have no way to "
            f"initialize them: {'; '.join(missing)}. Give each a reset_parameters() that sets its own tensors "
            "(Lightning's convention), or the model an init_weights() that initializes everything, or load the "
            "weights with HybridParallel(init_from=CHECKPOINT); or build the model outside empty init."
        )


def _refuse_empty_metrics(module: nn.Module) -> None:
    """A torchmetrics metric built on meta has lost its states' starting values (zeros, -inf...),
    which no init knows how to restore."""
    empty = [name or type(module).__name__ for name, sub in module.named_modules()
             if any(isinstance(v, torch.Tensor) and v.is_meta for v in _metric_defaults(sub))]
    if empty:
        raise LayoutError(
            f"The metric(s) {', '.join(empty)} were built empty (on the meta device, under "
            "trainer.init_module(empty_init=True) or in configure_model) and have lost their states' starting "
            "values. Create metrics outside empty init: in setup(), or build only the network in configure_model."
        )


def _metric_defaults(module: nn.Module) -> list:
    """A torchmetrics metric's states' starting values (none for other modules)."""
    return list(getattr(module, "_defaults", {}).values()) if hasattr(module, "add_state") else []


# ------------------------------------------------------------------------ allocating


@contextmanager
def _swapping_parameters() -> Iterator[None]:
    """to_empty keeps each Parameter object (swapping its contents): tied weights stay tied, and
    references held elsewhere (pipeline stages, the optimizer-to-be) stay valid."""
    before = torch.__future__.get_swap_module_params_on_conversion()
    torch.__future__.set_swap_module_params_on_conversion(True)
    try:
        yield
    finally:
        torch.__future__.set_swap_module_params_on_conversion(before)


def _nan_like(t: torch.Tensor, device) -> torch.Tensor:
    empty = torch.empty_like(t, device=device)
    return empty.fill_(float("nan")) if empty.is_floating_point() else empty


@torch.no_grad()
def materialize(module: nn.Module, roots: list[nn.Module], held: set[str] | None, device: torch.device) -> None:
    """Allocates on `device` the tensors this rank holds: everything under `roots` (each wrapped
    by data parallelism, whose shards are what gets allocated), and, of the rest of `module`,
    the tensors named in `held` (all, if None). Other pipeline stages' tensors stay on meta."""
    with _swapping_parameters():
        for root in roots:
            root._apply(lambda t: _nan_like(t, device) if t.is_meta else t)
    for name, owner, attr, t in _named_slots(module):
        if t.is_meta and (held is None or name in held):
            if isinstance(t, nn.Parameter):
                torch.utils.swap_tensors(t, nn.Parameter(_nan_like(t, device), requires_grad=t.requires_grad))
            else:
                owner._buffers[attr] = _nan_like(t, device)


def move_real_tensors(module: nn.Module, device: torch.device) -> None:
    """Moves the tensors of a partly empty model that do hold values (a metric's states, say)."""
    module._apply(lambda t: t if t.is_meta else t.to(device))
    set_device(module, device)


def set_device(module: nn.Module, device: torch.device) -> None:
    """What Lightning's `module.device` reports (it follows `.to()`, which meta tensors refuse)."""
    for sub in module.modules():
        if hasattr(sub, "_device"):
            sub._device = device


def _named_slots(module: nn.Module):
    for prefix, sub in module.named_modules(remove_duplicate=False):
        for attr, t in _own_tensors(sub):
            yield f"{prefix}.{attr}" if prefix else attr, sub, attr, t


def _named_tensors(module: nn.Module) -> list[tuple[str, torch.Tensor]]:
    return [*module.named_parameters(remove_duplicate=False), *module.named_buffers(remove_duplicate=False)]


def _tensors(module: nn.Module) -> list[torch.Tensor]:
    return [*module.parameters(), *module.buffers()]


# ------------------------------------------------------------------------ initializing


@torch.no_grad()
def initialize(module: nn.Module, device: torch.device, mesh: DeviceMesh, seed: int, loaded: set[str] = frozenset(),
               expert_mesh: DeviceMesh | None = None) -> None:
    """Runs the inits of what this rank holds (of modules not wholly `loaded` by a checkpoint),
    with a seed of its own (`seed` is the same on every rank), and makes replicas equal (the
    experts' over the `expert_mesh` dims that replicate them)."""
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []), _quiet_cpu_dtensor_rng():
        _seed_this_rank(seed, mesh, device)
        run_inits(module, loaded)
    tensors = _tensors(module)
    _make_replicas_equal([t for t in tensors if not _is_expert(t)], mesh, ("tp", "dp_shard", "dp_replicate"))
    if expert_mesh is not None:
        _make_replicas_equal([t for t in tensors if _is_expert(t)], expert_mesh, ("tp", "edp_shard", "edp_replicate"))


@torch.no_grad()
def run_inits(module: nn.Module, loaded: set[str] = frozenset()) -> None:
    """Calls each init that sets something this rank holds and a checkpoint does not provide."""
    for _, sub, init, names in _initializers(module):
        holds = any(not t.is_meta for t in _tensors(sub))
        if init is not None and holds and not all(n in loaded for n in names):
            init()


def _seed_this_rank(seed: int, mesh: DeviceMesh, device: torch.device) -> None:
    coordinate = dict(zip(mesh.mesh_dim_names, mesh.get_coordinate()))
    if device.type == "cuda":
        # DTensor's CUDA random ops draw each shard as its part of one tensor when every rank of
        # a pipeline stage has the same seed; the tracker must exist before the first draw, or
        # DTensor creates it by broadcasting rank 0's state (one seed for all stages).
        from torch.distributed.tensor._random import manual_seed

        manual_seed(seed + 1_000_003 * coordinate["pp"], mesh)
    else:
        # On CPU DTensor draws every shard locally from the global generator: a seed per rank.
        torch.manual_seed(seed + 1_000_003 * dist.get_rank())


@contextmanager
def _quiet_cpu_dtensor_rng() -> Iterator[None]:
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="DTensor random operators may not have complete support")
        yield


def _is_expert(t: torch.Tensor) -> bool:
    """Whether `t` is an expert-parallel parameter (a DTensor on the experts' mesh)."""
    return isinstance(t, DTensor) and "ep" in (t.device_mesh.mesh_dim_names or ())


def _make_replicas_equal(tensors: list[torch.Tensor], mesh: DeviceMesh, dims: tuple[str, ...]) -> None:
    """Broadcasts each tensor replicated over one of `mesh`'s tensor- or data-parallel `dims` from
    the dim's first rank (a plain tensor is replicated over every dim; a DTensor where it is not
    sharded)."""
    for dim in dims:
        if mesh[dim].size() == 1:
            continue
        group = mesh[dim].get_group()
        for t in tensors:
            if not t.is_meta and _replicated_over(t, dim):
                local = t.to_local() if isinstance(t, DTensor) else t
                dist.broadcast(local.data, group=group, group_src=0)


def _replicated_over(t: torch.Tensor, dim: str) -> bool:
    if not isinstance(t, DTensor) or dim not in (t.device_mesh.mesh_dim_names or ()):
        return True
    return isinstance(t.placements[t.device_mesh.mesh_dim_names.index(dim)], Replicate)


def uninitialized(module: nn.Module) -> list[str]:
    """Tensors still holding the NaN they were allocated with: ones no init set."""
    found = []
    for name, owner, _, t in _named_slots(module):
        local = t.to_local() if isinstance(t, DTensor) else t
        if not t.is_meta and local.is_floating_point() and bool(local.isnan().any()):
            found.append(f"{name} ({type(owner).__name__})")
    return found


def refuse_uninitialized(names: list[str]) -> None:
    if names:
        raise LayoutError(
            f"{', '.join(names)} not initialized: the model was built empty (on the meta device) and neither its "
            "module's reset_parameters() nor the model's init_weights() set them. Make the init set every parameter "
            "and buffer the module holds (buffers computed in __init__ too), or give their values with "
            "HybridParallel(init_from=CHECKPOINT)."
        )
