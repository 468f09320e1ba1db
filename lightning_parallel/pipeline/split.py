"""Split a LightningModule's forward into pipeline stages, without changing the module.

The forward is traced once with torch.fx, the blocks of the model's trunk (its largest
nn.ModuleList / nn.Sequential) kept as opaque calls. Each graph node is given to a stage:
block i to the stage that holds it, every other node to the latest stage among its inputs
(so the prologue before the blocks lands on the first stage and the epilogue after them on
the last). A stage runs its nodes with the model's own submodules, so tensor and data
parallelism applied to those submodules take effect, and shapes stay dynamic (blocks run
eagerly; only the glue between them is replayed from the graph).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import fx, nn

from lightning_parallel.layout import LayoutError


def find_trunk(module: nn.Module) -> tuple[str, list[nn.Module]]:
    """The nn.ModuleList / nn.Sequential holding the most parameters: its children are the
    layers stages are cut between."""
    best, best_size = None, 0
    for name, sub in module.named_modules():
        if isinstance(sub, (nn.ModuleList, nn.Sequential)) and len(sub) >= 2:
            size = sum(p.numel() for p in sub.parameters())
            if size > best_size:
                best, best_size = name, size
    if best is None:
        raise LayoutError(
            "pipeline_parallel needs a trunk to cut: an nn.ModuleList or nn.Sequential of at least two "
            f"layers in {type(module).__name__}, run by its forward. None was found."
        )
    return best, list(module.get_submodule(best))


class _TrunkTracer(fx.Tracer):
    def __init__(self, blocks: set[int]):
        super().__init__()
        self.blocks = blocks

    def is_leaf_module(self, module: nn.Module, qualname: str) -> bool:
        return id(module) in self.blocks or super().is_leaf_module(module, qualname)


def trace(module: nn.Module, blocks: list[nn.Module], concrete_args: dict | None = None) -> fx.Graph:
    """`concrete_args` fixes the forward arguments the step does not pass (to their defaults)."""
    try:
        return _TrunkTracer({id(b) for b in blocks}).trace(module, concrete_args=concrete_args)
    except Exception as err:
        raise LayoutError(
            f"pipeline_parallel cannot split {type(module).__name__}.forward: torch.fx could not trace it "
            f"({type(err).__name__}: {err}). The forward outside the trunk's layers must not branch on tensor "
            "values or iterate over tensors; move such code into a layer, or set pipeline_parallel=1."
        ) from err


@dataclass
class StagePlan:
    """Which graph nodes each stage runs, what crosses between stages, and who owns what."""

    graph: fx.Graph
    node_stage: dict[fx.Node, int]
    inputs: list[list[fx.Node]]  # values stage s receives from stage s-1 (s > 0)
    outputs: list[list[fx.Node]]  # values stage s sends to stage s+1 (s < last)
    owned_modules: list[list[str]]  # module names whose parameters stage s holds
    owned_attrs: list[list[str]]  # buffers and constants read directly (get_attr) by stage s


def plan_stages(module: nn.Module, graph: fx.Graph, trunk: str, block_stage: list[int], num_stages: int) -> StagePlan:
    block_names = {f"{trunk}.{i}": stage for i, stage in enumerate(block_stage)}
    node_stage: dict[fx.Node, int] = {}
    for node in graph.nodes:
        if node.op == "call_module" and node.target in block_names:
            node_stage[node] = block_names[node.target]
        elif node.op == "output":
            node_stage[node] = num_stages - 1
        else:
            node_stage[node] = max((node_stage[arg] for arg in node.all_input_nodes), default=0)
    # A value used by nothing on its own stage but by a later one could run later; running it
    # where its inputs are is right too, and keeps the prologue on the first stage.

    called = [node.target for node in graph.nodes if node.op == "call_module"]
    blocks_called = [name for name in called if name in block_names]
    if blocks_called != list(block_names):
        raise LayoutError(
            f"pipeline_parallel needs the forward to run every layer of {trunk!r} exactly once, in order; "
            f"it ran {blocks_called}."
        )

    owned_modules: list[list[str]] = [[] for _ in range(num_stages)]
    owned_attrs: list[list[str]] = [[] for _ in range(num_stages)]
    users: dict[str, set[int]] = {}
    for node in graph.nodes:
        if node.op == "call_module":
            users.setdefault(node.target, set()).add(node_stage[node])
        elif node.op == "get_attr":
            users.setdefault(node.target, set()).update(node_stage[u] for u in node.users)
    for name, stages in users.items():
        if len(stages) > 1:
            raise LayoutError(
                f"{name!r} is used by pipeline stages {sorted(stages)} (a weight shared across stages, such as "
                "tied input and output embeddings). Stages cannot share parameters: untie them, or choose a "
                "pipeline_split that keeps their users on one stage."
            )
        stage = stages.pop()
        value = _resolve(module, name)
        if isinstance(value, nn.Parameter):
            # A stage registers the modules it owns; a bare parameter would be missed by the
            # stage's data parallelism and gradient handling, and silently not train.
            raise LayoutError(
                f"The forward uses the parameter {name!r} directly. Under pipeline_parallel, parameters must "
                "belong to a submodule the forward calls: wrap it in a small nn.Module."
            )
        (owned_modules if isinstance(value, nn.Module) else owned_attrs)[stage].append(name)

    _check_no_shared_parameters(module, owned_modules)

    inputs: list[list[fx.Node]] = [[] for _ in range(num_stages)]
    outputs: list[list[fx.Node]] = [[] for _ in range(num_stages)]
    for s in range(num_stages - 1):
        crossing = [
            node for node in graph.nodes
            if node_stage[node] <= s and node.op not in ("output", "get_attr")
            and any(node_stage[user] > s for user in node.users)
        ]
        outputs[s] = crossing
        inputs[s + 1] = crossing
    plan = StagePlan(graph, node_stage, inputs, outputs, owned_modules, owned_attrs)
    for s in range(1, num_stages):
        placeholders = [n.name for n in inputs[s] if n.op == "placeholder"]
        if placeholders:
            raise LayoutError(
                f"Pipeline stage {s} needs the forward's input(s) {placeholders}, but only the first stage "
                "receives the model's inputs. Use the inputs before the trunk, or pass them through the layers."
            )
    return plan


def _check_no_shared_parameters(module: nn.Module, owned_modules: list[list[str]]) -> None:
    """A parameter registered in two modules (tied weights) must not be split between stages."""
    holder: dict[int, tuple[int, str]] = {}
    for stage, names in enumerate(owned_modules):
        for name in names:
            for pname, param in module.get_submodule(name).named_parameters():
                where = f"{name}.{pname}"
                if id(param) in holder and holder[id(param)][0] != stage:
                    other_stage, other = holder[id(param)]
                    raise LayoutError(
                        f"{other!r} (stage {other_stage}) and {where!r} (stage {stage}) are one tied weight, such as tied "
                        "input and output embeddings. Stages cannot share parameters: untie them, or choose a "
                        "pipeline_split that keeps both on one stage."
                    )
                holder.setdefault(id(param), (stage, where))


def _resolve(module: nn.Module, target: str):
    value = module
    for part in target.split("."):
        value = getattr(value, part)
    return value


class StageModule(nn.Module):
    """One pipeline stage: replays its share of the traced forward with the model's own
    submodules. Registers only the submodules it owns, so its parameters() are the stage's."""

    def __init__(self, model: nn.Module, plan: StagePlan, stage: int) -> None:
        super().__init__()
        object.__setattr__(self, "_model", model)  # not a child: the stage must not own the rest
        self.stage = stage
        self.is_last = stage == len(plan.inputs) - 1
        self.owned = nn.ModuleDict({name.replace(".", "__"): model.get_submodule(name) for name in plan.owned_modules[stage]})
        self._nodes = [n for n in plan.graph.nodes if plan.node_stage[n] == stage and n.op != "output"]
        self._inputs = plan.inputs[stage]
        self._outputs = plan.outputs[stage]
        self._output_node = next(n for n in plan.graph.nodes if n.op == "output")

    def forward(self, *args, **kwargs):
        env: dict[fx.Node, object] = dict(zip(self._inputs, args))
        placeholders = iter(args)
        for node in self._nodes:
            if node.op == "placeholder":
                if node.target in kwargs:
                    env[node] = kwargs[node.target]
                else:
                    env[node] = next(placeholders, node.args[0] if node.args else None)
            elif node.op == "get_attr":
                env[node] = _resolve(self._model, node.target)
            else:
                node_args = fx.node.map_arg(node.args, env.__getitem__)
                node_kwargs = fx.node.map_arg(node.kwargs, env.__getitem__)
                if node.op == "call_module":
                    env[node] = self._model.get_submodule(node.target)(*node_args, **node_kwargs)
                elif node.op == "call_function":
                    env[node] = node.target(*node_args, **node_kwargs)
                else:  # call_method
                    obj, *rest = node_args
                    env[node] = getattr(obj, node.target)(*rest, **node_kwargs)
        if self.is_last:
            return fx.node.map_arg(self._output_node.args[0], env.__getitem__)
        values = tuple(env[node] for node in self._outputs)
        return values[0] if len(values) == 1 else values


def _tensors_of(module: nn.Module) -> list[torch.Tensor]:
    return [*module.parameters(), *module.buffers()]


def free_unowned(model: nn.Module, plans: StagePlan, stages: list[int]) -> None:
    """Moves every parameter and buffer that none of `stages` owns to the meta device: it keeps
    its name and shape (the model summary still counts it) but holds no memory."""
    def owned_by(stage_ids) -> set[int]:
        ids = {id(t) for s in stage_ids for name in plans.owned_modules[s] for t in _tensors_of(model.get_submodule(name))}
        return ids | {id(_resolve(model, name)) for s in stage_ids for name in plans.owned_attrs[s]}

    keep = owned_by(stages)
    num_stages = len(plans.inputs)
    if num_stages - 1 in stages:
        # Parameters the forward never touches (a loss module's, say) live on the last stage,
        # where the training step runs.
        used = owned_by(range(num_stages))
        keep |= {id(t) for t in _tensors_of(model) if id(t) not in used}
    with torch.no_grad():
        for sub in model.modules():
            for name, param in list(sub._parameters.items()):
                if param is not None and id(param) not in keep and not param.is_meta:
                    sub._parameters[name] = nn.Parameter(param.to("meta"), requires_grad=param.requires_grad)
            for name, buf in list(sub._buffers.items()):
                if buf is not None and id(buf) not in keep and not buf.is_meta:
                    sub._buffers[name] = buf.to("meta")


def drop_other_stages_params(optimizers) -> None:
    """Removes parameters this rank does not hold (on the meta device) from the optimizers, so
    optimizer state exists for the rank's own stages only."""
    for optimizer in optimizers:
        for group in optimizer.param_groups:
            group["params"] = [p for p in group["params"] if not p.is_meta]
