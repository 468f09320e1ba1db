"""Split the module a step calls into pipeline stages, without changing it.

The forward is traced with torch.fx, every submodule kept opaque (a *unit*: called, not traced
into) unless the split has to cut inside it, so user code runs as written and each parameter
belongs to the module that holds it. Stages are cut between consecutive unit calls in the
forward's order. A container is opened (traced into) only when its cost stands in the way of a
balanced split, so a ResNet's stages or a U-Net's encoder split as finely as balance needs.

Each graph node goes to a stage: a unit to the stage of its place in the order, any other node
to the latest stage among its inputs (the code before the first cut lands on the first stage,
the code after the last cut on the last). Values used by a later stage cross every stage in
between. Bare parameters and buffers the forward reads (`x + self.pos`) belong to the stage
that reads them. A stage replays its share of the graph with the model's own modules.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
from torch import fx, nn
from torch.overrides import TorchFunctionMode
from torch.utils._pytree import tree_flatten, tree_map_only, tree_unflatten

from lightning_parallel.layout import LayoutError
from lightning_parallel.pipeline.cost import Hardware, OpCost
from lightning_parallel.pipeline.tied import Tie, find_ties


class _UnitTracer(fx.Tracer):
    """Every submodule is a leaf (a call in the graph) except those named in `opened`."""

    def __init__(self, opened: set[str]):
        super().__init__()
        self.opened = opened

    def is_leaf_module(self, module: nn.Module, qualname: str) -> bool:
        return qualname not in self.opened


def trace(entry: nn.Module, opened: set[str], concrete_args: dict | None = None) -> fx.Graph:
    """`concrete_args` fixes the forward arguments the step does not pass (to their defaults)."""
    try:
        return _UnitTracer(opened).trace(entry, concrete_args=concrete_args)
    except Exception as err:
        inside = f" (tracing into {', '.join(sorted(opened))})" if opened else ""
        raise LayoutError(
            f"pipeline_parallel cannot split {type(entry).__name__}.forward: torch.fx could not trace it{inside} "
            f"({type(err).__name__}: {err}). The forward outside its submodules must not branch on tensor "
            "values or iterate over tensors; move such code into a submodule, or set pipeline_parallel=1."
        ) from err


def units_of(graph: fx.Graph) -> list[fx.Node]:
    return [node for node in graph.nodes if node.op == "call_module"]


# ------------------------------------------------------------------------ running the graph


def bind_placeholders(graph: fx.Graph, args: tuple, kwargs: dict) -> dict[fx.Node, object]:
    """The forward's arguments for its placeholder nodes (defaults where the call gave none)."""
    env: dict[fx.Node, object] = {}
    positional = iter(args)
    for node in graph.nodes:
        if node.op == "placeholder":
            if node.target in kwargs:
                env[node] = kwargs[node.target]
            else:
                env[node] = next(positional, node.args[0] if node.args else None)
    return env


def run_node(node: fx.Node, env: dict, model: nn.Module, bare: dict[str, torch.Tensor]):
    """The value of one non-placeholder node, given its inputs' values in `env`."""
    if node.op == "get_attr":
        return bare[node.target] if node.target in bare else resolve(model, node.target)
    args = fx.node.map_arg(node.args, env.__getitem__)
    kwargs = fx.node.map_arg(node.kwargs, env.__getitem__)
    if node.op == "call_module":
        return model.get_submodule(node.target)(*args, **kwargs)
    if node.op == "call_function":
        return node.target(*args, **kwargs)
    obj, *rest = args  # call_method
    return getattr(obj, node.target)(*rest, **kwargs)


class _ParameterUse(TorchFunctionMode):
    """Records which parameters torch functions receive: `originals` maps the id of each
    tensor to watch (a parameter, or a stand-in for one) to the id of the parameter."""

    def __init__(self, originals: dict[int, int]):
        super().__init__()
        self.originals = originals
        self.used: set[int] = set()

    def __torch_function__(self, func, types, args=(), kwargs=None):
        for value in tree_flatten((args, kwargs or {}))[0]:
            if isinstance(value, torch.Tensor) and id(value) in self.originals:
                self.used.add(self.originals[id(value)])
        return func(*args, **(kwargs or {}))


@dataclass
class Measured:
    """One run of the traced forward on a probe micro-batch."""

    cost: dict[fx.Node, float]  # priced seconds of the node's forward and backward
    is_tensor: dict[fx.Node, bool]  # whether the node's value is one tensor (only those can cross stages)
    touched: dict[fx.Node, set[int]]  # ids of the parameters the node's computation used


def measure(entry: nn.Module, graph: fx.Graph, args: tuple, kwargs: dict, hardware: Hardware) -> Measured:
    """Runs the graph node by node, pricing each (on meta tensors where the forward allows)."""
    try:
        return _measure(entry, graph, args, kwargs, hardware, on_meta=True)
    except Exception:  # the forward needs real values: count it on them
        return _measure(entry, graph, args, kwargs, hardware, on_meta=False)


def _measure(entry, graph, args, kwargs, hardware, on_meta) -> Measured:
    params = {id(p): id(p) for p in entry.parameters()}
    env = bind_placeholders(graph, args, kwargs)
    # A model built empty is priced on values only where its forward needs them: then each
    # parameter it reads directly gets a stand-in, and each unit its own while it runs.
    bare = {} if on_meta else {n.target: _stand_in(resolve(entry, n.target), _device_of((args, kwargs)))
                               for n in graph.nodes if n.op == "get_attr"}
    params.update({id(t): id(resolve(entry, name)) for name, t in bare.items()})
    measured = Measured({}, {}, {})
    with OpCost(hardware, on_meta) as counter:
        for node in graph.nodes:
            before, used = counter.seconds, set()
            if node.op == "call_module":
                args, kwargs = fx.node.map_arg((node.args, node.kwargs), env.__getitem__)
                env[node], used = price_call(entry.get_submodule(node.target), tuple(args), dict(kwargs), on_meta, params)
            elif node.op not in ("placeholder", "output"):
                with torch.no_grad(), _ParameterUse(params) as use:
                    env[node] = run_node(node, env, entry, bare)
                used = use.used
            measured.touched[node] = used
            # Backward costs about twice the forward for the code between modules.
            measured.cost[node] = (counter.seconds - before) * (1 if node.op == "call_module" else 3)
            measured.is_tensor[node] = isinstance(env.get(node), torch.Tensor)
    return measured


def price_call(module: nn.Module, args: tuple, kwargs: dict, on_meta: bool, params: dict[int, int]):
    """Runs one module call forward and backward (inside an OpCost, which prices it) on
    stand-ins for its parameters (meta ones, or detached copies): the model's own gradients are
    left untouched. Returns the (detached) output and the ids of the parameters it used (of
    all `params`)."""
    device = "meta" if on_meta else _device_of((args, kwargs))
    own = dict(module.named_parameters(remove_duplicate=False))
    stand_ins = {name: _stand_in(p, device).requires_grad_(p.requires_grad) for name, p in own.items()}
    originals = {**params, **{id(stand_ins[name]): id(p) for name, p in own.items()}}
    # Copies of the buffers too: a forward may update them in place (running statistics).
    buffers = {n: _stand_in(b, device, copy=True) for n, b in module.named_buffers(remove_duplicate=False)}
    tensors = {**stand_ins, **buffers}

    def leaf(value: torch.Tensor) -> torch.Tensor:
        value = value.detach().to(device or value.device)
        return value.requires_grad_(value.is_floating_point())

    args, kwargs = tree_map_only(torch.Tensor, leaf, (args, kwargs))
    with torch.enable_grad(), _ParameterUse(originals) as use:
        out = torch.func.functional_call(module, tensors, args, kwargs)
        outs = [t for t in tree_flatten(out)[0] if isinstance(t, torch.Tensor) and t.requires_grad]
        wrt = [t for t in [*stand_ins.values(), *tree_flatten((args, kwargs))[0]]
               if isinstance(t, torch.Tensor) and t.requires_grad]
        if outs and wrt:
            torch.autograd.grad(outs, wrt, [torch.ones_like(t) for t in outs], allow_unused=True)
    return tree_map_only(torch.Tensor, lambda t: t.detach(), out), use.used


def _stand_in(t, device, copy: bool = False):
    """`t` detached, on `device` (a copy if `copy`); for a tensor of a model built empty (meta),
    small random values (any will do to price the ops). Inside an OpCost, the move is priced."""
    if not isinstance(t, torch.Tensor):
        return t
    if t.is_meta and device != "meta":
        return (torch.randn(t.shape, device=device) * 0.02).to(t.dtype)
    return t.detach().to(device, copy=copy)


@contextmanager
def standing_in_for_meta(model: nn.Module, units: list[str], device) -> Iterator[None]:
    """Runs a model built empty (meta) on values: each unit gets random stand-ins for its
    tensors while it runs, so no more than one unit's are allocated at a time; tensors outside
    the units (a rotary embedding's buffers, say) for the whole block."""
    def swap_in(module: nn.Module, *_):
        originals[module] = _swap(module, lambda t: _stand_in(t, device) if t.is_meta else t)

    def swap_back(module: nn.Module, *_):
        _swap(module, lambda t: originals[module][id(t)] if id(t) in originals[module] else t)

    def _swap(module: nn.Module, new_of) -> dict[int, torch.Tensor]:
        old_of_new = {}
        for sub in module.modules():
            for slots in (sub._parameters, sub._buffers):
                for name, t in list(slots.items()):
                    if t is not None:
                        slots[name] = new_of(t)
                        old_of_new[id(slots[name])] = t
        return old_of_new

    originals: dict[nn.Module, dict[int, torch.Tensor]] = {}
    in_units = {id(t) for u in units for t in [*model.get_submodule(u).parameters(), *model.get_submodule(u).buffers()]}
    outside = [(sub, slots, name, t) for sub in model.modules() for slots in (sub._parameters, sub._buffers)
               for name, t in slots.items() if t is not None and t.is_meta and id(t) not in in_units]
    hooks = []
    for u in units:
        hooks += [model.get_submodule(u).register_forward_pre_hook(swap_in),
                  model.get_submodule(u).register_forward_hook(swap_back)]
    for _, slots, name, t in outside:
        slots[name] = _stand_in(t, device)
    try:
        yield
    finally:
        for hook in hooks:
            hook.remove()
        for _, slots, name, t in outside:
            slots[name] = t


def _device_of(tree) -> torch.device:
    return next((t.device for t in tree_flatten(tree)[0] if isinstance(t, torch.Tensor)), torch.device("cpu"))


# ------------------------------------------------------------------------ where stages may be cut


def unit_costs(graph: fx.Graph, measured: Measured) -> list[float]:
    """Each unit's cost, with the code between units added to the unit before it."""
    costs: list[float] = []
    pending = 0.0
    for node in graph.nodes:
        if node.op == "call_module":
            costs.append(measured.cost[node] + pending)
            pending = 0.0
        elif costs:
            costs[-1] += measured.cost[node]
        else:
            pending += measured.cost[node]
    return costs


def assign_nodes(graph: fx.Graph, unit_stage: list[int], num_stages: int) -> dict[fx.Node, int]:
    """The stage of every node but get_attr ones (each stage that reads an attribute reads it itself)."""
    stage_of_unit = iter(unit_stage)
    node_stage: dict[fx.Node, int] = {}
    for node in graph.nodes:
        if node.op == "get_attr":
            continue
        if node.op == "call_module":
            node_stage[node] = next(stage_of_unit)
        elif node.op == "output":
            node_stage[node] = num_stages - 1
        else:
            node_stage[node] = max((node_stage[n] for n in node.all_input_nodes if n in node_stage), default=0)
    return node_stage


def crossing(graph: fx.Graph, node_stage: dict[fx.Node, int], stage: int) -> list[fx.Node]:
    """The values stage `stage` hands to the next one: computed on it or earlier, used later."""
    return [
        node for node in graph.nodes
        if node in node_stage and node.op != "output" and node_stage[node] <= stage
        and any(node_stage.get(user, -1) > stage for user in node.users)
    ]


def allowed_cuts(graph: fx.Graph, measured: Measured) -> list[bool]:
    """allowed[k]: whether stages may be cut between unit k-1 and unit k (allowed[0] is unused).
    Not where a module is called on both sides, nor where a value that is not a single tensor
    (a tuple, a Python number, None) would cross."""
    units = units_of(graph)
    allowed = [False] * len(units)
    for k in range(1, len(units)):
        before = {u.target for u in units[:k]}
        if any(u.target in before for u in units[k:]):
            continue
        node_stage = assign_nodes(graph, [0] * k + [1] * (len(units) - k), 2)
        allowed[k] = all(measured.is_tensor[node] for node in crossing(graph, node_stage, 0))
    return allowed


# ------------------------------------------------------------------------ the stage plan


@dataclass
class StagePlan:
    """Which graph nodes each stage runs, what crosses between stages, and who owns what.
    Names are relative to the entry module (the one the steps call)."""

    graph: fx.Graph
    node_stage: dict[fx.Node, int]
    inputs: list[list[fx.Node]]  # values stage s receives from stage s-1 (s > 0)
    outputs: list[list[fx.Node]]  # values stage s sends to stage s+1 (s < last)
    owned_modules: list[list[str]]  # units (module names) stage s calls
    owned_params: list[list[str]]  # bare parameters stage s reads directly (get_attr)
    owned_attrs: list[list[str]]  # other attributes (buffers, constants) stage s reads directly
    ties: list[Tie] = field(default_factory=list)  # weights that modules of several stages hold

    @property
    def num_stages(self) -> int:
        return len(self.inputs)


def plan_stages(entry: nn.Module, graph: fx.Graph, unit_stage: list[int], num_stages: int,
                measured: Measured) -> StagePlan:
    node_stage = assign_nodes(graph, unit_stage, num_stages)
    owned_modules: list[list[str]] = [[] for _ in range(num_stages)]
    for node, stage in zip(units_of(graph), unit_stage):
        if node.target not in owned_modules[stage]:
            owned_modules[stage].append(node.target)

    owned_params: list[list[str]] = [[] for _ in range(num_stages)]
    owned_attrs: list[list[str]] = [[] for _ in range(num_stages)]
    for node in graph.nodes:
        if node.op != "get_attr":
            continue
        stages = sorted({node_stage[user] for user in node.users})
        if isinstance(resolve(entry, node.target), nn.Parameter):
            if len(stages) > 1:
                raise LayoutError(
                    f"The parameter {node.target!r} is used by pipeline stages {stages}. Stages cannot share "
                    "parameters: choose a pipeline_split that keeps its users on one stage."
                )
            owned_params[stages[0]].append(node.target)
        else:
            for stage in stages:
                owned_attrs[stage].append(node.target)

    _check_units_use_only_their_own_parameters(entry, graph, measured)
    ties = find_ties(entry, owned_modules, owned_params)
    inputs: list[list[fx.Node]] = [[] for _ in range(num_stages)]
    outputs: list[list[fx.Node]] = [[] for _ in range(num_stages)]
    for s in range(num_stages - 1):
        outputs[s] = inputs[s + 1] = crossing(graph, node_stage, s)
    return StagePlan(graph, node_stage, inputs, outputs, owned_modules, owned_params, owned_attrs, ties)


def _check_units_use_only_their_own_parameters(entry: nn.Module, graph: fx.Graph, measured: Measured) -> None:
    """A module whose forward reads another module's parameter (through a reference the graph
    cannot see) would find it missing on its stage."""
    names = {id(p): name for name, p in reversed(list(entry.named_parameters(remove_duplicate=False)))}
    for node in units_of(graph):
        own = {id(p) for p in entry.get_submodule(node.target).parameters()}
        foreign = sorted(names[i] for i in measured.touched[node] - own)
        if foreign:
            raise LayoutError(
                f"{node.target!r} uses the parameter(s) {foreign}, which belong to another module. Under "
                "pipeline_parallel a module may use only its own parameters (and the forward may read any "
                "parameter directly): register them on the module that uses them."
            )


class FlatOutput:
    """A last stage's output as torch's stages pass it on (tensors only), and back. Other
    values (None, numbers) are kept from the latest call; a 0-d tensor (a loss) travels as one
    element, so that evaluation's merge of the micro-batches concatenates it, and comes back as
    the mean over the micro-batches."""

    def __init__(self) -> None:
        self.spec = None
        self.constants: dict[int, object] = {}
        self.scalars: set[int] = set()

    def flatten(self, output):
        if isinstance(output, torch.Tensor) and output.dim() > 0:
            self.spec = None
            return output
        leaves, self.spec = tree_flatten(output)
        self.constants = {i: v for i, v in enumerate(leaves) if not isinstance(v, torch.Tensor)}
        self.scalars = {i for i, v in enumerate(leaves) if isinstance(v, torch.Tensor) and v.dim() == 0}
        return tuple(v.reshape(1) if i in self.scalars else v for i, v in enumerate(leaves) if i not in self.constants)

    def rebuild(self, flat):
        if self.spec is None:
            return flat
        tensors = iter([flat] if isinstance(flat, torch.Tensor) else flat)
        leaves = [self.constants[i] if i in self.constants else next(tensors) for i in range(self.spec.num_leaves)]
        leaves = [v.mean() if i in self.scalars else v for i, v in enumerate(leaves)]
        return tree_unflatten(leaves, self.spec)


class _ContiguousGrad(torch.autograd.Function):
    @staticmethod
    def forward(ctx, value):
        return value.view_as(value)

    @staticmethod
    def backward(ctx, grad):
        return grad.contiguous()


def contiguous_grad(value):
    """`value`, whose gradient will be contiguous. torch's pipeline stages shape the buffer that
    receives a stage's output gradient like the gradient the next stage computed for it, which
    can be a strided view (the gradient of a torch.cat input); collectives refuse those."""
    if isinstance(value, torch.Tensor) and value.requires_grad:
        return _ContiguousGrad.apply(value)
    return value


def resolve(module: nn.Module, target: str):
    value = module
    for part in target.split("."):
        value = getattr(value, part)
    return value


def _key(name: str) -> str:
    return name.replace(".", "__")


class StageModule(nn.Module):
    """One pipeline stage: replays its share of the traced forward with the model's own
    modules. Registers what it owns (its units, and the bare parameters it reads), so its
    parameters() are the stage's and data parallelism wraps exactly them."""

    def __init__(self, entry: nn.Module, plan: StagePlan, stage: int) -> None:
        super().__init__()
        object.__setattr__(self, "_model", entry)  # not a child: the stage must not own the rest
        self.stage = stage
        self.is_last = stage == plan.num_stages - 1
        self.owned = nn.ModuleDict({_key(name): entry.get_submodule(name) for name in plan.owned_modules[stage]})
        self._bare_names = list(plan.owned_params[stage])
        for name in self._bare_names:
            self.register_parameter(_key(name), resolve(entry, name))
        mine = {n for n, s in plan.node_stage.items() if s == stage and n.op != "placeholder"}
        needed = {n for n in mine if n.op != "output"}
        needed |= {attr for n in mine for attr in n.all_input_nodes if attr.op == "get_attr"}
        self._placeholders = stage == 0
        self._nodes = [n for n in plan.graph.nodes if n in needed]
        self._graph = plan.graph
        self._inputs = plan.inputs[stage]
        self._outputs = plan.outputs[stage]
        self._output_node = next(n for n in plan.graph.nodes if n.op == "output")
        self.flat_output = FlatOutput()

    def forward(self, *args, **kwargs):
        if self._placeholders:
            env = bind_placeholders(self._graph, args, kwargs)
        else:
            env = dict(zip(self._inputs, map(contiguous_grad, args)))
        # Read bare parameters through this module: data parallelism swaps them here.
        bare = {name: getattr(self, _key(name)) for name in self._bare_names}
        for node in self._nodes:
            env[node] = run_node(node, env, self._model, bare)
        if self.is_last:
            return self.flat_output.flatten(fx.node.map_arg(self._output_node.args[0], env.__getitem__))
        # Sent as they are: a view's strides would shape the gradient buffer received for it,
        # and collectives take contiguous tensors only.
        values = tuple(env[node].contiguous() for node in self._outputs)
        return values[0] if len(values) == 1 else values

    def publish_parameters(self) -> None:
        """Puts the bare parameters this stage holds (replaced by data parallelism with sharded
        ones) back on the model under their own names, where the optimizer and checkpoints
        find them."""
        for name in self._bare_names:
            owner_name, _, attr = name.rpartition(".")
            owner = self._model.get_submodule(owner_name) if owner_name else self._model
            owner._parameters[attr] = getattr(self, _key(name))


def stage_tensors(entry: nn.Module, plan: StagePlan, stages) -> list[torch.Tensor]:
    """The parameters and buffers `stages` hold: their units' and what they read directly."""
    tensors = []
    for s in stages:
        for name in plan.owned_modules[s]:
            sub = entry.get_submodule(name)
            tensors += [*sub.parameters(), *sub.buffers()]
        tensors += [resolve(entry, name) for name in plan.owned_params[s] + plan.owned_attrs[s]]
    return [t for t in tensors if isinstance(t, torch.Tensor)]


def free_unowned(model: nn.Module, keep: list[torch.Tensor]) -> None:
    """Moves every parameter and buffer of `model` not in `keep` to the meta device: it keeps
    its name and shape (the model summary still counts it) but holds no memory."""
    keep_ids = {id(t) for t in keep}
    with torch.no_grad():
        for sub in model.modules():
            for name, param in list(sub._parameters.items()):
                if param is not None and id(param) not in keep_ids and not param.is_meta:
                    sub._parameters[name] = nn.Parameter(param.to("meta"), requires_grad=param.requires_grad)
            for name, buf in list(sub._buffers.items()):
                if buf is not None and id(buf) not in keep_ids and not buf.is_meta:
                    sub._buffers[name] = buf.to("meta")


def drop_other_stages_params(optimizers) -> None:
    """Removes parameters this rank does not hold (on the meta device) from the optimizers, so
    optimizer state exists for the rank's own stages only."""
    for optimizer in optimizers:
        for group in optimizer.param_groups:
            group["params"] = [p for p in group["params"] if not p.is_meta]
