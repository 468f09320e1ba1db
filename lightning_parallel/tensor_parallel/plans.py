"""Where a tensor-parallel plan comes from, how its globs expand, and the checks it must pass.

A plan maps module-name globs to style names: {"blocks.*.mlp.fc1": "colwise", ...}. A `*`
matches exactly one component of a dotted name.
"""

from __future__ import annotations

import fnmatch
import re
from typing import Optional

from torch import nn

from lightning_parallel.layout import LayoutError
from lightning_parallel.tensor_parallel.styles import canonical, check_style

Plan = dict[str, str]

# Attribute names under which modules (and Hugging Face configs) keep head counts.
HEAD_COUNT_ATTRS = ("num_heads", "n_heads", "num_attention_heads", "num_key_value_heads", "n_kv_heads", "num_kv_heads")


def matches(glob: str, name: str) -> bool:
    pattern, parts = glob.split("."), name.split(".")
    return len(pattern) == len(parts) and all(fnmatch.fnmatchcase(p, g) for g, p in zip(pattern, parts))


def expand(plan: Plan, module: nn.Module) -> dict[str, str]:
    """Concrete module name -> canonical style. Every glob must match at least one module."""
    names = [name for name, _ in module.named_modules() if name]
    expanded: dict[str, str] = {}
    for glob, style in plan.items():
        check_style(glob, style)
        hits = [name for name in names if matches(glob, name)]
        if not hits:
            last = glob.split(".")[-1]
            near = [n for n in names if fnmatch.fnmatchcase(n.split(".")[-1], last)][:5]
            hint = f" Modules with that last name: {near}." if near else ""
            raise LayoutError(
                f"tensor_plan entry {glob!r} matches no module of the model.{hint} A '*' stands for exactly "
                "one part of a dotted module name (e.g. 'blocks.*.mlp.fc1')."
            )
        for name in hits:
            expanded[name] = canonical(style)
    return expanded


def declared_plan(module: nn.Module) -> Optional[Plan]:
    """The plan a model declares itself (Hugging Face transformers' `_tp_plan` /
    `config.base_model_tp_plan`), with keys relative to `module`."""
    for path, sub in module.named_modules():
        plan = getattr(sub, "_tp_plan", None) or getattr(getattr(sub, "config", None), "base_model_tp_plan", None)
        if isinstance(plan, dict) and plan:
            prefix = f"{path}." if path else ""
            return {prefix + key: style for key, style in plan.items()}
    return None


def check_plan(expanded: dict[str, str], module: nn.Module, tp: int) -> None:
    """Sizes the plan splits must divide by tp; attention heads must not be cut in half;
    a weight tied between modules cannot be split two ways."""
    problems = []
    owners: dict[int, str] = {}
    for name, style in expanded.items():
        sub = module.get_submodule(name)
        problems += _size_problems(name, sub, style, tp)
        for param in sub.parameters(recurse=False):
            if id(param) in owners:
                problems.append(f"{name} shares a weight with {owners[id(param)]}; untie them or leave one out of the plan")
            owners[id(param)] = name
    problems += _head_problems(expanded, module, tp)
    if problems:
        raise LayoutError(f"The tensor-parallel plan cannot split this model {tp} ways:\n  - " + "\n  - ".join(problems))


def _size_problems(name: str, sub: nn.Module, style: str, tp: int) -> list[str]:
    if isinstance(sub, nn.Linear):
        dim, size = ("in_features", sub.in_features) if style.startswith("rowwise") else ("out_features", sub.out_features)
    elif isinstance(sub, nn.Embedding):
        dim, size = ("num_embeddings", sub.num_embeddings) if style.endswith("rowwise") else ("embedding_dim", sub.embedding_dim)
    elif style in ("colwise", "rowwise", "colwise_gather_output", "embedding_rowwise", "rowwise_split_input"):
        return [f"{name} is a {type(sub).__name__}; style {style!r} applies to nn.Linear and nn.Embedding only"]
    else:
        return []
    if size % tp:
        return [f"{name} ({style}): {dim}={size} is not divisible by tensor_parallel={tp}"]
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
