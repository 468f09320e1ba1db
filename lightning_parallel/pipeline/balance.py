"""Cut the forward's units into stages of equal counted cost.

Layer counts lie (an embedding or an LM head can cost several blocks), and timings are noisy
(two runs of the same model could cut differently). Costs are counted instead (cost.py): the
same model and input shapes give the same split on every run and every rank. Where the best
cut of the current units is still uneven, the costliest container among them (an
nn.Sequential, or a module holding a list of layers) is opened and its layers become units.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import fx, nn

from lightning_parallel.layout import LayoutError
from lightning_parallel.pipeline.cost import Hardware
from lightning_parallel.pipeline.split import Measured, allowed_cuts, measure, trace, unit_costs, units_of

# Open containers until the costliest stage is within this fraction of the ideal (total / stages).
BALANCE_TOLERANCE = 0.05


@dataclass
class Split:
    graph: fx.Graph
    measured: Measured
    unit_stage: list[int]  # stage of each unit, in the forward's order
    costs: list[float]  # seconds of forward per unit (code between units included)
    opened: set[str]


def balanced_split(costs: list[float], allowed: list[bool], num_stages: int) -> list[int] | None:
    """Stage of each unit: contiguous, at least one unit per stage, cuts only where allowed,
    the largest stage cost as small as possible. None if there are too few places to cut."""
    n = len(costs)
    prefix = [0.0]
    for c in costs:
        prefix.append(prefix[-1] + c)
    inf = float("inf")
    # best[s][i]: smallest max cost putting units[:i] on stages 0..s-1; start[s][i]: where stage s-1 began.
    best = [[inf] * (n + 1) for _ in range(num_stages + 1)]
    start = [[0] * (n + 1) for _ in range(num_stages + 1)]
    best[0][0] = 0.0
    for s in range(1, num_stages + 1):
        ends = [n] if s == num_stages else [i for i in range(s, n) if allowed[i]]
        for i in ends:
            for j in range(s - 1, i):
                if j > 0 and not allowed[j] or best[s - 1][j] == inf:
                    continue
                value = max(best[s - 1][j], prefix[i] - prefix[j])
                if value < best[s][i]:
                    best[s][i], start[s][i] = value, j
    if best[num_stages][n] == inf:
        return None
    stages, end = [0] * n, n
    for s in range(num_stages, 0, -1):
        begin = start[s][end]
        stages[begin:end] = [s - 1] * (end - begin)
        end = begin
    return stages


def stage_costs(costs: list[float], unit_stage: list[int], num_stages: int) -> list[float]:
    totals = [0.0] * num_stages
    for cost, stage in zip(costs, unit_stage):
        totals[stage] += cost
    return totals


def _holds_layers(module: nn.Module, blocks_only: bool) -> bool:
    layers = [c for c in module.children() if any(True for _ in c.parameters())]
    if blocks_only:  # a block is a module made of modules (not a Linear, a norm, ...)
        layers = [c for c in layers if any(True for _ in c.children())]
    return isinstance(module, (nn.Sequential, nn.ModuleList)) and len(layers) >= 2


def openable(module: nn.Module, blocks_only: bool = True) -> bool:
    """A container the split could cut inside: an nn.Sequential of layers, or a module holding
    one (or an nn.ModuleList of them). With `blocks_only`, only containers of blocks: a block
    made of primitive modules (Linear, norms, activations) is a layer itself."""
    return ((isinstance(module, nn.Sequential) and _holds_layers(module, blocks_only))
            or any(_holds_layers(c, blocks_only) for c in module.children()))


def _to_open(entry, graph, costs, ideal, refused, can_cut: bool) -> str | None:
    """The unit to trace into next: the costliest container of blocks worth opening, else a
    sequence of primitive layers that alone outweighs a stage (or any, when nothing can be cut)."""
    units = [(cost, node.target) for cost, node in zip(costs, units_of(graph)) if node.target not in refused]
    blocks = [u for u in units if u[0] > BALANCE_TOLERANCE * ideal and openable(entry.get_submodule(u[1]))]
    layers = [u for u in units if (u[0] > ideal or not can_cut) and openable(entry.get_submodule(u[1]), blocks_only=False)]
    candidates = blocks or layers
    return max(candidates)[1] if candidates else None


def auto_split(entry: nn.Module, num_stages: int, args: tuple, kwargs: dict, concrete_args: dict,
               hardware: Hardware) -> Split:
    opened: set[str] = set()
    refused: set[str] = set()  # containers whose forward fx cannot trace: they stay units
    graph = trace(entry, opened, concrete_args)
    while True:
        measured = measure(entry, graph, args, kwargs, hardware)
        costs = unit_costs(graph, measured)
        unit_stage = balanced_split(costs, allowed_cuts(graph, measured), num_stages)
        ideal = sum(costs) / num_stages
        worst = max(stage_costs(costs, unit_stage, num_stages)) if unit_stage else float("inf")
        if worst <= ideal * (1 + BALANCE_TOLERANCE):
            break
        name = _to_open(entry, graph, costs, ideal, refused | opened, unit_stage is not None)
        if name is None:
            break
        try:
            graph = trace(entry, opened | {name}, concrete_args)
            opened.add(name)
        except LayoutError:
            refused.add(name)
            graph = trace(entry, opened, concrete_args)
    if unit_stage is None:
        raise _too_few_cuts(graph, measured, num_stages)
    return Split(graph, measured, unit_stage, costs, opened)


def named_split(entry: nn.Module, names: list[str], num_stages: int, args: tuple, kwargs: dict,
                concrete_args: dict, hardware: Hardware) -> Split:
    """Stages begin at the given modules (names relative to `entry`): the containers around
    them are opened so that each is a unit."""
    if len(names) != num_stages - 1:
        raise LayoutError(
            f"pipeline_split lists {len(names)} split points, but {num_stages} stages need {num_stages - 1}: the "
            f"names of the modules that begin stages 1..{num_stages - 1} (e.g. 'blocks.2')."
        )
    # Every container around a split point (a ModuleList is never called: opening it changes nothing).
    opened = {name.rsplit(".", k)[0] for name in names for k in range(1, name.count(".") + 1)}
    graph = trace(entry, opened, concrete_args)
    measured = measure(entry, graph, args, kwargs, hardware)
    units = [node.target for node in units_of(graph)]
    allowed = allowed_cuts(graph, measured)
    starts = []
    for name in names:
        if name not in units or units.index(name) == 0:
            raise LayoutError(
                f"pipeline_split point {name!r} is not a module the forward calls after its first one; the "
                f"forward calls, in order: {', '.join(dict.fromkeys(units))}."
            )
        start = units.index(name)
        if not allowed[start]:
            raise LayoutError(
                f"pipeline_split point {name!r}: stages cannot be cut there (a module called on both sides, or a "
                "value that is not one tensor would cross). Pick a neighbouring module."
            )
        starts.append(start)
    unit_stage = stages_from_starts(names, starts, len(units))
    return Split(graph, measured, unit_stage, unit_costs(graph, measured), opened)


def stages_from_starts(names: list[str], starts: list[int], num_units: int) -> list[int]:
    """The stage of each unit when stages 1, 2, ... begin at the units `starts` (named `names`)."""
    if starts != sorted(set(starts)):
        raise LayoutError(f"pipeline_split points {names} must be distinct and in the forward's order.")
    return [sum(1 for start in starts if i >= start) for i in range(num_units)]


def redo_split(entry: nn.Module, opened: set[str], unit_stage: list[int], args: tuple, kwargs: dict,
               concrete_args: dict, hardware: Hardware) -> Split:
    """Another rank's split, rebuilt here from the containers it opened and its stage of each unit."""
    graph = trace(entry, opened, concrete_args)
    measured = measure(entry, graph, args, kwargs, hardware)
    return Split(graph, measured, unit_stage, unit_costs(graph, measured), opened)


def _too_few_cuts(graph: fx.Graph, measured: Measured, num_stages: int) -> LayoutError:
    units = [node.target for node in units_of(graph)]
    places = sum(allowed_cuts(graph, measured))
    return LayoutError(
        f"{num_stages} pipeline stages need {num_stages - 1} places to cut the forward, but it offers {places}: "
        f"it calls {', '.join(units)}. Stages are cut between module calls (not where a module is called on both "
        "sides or a value other than one tensor would cross). Lower pipeline_parallel, or pick a schedule with one "
        "stage per rank."
    )
