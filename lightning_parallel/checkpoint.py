"""Model and optimizer state in the model's own names, whatever the layout.

A checkpoint is a directory written with torch.distributed.checkpoint: every rank writes the
shards it holds of the model and optimizer state, keyed by the model's original parameter names
(the optimizer state flattened per parameter), plus `meta.pt` from rank 0 with the rest of
Lightning's checkpoint (loops, callbacks, hyperparameters). Any layout can read it: DCP reads
into whatever shards the reading ranks hold. It is written under a temporary name and renamed
once every rank has finished, so a checkpoint is complete or absent; `Saver` can write it in the
background while training goes on.
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch import nn
from torch.distributed.tensor import DTensor
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_optimizer_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
)
from torch.optim import Optimizer

META_FILE = "meta.pt"
PARTIAL = ".partial"  # suffix of a checkpoint being written
SHARDED = "lightning_parallel_sharded"  # marks a checkpoint dict loaded from a sharded directory
# Optimizer state keyed per parameter name (param groups too), so it reshards across layouts.
_SHARDED_OPTIM = StateDictOptions(flatten_optimizer_state_dict=True)


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


def sharded_model_state(module: nn.Module) -> dict[str, Any]:
    """The parameters and buffers this rank holds (DTensor shards included), by original name;
    a tied weight once, under its first name (`tied_aliases` gives its others)."""
    aliases = tied_aliases(module)
    return {name: value for name, value in module.state_dict().items() if not value.is_meta and name not in aliases}


def tied_aliases(module: nn.Module) -> dict[str, str]:
    """{other name: first name} of each tensor the state dict holds under more than one name
    (tied weights, such as an output head sharing the input embedding's weight)."""
    first: dict[int, str] = {}
    aliases = {}
    for name, value in module.state_dict(keep_vars=True).items():
        if not isinstance(value, torch.Tensor):
            continue
        if id(value) in first:
            aliases[name] = first[id(value)]
        else:
            first[id(value)] = name
    return aliases


def sharded_optimizer_state(module: nn.Module, optimizer: Optimizer) -> dict[str, Any]:
    return get_optimizer_state_dict(module, optimizer, options=_SHARDED_OPTIM)


def is_sharded_checkpoint(path) -> bool:
    return Path(path, META_FILE).is_file()


def check_complete(path) -> None:
    """Refuses the temporary directory of a save that did not finish."""
    path = str(path).rstrip("/")
    if path.endswith(PARTIAL):
        raise FileNotFoundError(
            f"{path} is an incomplete checkpoint: a save that did not finish (the run died while writing it). "
            f"Resume from an earlier checkpoint (or from {path[: -len(PARTIAL)]}, the one it was replacing, if it exists)."
        )


class Saver:
    """Writes checkpoints, each a complete directory or none (see the module's docstring).

    In the background (`background=True`), `dcp.async_save` copies this rank's shards to CPU
    memory, then writes them on a thread while training goes on, over a process group of its own
    so that its collectives never meet the training's. At most one save is in flight. Rank 0
    moves it into place once its own write has finished, which DCP ends only after every rank's
    (it writes `.metadata` last, from every rank's results). Until then, removals of older
    checkpoints wait: a run that dies mid-write keeps the checkpoint the new one was to replace.
    """

    def __init__(self, timeout) -> None:
        self.timeout = timeout
        self._group = None  # for background writes
        self._in_flight = None  # (future, partial directory, final path)
        self._removals: list[Path] = []

    @property
    def in_flight(self) -> bool:
        return self._in_flight is not None

    def save(self, checkpoint: dict[str, Any], path, is_rank_zero: bool, background: bool = False) -> None:
        """Collective. `checkpoint` is Lightning's dict with sharded "state_dict" and
        "optimizer_states" (as the strategy returns them)."""
        self.wait(is_rank_zero)
        path = Path(path)
        partial = path.with_name(path.name + PARTIAL)
        if is_rank_zero:
            _remove(partial)  # left by a save that died
        dist.barrier()
        tensors = {"state_dict": checkpoint.pop("state_dict"),
                   "optimizer_states": _by_index(checkpoint.pop("optimizer_states", []))}
        if is_rank_zero:
            partial.mkdir(parents=True, exist_ok=True)  # the other ranks may have made it already
            torch.save(checkpoint, partial / META_FILE)
        if background:
            if self._group is None:
                self._group = dist.new_group(backend="gloo", timeout=self.timeout)
            future = dcp.async_save(tensors, checkpoint_id=partial, process_group=self._group)
            self._in_flight = (future, partial, path)
            return
        dcp.save(tensors, checkpoint_id=partial)
        dist.barrier()  # every rank's shards are on disk
        if is_rank_zero:
            _move_into_place(partial, path)
        dist.barrier()

    def poll(self, is_rank_zero: bool) -> None:
        """Finishes the save in flight if its write is done; never waits."""
        if self._in_flight is not None and self._in_flight[0].done():
            self._finish(is_rank_zero)

    def wait(self, is_rank_zero: bool) -> None:
        """Waits for the save in flight, if any, and moves it into place."""
        if self._in_flight is not None:
            self._finish(is_rank_zero)

    def remove(self, path, is_rank_zero: bool) -> None:
        if self._in_flight is not None:
            self._removals.append(Path(path))
        elif is_rank_zero:
            _remove(Path(path))

    def _finish(self, is_rank_zero: bool) -> None:
        (future, partial, path), self._in_flight = self._in_flight, None
        removals, self._removals = self._removals, []
        try:
            future.result()
        except Exception as error:
            raise RuntimeError(f"Writing checkpoint {path} in the background failed; {partial} is left incomplete.") from error
        if is_rank_zero:
            _move_into_place(partial, path)
            for old in removals:
                _remove(old)


def _move_into_place(partial: Path, path: Path) -> None:
    """Renames a finished save to `path`; a checkpoint there is renamed away first, so that the
    name always holds one complete checkpoint, the old or the new."""
    replaced = path.with_name(path.name + ".replaced")
    _remove(replaced)
    if path.exists() or path.is_symlink():
        path.rename(replaced)
    partial.rename(path)
    _remove(replaced)


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    elif path.exists() or path.is_symlink():
        path.unlink()


def load_sharded(path, module: nn.Module, optimizers: list[Optimizer], weights_only) -> dict[str, Any]:
    """Collective. Reads into the current layout's shards in place; returns Lightning's
    checkpoint dict (loops, callbacks, ...) marked as already loaded."""
    checkpoint = torch.load(Path(path, META_FILE), weights_only=bool(weights_only))
    tensors = {"state_dict": sharded_model_state(module),
               "optimizer_states": _by_index(sharded_optimizer_state(module, opt) for opt in optimizers)}
    if not optimizers:
        del tensors["optimizer_states"]
    dcp.load(tensors, checkpoint_id=path)
    for i, opt in enumerate(optimizers):
        set_optimizer_state_dict(module, opt, tensors["optimizer_states"][str(i)], options=_SHARDED_OPTIM)
    checkpoint["state_dict"] = tensors["state_dict"]
    checkpoint["optimizer_states"] = [tensors["optimizer_states"][str(i)] for i in range(len(optimizers))]
    checkpoint[SHARDED] = True
    return checkpoint


def _by_index(optimizer_states) -> dict[str, Any]:
    # String keys: DCP loads non-tensor values (learning rates, steps) back through the
    # dotted key path, whose parts are strings; an int key would receive nothing.
    return {str(i): state for i, state in enumerate(optimizer_states)}


def load_full_model_state(module: nn.Module, state: dict[str, Any], strict: bool = True) -> None:
    """Loads full tensors (an ordinary one-file checkpoint) into the current layout's shards."""
    options = StateDictOptions(full_state_dict=True, strict=strict)
    set_model_state_dict(module, state, options=options)


def consolidate(checkpoint_dir, output_file) -> None:
    """Writes a sharded checkpoint directory as one ordinary Lightning checkpoint file; see
    `lightning_parallel.export.consolidate`, where it lives now."""
    from lightning_parallel.export import consolidate as to_one_file  # export imports this module

    to_one_file(checkpoint_dir, output_file)
