"""Where a tensor-parallel plan comes from, how its globs expand, and the checks it must pass.

A plan maps module-name globs to style names: {"blocks.*.mlp.fc1": "colwise", ...}. A `*`
matches exactly one component of a dotted name.
"""

from __future__ import annotations

import fnmatch
import re
from typing import Optional

from torch import nn
from torch.distributed.tensor import Shard

from lightning_parallel.layout import LayoutError
from lightning_parallel.tensor_parallel.conv1d import is_conv1d
from lightning_parallel.tensor_parallel.styles import canonical, check_style, parameter_placement
from lightning_parallel.tensor_parallel.ties import tie_problems

Plan = dict[str, str]

# What the dims of a splittable layer's weight are called, for messages.
SPLIT_DIM_NAMES = {nn.Linear: ("out_features", "in_features"), nn.Embedding: ("num_embeddings", "embedding_dim")}
# Attribute names under which modules (and Hugging Face configs) keep head counts.
HEAD_COUNT_ATTRS = ("num_heads", "n_heads", "num_attention_heads", "num_key_value_heads", "n_kv_heads", "num_kv_heads")


def matches(glob: str, name: str) -> bool:
    pattern, parts = glob.split("."), name.split(".")
    return len(pattern) == len(parts) and all(fnmatch.fnmatchcase(p, g) for g, p in zip(pattern, parts))


def expand(plan: Plan, module: nn.Module, declared_by: Optional[str] = None) -> dict[str, str]:
    """Concrete module name -> canonical style. Every glob of a given plan must match a module.
    A model's own plan (`declared_by` names the model) covers its family's dense and
    mixture-of-experts layers alike: an entry matching no module of this model is skipped."""
    names = [name for name, _ in module.named_modules() if name]
    expanded: dict[str, str] = {}
    for glob, style in plan.items():
        hits = [name for name in names if matches(glob, name)]
        names_a_parameter = not hits and any(matches(glob, name) for name, _ in module.named_parameters())
        if hits or declared_by is None or names_a_parameter:
            check_style(glob, style, declared_by)
        if hits:
            expanded.update(dict.fromkeys(hits, canonical(style)))
        elif declared_by is None:
            last = glob.split(".")[-1]
            near = [n for n in names if fnmatch.fnmatchcase(n.split(".")[-1], last)][:5]
            hint = f" Modules with that last name: {near}." if near else ""
            raise LayoutError(
                f"tensor_plan entry {glob!r} matches no module of the model.{hint} A '*' stands for exactly "
                "one part of a dotted module name (e.g. 'blocks.*.mlp.fc1')."
            )
        elif names_a_parameter:
            raise LayoutError(
                f"{declared_by} declares tensor-parallel style {style!r} for the parameter {glob!r}: transformers "
                "splits it inside its module's forward, which lightning_parallel does not do. Fix: give tensor_plan "
                "explicitly, leaving that module unsplit, or use tensor_parallel=1."
            )
    if declared_by is not None and not expanded:
        raise LayoutError(f"No entry of the tensor-parallel plan {declared_by} declares matches a module of the model. "
                          "Pass tensor_plan explicitly.")
    return expanded


# Plans for Hugging Face families that declare none, as transformers writes them: the base
# model's entries, and the head model's.
OWN_PLANS = {
    "gpt2": ({"wte": "embedding_rowwise", "h.*.attn.c_attn": "qkv_colwise", "h.*.attn.c_proj": "rowwise",
              "h.*.mlp.c_fc": "colwise", "h.*.mlp.c_proj": "rowwise"},
             {"lm_head": "colwise_gather_output"}),
}


def _own_plan(model: nn.Module) -> Optional[Plan]:
    plans = OWN_PLANS.get(getattr(getattr(model, "config", None), "model_type", None))
    base = getattr(model, "base_model", None)
    if plans is None or not isinstance(base, nn.Module):
        return None
    if base is model:
        return dict(plans[0])
    prefix = next(name for name, sub in model.named_modules() if sub is base)
    return {**{f"{prefix}.{k}": v for k, v in plans[0].items()}, **plans[1]}


def declared_plan(module: nn.Module) -> Optional[tuple[Plan, str]]:
    """The plan a model declares itself (Hugging Face transformers' `_tp_plan` /
    `config.base_model_tp_plan`, or ours for a family that declares none: OWN_PLANS), with keys
    relative to `module`, and the model that declares it (its class and model_type, for messages)."""
    for path, sub in module.named_modules():
        config = getattr(sub, "config", None)
        plan = getattr(sub, "_tp_plan", None) or getattr(config, "base_model_tp_plan", None) or _own_plan(sub)
        if isinstance(plan, dict) and plan:
            prefix = f"{path}." if path else ""
            declared_by = f"{type(sub).__name__} (model_type={getattr(config, 'model_type', None)!r})"
            return {prefix + key: style for key, style in plan.items()}, declared_by
    return None


def check_plan(expanded: dict[str, str], module: nn.Module, tp: int) -> None:
    """Sizes the plan splits must divide by tp; attention heads must not be cut in half;
    a weight tied between modules must be split the same way in each."""
    problems = []
    for name, style in expanded.items():
        problems += _size_problems(name, module.get_submodule(name), style, tp)
        if style == "mla_kv_a_proj" and rotary_dim(module, name) is None:
            problems.append(f"{name} (mla_kv_a_proj): no config above it gives qk_rope_head_dim, the width of its "
                            "rotary key part")
    problems += _head_problems(expanded, module, tp)
    problems += tie_problems(expanded, module)
    if problems:
        raise LayoutError(f"The tensor-parallel plan cannot split this model {tp} ways:\n  - " + "\n  - ".join(problems))


def rotary_dim(module: nn.Module, name: str) -> Optional[int]:
    """The rotary key width (`qk_rope_head_dim`) in the config of the nearest module above `name`."""
    parts = name.split(".")
    for end in range(len(parts) - 1, -1, -1):
        config = getattr(module.get_submodule(".".join(parts[:end])), "config", None)
        if isinstance(getattr(config, "qk_rope_head_dim", None), int):
            return config.qk_rope_head_dim
    return None


def _size_problems(name: str, sub: nn.Module, style: str, tp: int) -> list[str]:
    placement = parameter_placement(style, type(sub), "weight")
    if not isinstance(placement, Shard):
        return []  # nothing split
    if is_conv1d(sub):  # a transposed Linear: weight (in, out)
        parts = 3 if style == "qkv_colwise" else 1
        dim_name, size = ("nx", sub.nx) if placement.dim == 0 else ("nf", sub.nf // parts)
        return [f"{name} ({style}): {dim_name}={size} is not divisible by tensor_parallel={tp}"] if size % tp else []
    kind = next((kind for kind in SPLIT_DIM_NAMES if isinstance(sub, kind)), None)
    if kind is None:
        return [f"{name} is a {type(sub).__name__}; style {style!r} applies to nn.Linear, nn.Embedding and Conv1D only"]
    size = sub.weight.shape[placement.dim]
    if size % tp:
        return [f"{name} ({style}): {SPLIT_DIM_NAMES[kind][placement.dim]}={size} is not divisible by tensor_parallel={tp}"]
    return []


def _head_problems(expanded: dict[str, str], module: nn.Module, tp: int) -> list[str]:
    problems = []
    for path, sub in module.named_modules():
        prefix = f"{path}." if path else ""
        if not any(name.startswith(prefix) for name in expanded):
            continue  # nothing under this module is split
        owners = [(sub, path)] + ([(sub.config, f"{path or 'model'}.config")] if hasattr(sub, "config") else [])
        for owner, where in owners:
            for attr in HEAD_COUNT_ATTRS:
                count = getattr(owner, attr, None)
                if isinstance(count, int) and not isinstance(count, bool) and count % tp:
                    problems.append(f"{where}.{attr}={count} is not divisible by tensor_parallel={tp}")
        head_dim = getattr(sub, "head_dim", None)
        if not isinstance(head_dim, int):
            continue
        for name, style in expanded.items():
            child = module.get_submodule(name)
            if name.startswith(prefix) and style == "colwise" and isinstance(child, nn.Linear):
                if (child.out_features // tp) % head_dim:
                    heads = child.out_features // head_dim
                    problems.append(f"{name}: {heads} heads of size {head_dim} cannot be split {tp} ways")
    return sorted(set(problems))


def fold_layer_index(name: str) -> str:
    """'blocks.3.mlp.fc1' -> 'blocks.*.mlp.fc1': the first number in a name is the layer index."""
    return re.sub(r"(^|\.)\d+(?=\.|$)", r"\1*", name, count=1)


def format_plan(expanded: dict[str, str]) -> str:
    """The plan as YAML lines, with numbered layers folded into '*'."""
    by_glob: dict[str, dict[str, str]] = {}
    for name, style in expanded.items():
        glob = fold_layer_index(name)
        by_glob.setdefault(glob, {})[name] = style
    lines = []
    for glob, members in by_glob.items():
        styles = set(members.values())
        if len(styles) == 1:
            lines.append(f"  {glob}: {styles.pop()}")
        else:  # layers that differ are listed one by one
            lines += [f"  {name}: {style}" for name, style in members.items()]
    return "\n".join(lines)
