"""The package uses public PyTorch, except for the private APIs listed here and in README.md.

Private means a dotted path under torch with a component that starts with "_"
(`torch.utils._pytree`), found statically in every file of the package: imports (function-local
ones too), `importlib.import_module` strings, and attribute chains on a name bound to torch.
Each is keyed by its path up to the first private component.

A private attribute of an object whose type the source does not show (`mesh._flatten`) cannot
be told from another library's by the syntax, so every private attribute read or set on
something other than `self` or `cls` and not defined by the package itself is classified in
ATTRIBUTES with its owner; torch's are listed in README.md too.

Both lists must match the code exactly: a new use fails until it is listed with its reason, and
a listed use the code no longer has fails until it is taken off, so the lists only shrink.
"""

from __future__ import annotations

import ast
import re
from collections import defaultdict
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "lightning_parallel"
README = ROOT / "README.md"
HEADING = "Private PyTorch APIs"

# What still needs a private torch module (or a private name of a public one), and why.
MODULES = {
    "torch.utils._pytree": "tree_flatten/tree_map/tree_unflatten over batches, step arguments and model "
    "outputs (pipeline/split.py, runner.py, cost.py); torch 2.13 has no public pytree, and its registry "
    "(namedtuples, Hugging Face ModelOutput) is what makes arbitrary batches and outputs work",
    "torch.utils._python_dispatch": "TorchDispatchMode, the only way to see (and run on meta) every aten op "
    "of a forward for the counted stage costs (pipeline/cost.py); torch has no public dispatch-mode class",
    "torch.distributed.tensor._random": "manual_seed creates DTensor's CUDA RNG tracker without syncing rank "
    "0's state over the world, so pipeline stages draw different inits (materialize.py, CUDA only); "
    "torch 2.13 has no public equivalent",
    "torch.ops._c10d_functional": "the functional collectives' ops (all_reduce, wait_tensor, ...), whose "
    "outputs selective activation checkpointing keeps so the recompute does not communicate again "
    "(activation_checkpointing.py); they exist only under this private op namespace",
    "torch.distributed.pipelining.schedules._ComputationType": "the action kinds of a lowered schedule, to "
    "keep only the forward actions of the V-shaped schedules for evaluation (pipeline/schedules.py); "
    "their eval() runs backward actions in torch 2.13",
    "torch._grouped_mm": "the grouped matmul of Hugging Face's mixture-of-experts layers as the planner sees it on "
    "meta (torch.nn.functional.grouped_mm calls it without a __torch_function__ of its own), priced and stood in "
    "for because its meta kernel refuses fp32 (planner.py)",
}

# Private attributes on objects of unknown type: name -> (owner library, why).
ATTRIBUTES = {
    "_parameters": ("torch", "nn.Module's slots, swapped in place to split, lend or strip tensors without "
                    "Module.__setattr__'s checks (materialize.py, pipeline/split.py, pipeline/runner.py, "
                    "tensor_parallel/styles.py)"),
    "_buffers": ("torch", "nn.Module's buffer slots, replaced keeping persistence (materialize.py, "
                 "pipeline/split.py, tensor_parallel/styles.py)"),
    "_apply": ("torch", "nn.Module._apply, the engine of .to() that also takes meta tensors and DTensor "
               "shards (materialize.py)"),
    "_reset_parameters": ("torch", "the init of torch.nn built-ins that spell it so (MultiheadAttention), "
                          "read by getattr (materialize.py)"),
    "_schema": ("torch", "OpOverload._schema.is_mutable: whether an aten op writes its input, so counting on "
                "meta leaves real buffers in place (pipeline/cost.py); no public accessor"),
    "_flatten": ("torch", "DeviceMesh._flatten: one mesh dim made of several (dp_replicate x dp_shard, "
                 "pp x dp), as torchtitan does; no public API in torch 2.13 (layout.py, strategy.py)"),
    "_device": ("lightning", "the device a LightningModule reports, set where .to() cannot go (meta)"),
    "_signal_connector": ("lightning", "the trainer's SLURM signal handling, for preemption"),
    "_slurm_sigusr_handler_fn": ("lightning", "the SLURM requeue handler, deferred to a step every rank reaches"),
    "_data_source": ("lightning", "the fit loop's dataloader source"),
    "_sampler": ("lightning", "the sampler DistributedSamplerWrapper wraps, to tell torchdata's shuffling "
                 "sampler (StatefulDataLoader(shuffle=True)) from a user's (data_position.py)"),
    "_optimizer": ("lightning", "the optimizer inside a LightningOptimizer"),
    "_defaults": ("torchmetrics", "a Metric's states' starting values, refused on meta"),
    "_update_count": ("torchmetrics", "counted on stages that receive a Metric's states, so it does not warn"),
    "_tp_plan": ("transformers", "a model's declared tensor-parallel plan"),
    "_pp_plan": ("transformers", "a model's declared pipeline plan"),
    "_ep_plan": ("transformers", "a model's declared experts modules (expert_parallel.py)"),
    "_keys_to_ignore_on_save": ("transformers", "keys a Hugging Face model does not save"),
}


# ------------------------------------------------------------------------ finding them


def _is_private(name: str) -> bool:
    return name.startswith("_") and not (name.startswith("__") and name.endswith("__"))


def _private_prefix(dotted: str) -> str | None:
    """`torch.utils._pytree.tree_map` -> `torch.utils._pytree`; None for a public or non-torch path."""
    parts = dotted.split(".")
    if parts[0] != "torch":
        return None
    for i, part in enumerate(parts):
        if _is_private(part):
            return ".".join(parts[: i + 1])
    return None


def _dotted(node: ast.AST) -> str | None:
    """`a.b.c` for a chain of attributes on a name, else None."""
    if isinstance(node, ast.Name):
        return node.id
    if isinstance(node, ast.Attribute):
        base = _dotted(node.value)
        return f"{base}.{node.attr}" if base else None
    return None


def _imported_names(tree: ast.AST) -> dict[str, str]:
    """Each name an import binds -> the dotted path it stands for."""
    bound = {}
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                name = alias.name if alias.asname else alias.name.split(".")[0]  # `import a.b` binds `a`
                bound[alias.asname or name] = name
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            for alias in node.names:
                bound[alias.asname or alias.name] = f"{node.module}.{alias.name}"
    return bound


def _imports(node: ast.AST) -> list[str]:
    """The dotted paths an import statement or an import_module/__import__ call names."""
    if isinstance(node, ast.Import):
        return [alias.name for alias in node.names]
    if isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
        return [node.module] + [f"{node.module}.{alias.name}" for alias in node.names]
    if isinstance(node, ast.Call) and (_dotted(node.func) or "").split(".")[-1] in ("import_module", "__import__"):
        first = node.args[0] if node.args else None
        if isinstance(first, ast.Constant) and isinstance(first.value, str):
            return [first.value]
    return []


def _attribute_uses(node: ast.AST) -> list[tuple[ast.AST, str]]:
    """(object, private attribute name) for `obj._x` and getattr/hasattr/setattr(obj, "_x")."""
    if isinstance(node, ast.Attribute) and _is_private(node.attr):
        return [(node.value, node.attr)]
    if isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and len(node.args) >= 2:
        name = node.args[1]
        if node.func.id in ("getattr", "hasattr", "setattr", "delattr") and isinstance(name, ast.Constant):
            if isinstance(name.value, str) and _is_private(name.value):
                return [(node.args[0], name.value)]
    return []


def _own_private_names(trees: dict[str, ast.AST]) -> set[str]:
    """Private names the package defines: functions, classes, variables and `self._x` attributes.
    A method a subclass of a torch class defines is torch's name, not ours (a ParallelStyle's
    `_apply`, say)."""
    names = set()
    for tree in trees.values():
        bound = _imported_names(tree)
        overrides = {id(item) for node in ast.walk(tree) if isinstance(node, ast.ClassDef)
                     and any(bound.get((_dotted(base) or "").split(".")[0], "").startswith("torch") for base in node.bases)
                     for item in node.body if isinstance(item, (ast.FunctionDef, ast.AsyncFunctionDef))}
        for node in ast.walk(tree):
            if id(node) in overrides:
                continue
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
                names.add(node.name)
            elif isinstance(node, ast.Name) and isinstance(node.ctx, ast.Store):
                names.add(node.id)
            elif isinstance(node, ast.Attribute) and isinstance(node.ctx, ast.Store):
                if isinstance(node.value, ast.Name) and node.value.id in ("self", "cls"):
                    names.add(node.attr)
    return {n for n in names if _is_private(n)}


def _parse_package() -> dict[str, ast.AST]:
    return {str(p.relative_to(ROOT)): ast.parse(p.read_text(), str(p)) for p in sorted(PACKAGE.rglob("*.py"))}


def scan(trees: dict[str, ast.AST]) -> tuple[dict[str, set[str]], dict[str, set[str]]]:
    """(private torch path -> where, private attribute of unknown owner -> where)."""
    modules, attributes = defaultdict(set), defaultdict(set)
    own = _own_private_names(trees)
    for path, tree in trees.items():
        bound = _imported_names(tree)
        for node in ast.walk(tree):
            where = f"{path}:{getattr(node, 'lineno', 0)}"
            for dotted in _imports(node):
                if prefix := _private_prefix(dotted):
                    modules[prefix].add(where)
            for obj, attr in _attribute_uses(node):
                chain = _dotted(obj)
                root = chain.split(".")[0] if chain else None
                if root in bound:  # a module or class: torch's are resolved, other libraries' are theirs
                    if prefix := _private_prefix(f"{bound[root]}{chain[len(root):]}.{attr}"):
                        modules[prefix].add(where)
                elif chain not in ("self", "cls") and attr not in own:
                    attributes[attr].add(where)
    return modules, attributes


def _readme_section() -> str:
    text = README.read_text()
    match = re.search(rf"^(#+) [^\n]*{HEADING}[^\n]*\n", text, re.MULTILINE)
    assert match, f"README.md has no section headed {HEADING!r}"
    level = len(match.group(1))
    end = re.search(rf"^#{{1,{level}}} ", text[match.end():], re.MULTILINE)
    return text[match.end(): match.end() + end.start()] if end else text[match.end():]


def _compare(found: dict[str, set[str]], listed: dict, what: str) -> list[str]:
    new = [f"{name} ({', '.join(sorted(found[name]))})" for name in sorted(set(found) - set(listed))]
    gone = sorted(set(listed) - set(found))
    problems = [f"new {what}, remove it or list it here and in README.md: {n}" for n in new]
    return problems + [f"{what} no longer used, take it off the list (and README.md): {n}" for n in gone]


# ------------------------------------------------------------------------ tests


def test_private_torch_modules_are_the_listed_ones():
    modules, _ = scan(_parse_package())
    assert not (problems := _compare(modules, MODULES, "private torch API")), "\n".join(problems)


def test_private_attributes_are_the_listed_ones():
    _, attributes = scan(_parse_package())
    assert not (problems := _compare(attributes, ATTRIBUTES, "private attribute")), "\n".join(problems)


def test_readme_lists_the_private_torch_apis():
    spans = [span.split(".") for span in re.findall(r"`([^`\s]+)`", _readme_section())]
    torch_attributes = {name for name, (owner, _) in ATTRIBUTES.items() if owner == "torch"}
    named_modules = {prefix for parts in spans if (prefix := _private_prefix(".".join(parts)))}
    named_attributes = {p for parts in spans if parts[0] != "torch" for p in parts if _is_private(p)}
    missing = sorted(set(MODULES) - named_modules) + sorted(torch_attributes - named_attributes)
    stale = sorted(named_modules - set(MODULES)) + sorted(named_attributes - torch_attributes)
    assert not missing, f"README.md's {HEADING!r} section does not list: {', '.join(missing)}"
    assert not stale, f"README.md's {HEADING!r} section lists what the code no longer uses: {', '.join(stale)}"


def test_the_scan_sees_every_kind_of_use():
    source = '''
import importlib
import torch
import torch.distributed as dist
from torch.distributed._composable import replicate
from torch.distributed.pipelining.schedules import _Action, ScheduleGPipe
def f(mesh, module):
    import torch.utils._pytree as pytree
    importlib.import_module("torch._dynamo")
    torch._C._set_grad_enabled(True)
    dist._functional_collectives.all_reduce
    mesh._flatten("dp")
    getattr(module, "_buffers")
    self._mine = 1
    return mesh._mine, torch.__version__, torch.nn.functional.relu
'''
    modules, attributes = scan({"f.py": ast.parse(source)})
    assert set(modules) == {
        "torch.distributed._composable", "torch.distributed.pipelining.schedules._Action", "torch.utils._pytree",
        "torch._dynamo", "torch._C", "torch.distributed._functional_collectives",
    }
    assert set(attributes) == {"_flatten", "_buffers"}
