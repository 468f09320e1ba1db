"""Infer a tensor-parallel plan from a model's structure, only where the math provably holds.

The one pattern accepted: inside a module whose forward traces with torch.fx, one or more
Linear layers (A) feed a Linear (B) only through elementwise operations, and nothing else
reads the values in between (an MLP, a gated MLP). Splitting every A by output features and B
by input features then computes exactly what one device computes. Anything else, attention
included, is left to a declared or written plan.
"""

from __future__ import annotations

import operator
import re

import torch
import torch.nn.functional as F
from torch import fx, nn

from lightning_parallel.data_parallel import data_parallel_units
from lightning_parallel.layout import LayoutError
from lightning_parallel.tensor_parallel.plans import fold_layer_index, format_plan

ELEMENTWISE_MODULES = (
    nn.GELU, nn.ReLU, nn.SiLU, nn.Tanh, nn.Sigmoid, nn.Dropout, nn.Identity,
    nn.LeakyReLU, nn.ELU, nn.Mish, nn.Softplus, nn.Hardswish, nn.ReLU6,
)
ELEMENTWISE_FUNCTIONS = {
    F.gelu, F.relu, F.silu, F.tanh, F.sigmoid, F.dropout, F.leaky_relu, F.elu, F.mish, F.softplus,
    torch.relu, torch.tanh, torch.sigmoid, torch.mul, torch.add, operator.mul, operator.add,
    operator.truediv, operator.neg,
}
ELEMENTWISE_METHODS = {"relu", "tanh", "sigmoid", "mul", "add", "__mul__", "__add__", "neg"}

# Names that hint at a layer's role, for the plan suggested when inference gives up.
COLWISE_HINT = re.compile(r"(^|_)(q|k|v|qkv|query|key|value|up|gate|fc1|w1|w3|c_fc|in_proj|wq|wk|wv)(_proj)?$")
ROWWISE_HINT = re.compile(r"(^|_)(o|out|down|fc2|w2|c_proj|out_proj|wo|dense)(_proj)?$")


class _ChildrenAsLeaves(fx.Tracer):
    def is_leaf_module(self, module: nn.Module, qualname: str) -> bool:
        return True


def _is_elementwise(node: fx.Node, owner: nn.Module) -> bool:
    if node.op == "call_module":
        return isinstance(owner.get_submodule(node.target), ELEMENTWISE_MODULES)
    if node.op == "call_function":
        return node.target in ELEMENTWISE_FUNCTIONS
    if node.op == "call_method":
        return node.target in ELEMENTWISE_METHODS
    return False


def _is_linear(node, owner: nn.Module) -> bool:
    return isinstance(node, fx.Node) and node.op == "call_module" and isinstance(owner.get_submodule(node.target), nn.Linear)


def _pairs_in(owner: nn.Module) -> list[tuple[list[str], str]]:
    """(colwise Linears, rowwise Linear) pairs proven in `owner`'s own forward."""
    try:
        graph = _ChildrenAsLeaves().trace(owner)
    except Exception:  # forward does not trace (data-dependent control flow, shape unpacking...)
        return []
    pairs = []
    for consumer in graph.nodes:
        if not _is_linear(consumer, owner) or len(consumer.args) != 1:
            continue
        region, producers, stack, provable = set(), set(), [consumer.args[0]], True
        while stack and provable:
            node = stack.pop()
            if node in region or node in producers:
                continue
            if _is_linear(node, owner):
                producers.add(node)
            elif isinstance(node, fx.Node) and _is_elementwise(node, owner):
                region.add(node)
                for arg in [*node.args, *node.kwargs.values()]:
                    if isinstance(arg, fx.Node):
                        stack.append(arg)
                    elif not isinstance(arg, (int, float, bool, type(None), str)):
                        provable = False
            else:
                provable = False
        inside = region | producers | {consumer}
        if not provable or not producers or any(u not in inside for n in region | producers for u in n.users):
            continue
        width = owner.get_submodule(consumer.target).in_features
        if all(owner.get_submodule(p.target).out_features == width for p in producers):
            pairs.append((sorted(p.target for p in producers), consumer.target))
    return pairs


def infer_plan(model: nn.Module) -> dict[str, str]:
    """A plan covering every Linear inside the model's repeated blocks, or a LayoutError that
    names the layers it cannot prove and shows a plan to write."""
    plan: dict[str, str] = {}
    for path, owner in model.named_modules():
        prefix = f"{path}." if path else ""
        for producers, consumer in _pairs_in(owner):
            plan.update({prefix + p: "colwise" for p in producers})
            plan[prefix + consumer] = "rowwise"

    names = {id(m): n for n, m in model.named_modules()}
    block_linears = [
        f"{names[id(unit)]}.{name}" if name else names[id(unit)]
        for unit in data_parallel_units(model)
        for name, sub in unit.named_modules()
        if isinstance(sub, nn.Linear)
    ]
    unproven = [name for name in block_linears if name not in plan]
    if unproven or not plan:
        raise LayoutError(_refusal(plan, unproven))
    return plan


def _refusal(plan: dict[str, str], unproven: list[str]) -> str:
    if not unproven:
        return (
            "tensor_plan='auto' found nothing it can split: the model has no nn.ModuleList/nn.Sequential "
            "of blocks with Linear -> elementwise -> Linear chains, and declares no plan. Pass tensor_plan "
            "explicitly (module-name globs to styles), or use tensor_parallel=1."
        )
    suggestion = dict(plan)
    for name in unproven:
        last = name.split(".")[-1]
        suggestion[name] = "colwise" if COLWISE_HINT.search(last) else "rowwise" if ROWWISE_HINT.search(last) else "colwise or rowwise?"
    folded = sorted({fold_layer_index(name) for name in unproven})
    return (
        "tensor_plan='auto' cannot prove that splitting these layers keeps the model's math, so it "
        f"splits nothing: {', '.join(folded)}. (Only Linear -> elementwise -> Linear chains in a "
        "forward that torch.fx can trace are inferred; attention is not.) Write the plan yourself: "
        "colwise splits a layer's outputs, rowwise its inputs, and a colwise layer's outputs may reach "
        "its rowwise partner only through per-feature or per-head operations. A plan to start from, "
        "to check line by line (YAML, under strategy.tensor_plan):\n" + format_plan(suggestion)
    )
