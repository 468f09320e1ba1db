"""A checkpoint directory for use without lightning-parallel: one Lightning checkpoint file, or a
Hugging Face model directory.

Both read only the model's entries of the directory (`state_dict.*`), one read per tensor into
tensors allocated from the directory's metadata; the optimizer state, often twice the model,
is never read. Neither needs a process group.
"""

from __future__ import annotations

import sys
import warnings
from pathlib import Path
from typing import Any

import torch
import torch.distributed.checkpoint as dcp
from torch import nn
from torch.distributed.checkpoint.metadata import TensorStorageMetadata

from lightning_parallel.checkpoint import META_FILE, check_complete, is_sharded_checkpoint, tied_aliases

HF_KEY = "hugging_face"  # meta.pt's record of the Hugging Face model the LightningModule wraps
TIED_KEY = "tied_weights"  # meta.pt's {other name: first name} of tied weights, which the directory holds once
MODEL_KEY = "state_dict"  # the model's entries in the directory; the optimizer's are "optimizer_states"


class ExportError(ValueError):
    """A checkpoint that cannot be exported as asked; the message names the fix."""


def consolidate(checkpoint_dir, output_file) -> None:
    """Writes a sharded checkpoint directory as one ordinary Lightning checkpoint file (full
    tensors under the model's own names) that `MyModule.load_from_checkpoint` loads on one
    process. The optimizer state is left out: it is kept per parameter name, not in torch's
    per-optimizer format, and a one-file checkpoint is for inference."""
    checkpoint = read_meta(checkpoint_dir)
    state = read_model_state(checkpoint_dir)
    for alias, name in checkpoint.get(TIED_KEY, {}).items():  # one tensor under both names, as in the module
        state[alias] = state[name]
    checkpoint["state_dict"] = state
    torch.save(checkpoint, output_file)


def read_meta(checkpoint_dir) -> dict[str, Any]:
    """Lightning's checkpoint dict without its tensors (loops, callbacks, hyperparameters...)."""
    checkpoint_dir = Path(checkpoint_dir)
    check_complete(checkpoint_dir)
    if not is_sharded_checkpoint(checkpoint_dir):
        raise FileNotFoundError(
            f"{checkpoint_dir} is not a lightning-parallel checkpoint directory (no {META_FILE}). "
            "Pass the directory HybridParallel saved (ModelCheckpoint's or trainer.save_checkpoint's path)."
        )
    return torch.load(checkpoint_dir / META_FILE, weights_only=False)


def read_model_state(checkpoint_dir, prefix: str = "") -> dict[str, Any]:
    """The model's entries whose names start with `prefix`, as full CPU tensors (and the
    non-tensor entries, such as modules' extra state); nothing else is read."""
    metadata = dcp.FileSystemReader(checkpoint_dir).read_metadata()
    wanted: dict[str, Any] = {MODEL_KEY: {}}
    for key, entry in metadata.state_dict_metadata.items():
        path = _object_path(metadata, key)
        if path[0] == MODEL_KEY and str(path[1]).startswith(prefix):
            _put(wanted, path, _empty_like(entry))
    if wanted[MODEL_KEY]:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*assuming the intent is to load in a single process")
            dcp.load(wanted, checkpoint_id=checkpoint_dir, no_dist=True)
    return wanted[MODEL_KEY]


def _object_path(metadata, key: str) -> tuple:
    # DCP flattens nested dicts by joining keys with dots, and parameter names hold dots too:
    # the saved mapping gives the real path (names are split at the first dot if it is absent).
    mappings = metadata.planner_data if isinstance(metadata.planner_data, dict) else {}
    return tuple(mappings.get(key, key.split(".", 1)))


def _empty_like(entry):
    if isinstance(entry, TensorStorageMetadata):
        return torch.empty(entry.size, dtype=entry.properties.dtype)
    return None  # a pickled object: DCP puts what it reads in its place


def _put(root: dict, path: tuple, leaf) -> None:
    """Sets root[path[0]][path[1]]... = leaf, making the dicts (lists for integer keys) on the way."""
    node: Any = root
    for i, key in enumerate(path):
        last = i == len(path) - 1
        value = leaf if last else ([] if isinstance(path[i + 1], int) else {})
        if isinstance(node, list):
            node.extend([None] * (key + 1 - len(node)))
            if last or node[key] is None:
                node[key] = value
        elif last or key not in node:
            node[key] = value
        node = node[key]


# ------------------------------------------------------------------------------- Hugging Face


def hf_record(lightning_module: nn.Module) -> dict[str, Any] | None:
    """What `export_hf` needs to rebuild the Hugging Face model the module wraps: its name in
    the module (as a prefix of the parameter names), its config and its class. None unless the
    module holds exactly one `transformers.PreTrainedModel` (outside any other)."""
    modeling = sys.modules.get("transformers.modeling_utils")
    if modeling is None:  # not imported: no PreTrainedModel can exist (and importing is slow)
        return None
    found = _outermost(lightning_module, modeling.PreTrainedModel)
    if len(found) != 1:
        return None
    name, model = found[0]
    return {"prefix": f"{name}." if name else "", "config": model.config.to_dict(), "class": type(model).__name__}


def _outermost(module: nn.Module, kind: type) -> list[tuple[str, nn.Module]]:
    # A PreTrainedModel holds others (LlamaForCausalLM.model is a LlamaModel): count the outer ones.
    found: list[tuple[str, nn.Module]] = []
    for name, sub in module.named_modules():
        inside = any(outer == "" or name.startswith(f"{outer}.") for outer, _ in found)
        if isinstance(sub, kind) and not inside:
            found.append((name, sub))
    return found


def export_hf(checkpoint_dir, output_dir) -> None:
    """Writes the Hugging Face model a LightningModule wraps (e.g. `self.model =
    LlamaForCausalLM(config)`) as a model directory, config.json and safetensors weights, that
    `AutoModelForCausalLM.from_pretrained(output_dir)` (or the class named in the config's
    `architectures`) loads on one process, with the checkpoint's weights."""
    record = _hf_record_of(checkpoint_dir)
    output_dir = _unused_dir(output_dir)
    model_class = _transformers_class(record["class"])
    prefix = record["prefix"]
    state = {name[len(prefix):]: value for name, value in read_model_state(checkpoint_dir, prefix).items()
             if isinstance(value, torch.Tensor)}
    config = _config(record, model_class, state)
    state = _as_save_pretrained_writes(model_class, config, state, prefix)
    output_dir.mkdir(parents=True, exist_ok=True)
    config.save_pretrained(output_dir)
    _save_safetensors(state, output_dir)


def _hf_record_of(checkpoint_dir) -> dict[str, Any]:
    record = read_meta(checkpoint_dir).get(HF_KEY)
    if record is None:
        raise ExportError(
            f"{checkpoint_dir} records no Hugging Face model: the LightningModule that saved it does not hold exactly "
            "one transformers PreTrainedModel (e.g. self.model = LlamaForCausalLM(config)), or the checkpoint was "
            "written by a lightning-parallel without Hugging Face export. Export it as a Lightning checkpoint "
            "(--format lightning), load that with MyModule.load_from_checkpoint and call save_pretrained on the "
            "Hugging Face model yourself."
        )
    return record


def _config(record: dict[str, Any], model_class: type, state: dict[str, torch.Tensor]):
    """The model's config as save_pretrained writes it: with its class and its weights' dtype."""
    config = model_class.config_class.from_dict(record["config"])
    config.architectures = [record["class"]]
    dtype = next((value.dtype for value in state.values() if value.is_floating_point()), None)
    if dtype is not None:  # from_pretrained loads in this dtype (bf16 weights stay bf16)
        config.dtype = str(dtype).removeprefix("torch.")
    return config


def _transformers_class(name: str) -> type:
    import transformers

    model_class = getattr(transformers, name, None)
    if not (isinstance(model_class, type) and issubclass(model_class, transformers.PreTrainedModel)):
        raise ExportError(
            f"{name} is not a model class of transformers {transformers.__version__}; Hugging Face export writes "
            "the models transformers ships. Export it as a Lightning checkpoint (--format lightning), load that "
            "with MyModule.load_from_checkpoint and call save_pretrained on your model."
        )
    return model_class


def _as_save_pretrained_writes(model_class: type, config, state: dict[str, torch.Tensor], prefix: str) -> dict:
    """The weights as save_pretrained writes them: one copy of each tied weight (from_pretrained
    ties lm_head.weight to the embeddings again), without the class's keys ignored on save, and
    in the layout transformers converts from at load (a mixture of experts' experts one by one)."""
    with torch.device("meta"):  # the structure only: no memory, no initialization
        model = model_class(config)
    aliases = tied_aliases(model)
    for alias, source in aliases.items():  # a directory HybridParallel wrote holds a tied weight once
        if alias in state and source not in state:
            state[source] = state[alias]
        if source in state and alias not in state:
            state[alias] = state[source]
    missing, unexpected = model.state_dict().keys() - state.keys(), state.keys() - model.state_dict().keys()
    if missing or unexpected:
        raise ExportError(
            f"The weights under {prefix!r} are not those of a {model_class.__name__} built from its config (missing "
            f"{sorted(missing)[:3]}, unexpected {sorted(unexpected)[:3]}): was the model changed after it was built "
            "(adapters, replaced layers)? Export it as a Lightning checkpoint (--format lightning), load that with "
            "MyModule.load_from_checkpoint and save the Hugging Face model with save_pretrained yourself."
        )
    for alias, source in aliases.items():
        if not torch.equal(state[alias], state[source]):
            raise ExportError(
                f"{alias} and {source} differ, but a {model_class.__name__} with this config ties them (e.g. "
                "tie_word_embeddings): the tie was broken while training. Export it as a Lightning checkpoint "
                "(--format lightning) instead, and untie them in the config to save it with save_pretrained."
            )
        del state[alias]
    for name in getattr(model, "_keys_to_ignore_on_save", None) or ():
        state.pop(name, None)
    try:
        from transformers.core_model_loading import revert_weight_conversion
    except ImportError:  # transformers 4 keeps weights in memory as they are saved
        return state
    return revert_weight_conversion(model, state)


def _unused_dir(path) -> Path:
    # Weights left by another export (other file names) would be read in place of or beside these.
    path = Path(path)
    if path.exists() and (not path.is_dir() or any(path.iterdir())):
        raise ExportError(f"{path} exists and is not an empty directory. Choose a new output directory or remove it.")
    return path


def _save_safetensors(state: dict[str, torch.Tensor], output_dir: Path) -> None:
    # Not DCP's HuggingFaceStorageWriter, though from_pretrained reads its files too: it builds
    # each file as one bytes object before writing it, three times the model in memory at the
    # peak (measured), where save_file writes from the tensors themselves.
    from safetensors.torch import save_file

    state = {name: value.contiguous() for name, value in state.items()}
    save_file(state, str(output_dir / "model.safetensors"), metadata={"format": "pt"})
