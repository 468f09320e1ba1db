"""Pretrained weights into a model's materialized tensors, each rank reading only its slices.

Three forms are accepted (see `checkpoint_kind`): a Hugging Face directory of safetensors, a
lightning-parallel checkpoint directory (torch.distributed.checkpoint), or one torch/Lightning
checkpoint file. The first two are read with DCP, which asks storage for the regions each rank
holds; the file is memory-mapped, and each rank copies only its region of each tensor.
Tensors on the meta device (other pipeline stages') are left alone.
"""

from __future__ import annotations

import pickle
import warnings
import zipfile
from collections import Counter
from pathlib import Path

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch import nn
from torch.distributed.checkpoint import FileSystemReader, HuggingFaceStorageReader
from torch.distributed.checkpoint.metadata import TensorStorageMetadata
from torch.distributed.tensor import DTensor

from lightning_parallel.checkpoint import META_FILE, check_complete

FORMS = ("a Hugging Face model directory (holding *.safetensors), a lightning-parallel checkpoint "
         f"directory (holding {META_FILE}), or one torch/Lightning checkpoint file (torch.save)")
_MODEL_KEYS = "state_dict."  # prefix of the model's keys in a lightning-parallel checkpoint


class Loaded(list):
    """The module's state_dict names that were loaded (tied names included). `unused`: the
    checkpoint's keys that name no tensor of the module, for the caller to warn about."""

    unused: list[str]
    missing: list[str]  # (every rank's) held tensors the checkpoint lacks, when not strict


def checkpoint_kind(path) -> str:
    """'hf', 'sharded' or 'file'; raises FileNotFoundError/ValueError for anything else."""
    p = Path(path)
    if not p.exists():
        raise FileNotFoundError(f"init_from: {p} does not exist. Expected {FORMS}.")
    if p.is_dir():
        check_complete(p)
        if (p / META_FILE).is_file():
            return "sharded"
        if any(p.glob("*.safetensors")):
            return "hf"
        raise ValueError(f"init_from: the directory {p} holds neither *.safetensors nor {META_FILE}. Expected {FORMS}.")
    if p.suffix == ".safetensors":
        raise ValueError(f"init_from: {p} is one safetensors file; pass the directory holding it. Expected {FORMS}.")
    if not zipfile.is_zipfile(p):  # torch.save's format; the legacy one cannot be memory-mapped
        raise ValueError(f"init_from: {p} is not a torch.save file. Expected {FORMS}.")
    return "file"


def load_weights(module: nn.Module, path, strict: bool = True) -> Loaded:
    """Collective: every rank calls it. Overwrites the parameters and persistent buffers this
    rank holds (names as in module.state_dict(); meta tensors skipped) from `path`, reading only
    this rank's regions. The checkpoint's keys may name the tensors under a child module (a
    Hugging Face model held as `self.model`): the prefix matching the most keys is used.
    Raises on every rank, before reading, if a held tensor differs in shape, is absent (unless
    not `strict`: then the absent ones are listed in `missing` and keep their values), or if
    the checkpoint cannot be opened on some rank."""
    with torch.no_grad():
        try:
            kind, source, shapes, prefix, names = _open(module, path)
            plan, loaded, problems = _match(module, prefix, shapes)
            failure = None
        except Exception as error:  # raised on every rank below, not only on this one
            failure, problems = error, ([], [])
        failures, problems = _everyones(None if failure is None else repr(failure), problems)
        if failure is not None:
            raise failure
        if failures:
            raise RuntimeError(f"init_from {path} could not be opened on every rank: {failures}")
        missing, mismatched = problems
        _raise_if_any((missing if strict else [], mismatched), path, kind, prefix, shapes)
        if kind == "file":
            _copy_regions(plan, source)
        else:
            _dcp_load(kind, path, plan)
    loaded = Loaded(loaded)
    loaded.missing = sorted(missing)
    module_keys = {n[len(prefix):] for n in names if n.startswith(prefix)}
    loaded.unused = sorted(set(shapes) - module_keys)
    return loaded


def checkpoint_names(module: nn.Module, path) -> set[str]:
    """The module's tensor names (those of every rank, meta ones too) that `path` provides,
    tied names included: what init need not set. Reads only the checkpoint's key list."""
    _, _, shapes, prefix, names = _open(module, path)
    tensors = module.state_dict(keep_vars=True)
    provided = {id(tensors[n]) for n in names if n.startswith(prefix) and n[len(prefix):] in shapes}
    return {n for n in names if id(tensors[n]) in provided}


def _open(module: nn.Module, path):
    """The checkpoint's kind, its tensors (memory-mapped, for 'file'), their global shapes, the
    module prefix its keys name, and the module's tensor names."""
    kind = checkpoint_kind(path)
    source = _open_file(path) if kind == "file" else None
    shapes = {k: v.shape for k, v in source.items()} if kind == "file" else _dcp_shapes(kind, path)
    names = [n for n, t in module.state_dict(keep_vars=True).items() if isinstance(t, torch.Tensor)]
    return kind, source, shapes, _prefix(names, shapes, path), names


def _open_file(path) -> dict[str, torch.Tensor]:
    try:
        checkpoint = torch.load(path, mmap=True, weights_only=True, map_location="cpu")
    except pickle.UnpicklingError:
        # Lightning checkpoints may carry hyperparameters of arbitrary classes, which the
        # restricted unpickler refuses; the file is the user's own, as for Trainer(ckpt_path=...).
        checkpoint = torch.load(path, mmap=True, weights_only=False, map_location="cpu")
    if isinstance(checkpoint, dict) and isinstance(checkpoint.get("state_dict"), dict):
        checkpoint = checkpoint["state_dict"]
    if not isinstance(checkpoint, dict):
        raise ValueError(f"init_from: {path} holds a {type(checkpoint).__name__}, not a dict with "
                         f"'state_dict' nor a state dict. Expected {FORMS}.")
    return {k: v for k, v in checkpoint.items() if isinstance(v, torch.Tensor)}


def _dcp_shapes(kind: str, path) -> dict[str, torch.Size]:
    """Keys and global shapes from the metadata alone (safetensors headers, DCP's .metadata)."""
    if kind == "hf":
        entries = HuggingFaceStorageReader(str(path)).read_metadata().state_dict_metadata
        prefix = ""
    else:
        entries = FileSystemReader(str(path)).read_metadata().state_dict_metadata
        prefix = _MODEL_KEYS
    return {k[len(prefix):]: md.size for k, md in entries.items()
            if k.startswith(prefix) and isinstance(md, TensorStorageMetadata)}


def _prefix(names: list[str], shapes: dict, path) -> str:
    """The module prefix ('' or 'child.') under which the checkpoint's keys name the most of
    the module's tensors. All names count, meta ones too, so that every rank agrees."""
    counts: Counter[str] = Counter()
    for name in names:
        starts = [0] + [i + 1 for i, c in enumerate(name) if c == "."]
        counts.update(name[:i] for i in starts if name[i:] in shapes)
    if not counts:
        raise ValueError(f"init_from: no key of {path} names a tensor of the module under any prefix: "
                         f"the module has {_sample(names)}; the checkpoint has {_sample(shapes)}.")
    return max(counts, key=lambda p: (counts[p], -len(p)))


def _match(module: nn.Module, prefix: str, shapes: dict):
    """plan: checkpoint key -> this rank's tensor (each tensor once), the loaded names, and
    (missing, mismatched) names."""
    held = {n: t for n, t in module.state_dict(keep_vars=True).items()
            if isinstance(t, torch.Tensor) and not t.is_meta}
    plan, planned, missing, mismatched = {}, set(), [], []
    for name, tensor in held.items():
        key = name[len(prefix):] if name.startswith(prefix) else None
        if key not in shapes:
            missing.append(name)
        elif tuple(shapes[key]) != tuple(tensor.shape):
            mismatched.append(f"{name}: module {tuple(tensor.shape)}, checkpoint {tuple(shapes[key])}")
        elif id(tensor) not in planned:
            plan[key] = tensor
            planned.add(id(tensor))
    # A tied tensor (lm_head.weight is embed_tokens.weight) is loaded under its other name.
    missing = [n for n in missing if id(held[n]) not in planned]
    loaded = [n for n, t in held.items() if id(t) in planned]
    return plan, loaded, (missing, mismatched)


def _everyones(failure: str | None, problems):
    """Every rank's failure and problems, so that all ranks raise before DCP's collectives."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return [], problems
    gathered = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, (failure, problems))
    failures = [f"rank {rank}: {f}" for rank, (f, _) in enumerate(gathered) if f is not None]
    return failures, tuple(sorted({x for _, part in gathered for x in part[i]}) for i in range(2))


def _raise_if_any(problems, path, kind, prefix, shapes) -> None:
    missing, mismatched = problems
    where = f"init_from {path} ({kind}, read under the module prefix {prefix!r})"
    errors = []
    if missing:
        errors.append(f"lacks {len(missing)} of the module's tensors: {_sample(missing)}; "
                      f"the checkpoint has {len(shapes)} tensors: {_sample(shapes)}")
    if mismatched:
        errors.append(f"{len(mismatched)} shape(s) differ: {_sample(mismatched)}")
    if errors:
        raise ValueError(f"{where}: " + "; and ".join(errors) + ".")


def _sample(items, n: int = 8) -> str:
    items = sorted(items)
    more = f", ... ({len(items) - n} more)" if len(items) > n else ""
    return ", ".join(items[:n]) + more


def _dcp_load(kind: str, path, plan: dict) -> None:
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")  # one process
        if kind == "hf":
            dcp.load(plan, storage_reader=HuggingFaceStorageReader(str(path)))
        else:  # the model's keys only: the optimizer state beside them is never read
            dcp.load({"state_dict": plan}, checkpoint_id=str(path))


def _copy_regions(plan: dict, source: dict[str, torch.Tensor]) -> None:
    """Copies this rank's region of each memory-mapped tensor; only its pages are read."""
    for key, tensor in plan.items():
        full = source[key]
        if isinstance(tensor, DTensor):
            if tensor.device_mesh.get_coordinate() is None:
                continue
            full, tensor = full[_region(tensor)], tensor.to_local()
        # The slice is taken on the host; copy_ moves and converts just that much.
        tensor.copy_(full)


def _region(tensor: DTensor) -> tuple[slice, ...]:
    """The local shard's place in the global tensor (FSDP2's uneven and strided shards too)."""
    chunks = tensor.__create_chunk_list__()
    local_shape = tuple(tensor.to_local().shape)
    if len(chunks) != 1 or tuple(chunks[0].sizes) != local_shape:
        raise RuntimeError(f"unexpected DTensor layout {tensor.placements}: chunks {chunks}, local {local_shape}")
    return tuple(slice(o, o + s) for o, s in zip(chunks[0].offsets, chunks[0].sizes))
