"""Weights shared between modules (tied input and output embeddings) under tensor parallelism.

`parallelize_module` gives each module it splits a new DTensor parameter, which would untie a
weight two modules share: the optimizer would then update two copies. A tie holds when the plan
lays the weight out the same way in every module sharing it. The usual one does: an embedding
split by vocabulary rows (`embedding_rowwise`) and a head split by output features (`colwise`,
`colwise_gather_output`) both shard dim 0 of the one (vocabulary, hidden) matrix. Once the plan
is applied, every module that shared the weight is given the first one's DTensor parameter, so
both gradients accumulate into it. Ties laid out two ways are refused.
"""

from __future__ import annotations

from typing import NamedTuple, Optional

from torch import nn
from torch.distributed.tensor import Placement, Shard

from lightning_parallel.tensor_parallel.styles import parameter_placement


class Slot(NamedTuple):
    name: str  # the module's name
    module: nn.Module
    attr: str  # the parameter's attribute name in the module


def shared_parameters(module: nn.Module) -> list[list[Slot]]:
    """The slots of each parameter held by more than one module, in the order of named_modules."""
    slots: dict[int, list[Slot]] = {}
    seen: set[tuple[int, str]] = set()
    for name, sub in module.named_modules(remove_duplicate=False):
        for attr, param in sub.named_parameters(recurse=False, remove_duplicate=False):
            if (id(sub), attr) not in seen:  # a module registered twice shares nothing
                seen.add((id(sub), attr))
                slots.setdefault(id(param), []).append(Slot(name, sub, attr))
    return [group for group in slots.values() if len(group) > 1]


def tie_problems(expanded: dict[str, str], module: nn.Module) -> list[str]:
    """A message for each shared weight the plan would lay out two ways."""
    problems = []
    for group in shared_parameters(module):
        layouts = [_layout(expanded, slot) for slot in group]
        for slot, layout in zip(group[1:], layouts[1:]):
            if layout != layouts[0]:
                first = group[0]
                problems.append(
                    f"{first.name} ({expanded.get(first.name, 'not in the plan')}) and {slot.name} "
                    f"({expanded.get(slot.name, 'not in the plan')}) share one weight ({first.attr}; tied, as with "
                    f"tie_word_embeddings), which the plan would lay out two ways: {_describe(layouts[0])} in "
                    f"{first.name}, {_describe(layout)} in {slot.name}. Give both styles that split the same dim (an "
                    "embedding's 'embedding_rowwise' and a head's 'colwise' or 'colwise_gather_output' both split the "
                    "vocabulary), leave both out of the plan, or untie them (tie_word_embeddings=False)"
                )
                break
    return problems


def retie(groups: list[list[Slot]], only: Optional[list[str]] = None) -> None:
    """After the plan is applied: every slot of a shared weight gets the first slot's (DTensor)
    parameter. `groups` are `shared_parameters` from before the plan was applied; with `only`
    (this rank's pipeline stages), slots of the other modules are left alone."""
    for group in groups:
        applied = [slot for slot in group if only is None or slot.name in only]
        if len(applied) < 2:
            continue
        param = getattr(applied[0].module, applied[0].attr)
        for slot in applied[1:]:
            setattr(slot.module, slot.attr, param)


def _layout(expanded: dict[str, str], slot: Slot) -> Optional[Placement]:
    style = expanded.get(slot.name)
    return None if style is None else parameter_placement(style, type(slot.module), slot.attr)


def _describe(layout: Optional[Placement]) -> str:
    if layout is None:
        return "left whole"
    if isinstance(layout, Shard):
        return f"split along dim {layout.dim}"
    return "replicated"
