"""Measure what each layer costs and cut the trunk into stages of equal measured cost.

Layer counts lie: an embedding or an LM head can cost several blocks. The profile times every
module call of one forward and backward on a real micro-batch (module hooks), groups the
times into the prologue (before the first trunk layer, lands on the first stage), each trunk
layer, and the epilogue (after the last layer, lands on the last stage), and averages them
over all ranks so every rank computes the same split.
"""

from __future__ import annotations

import time
import warnings
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn

from lightning_parallel.layout import LayoutError


@dataclass
class Profile:
    prologue: float
    blocks: list[float]
    epilogue: float


def _sync() -> None:
    if torch.accelerator.is_available():
        torch.accelerator.synchronize()


def profile(model: nn.Module, blocks: list[nn.Module], run_forward, repeats: int = 3) -> Profile:
    """Seconds of forward+backward per unit (median over `repeats`), averaged over ranks.
    `run_forward()` runs the model's forward on a probe micro-batch and returns its output."""
    block_index = {id(b): i for i, b in enumerate(blocks)}
    samples: list[list[float]] = []
    for _ in range(repeats):
        costs = [0.0] * (len(blocks) + 2)  # prologue, blocks..., epilogue
        phase = {"unit": 0}
        started: dict[int, float] = {}

        def unit_of(module):
            return block_index[id(module)] + 1 if id(module) in block_index else phase["unit"]

        def pre(module, args):
            _sync()
            started[id(module)] = time.perf_counter()

        def post(module, args, output):
            _sync()
            unit = unit_of(module)
            costs[unit] += time.perf_counter() - started.pop(id(module))
            if id(module) in block_index:
                phase["unit"] = len(blocks) + 1 if block_index[id(module)] == len(blocks) - 1 else unit

        def bwd_pre(module, grad_output):
            _sync()
            started[-id(module)] = time.perf_counter()

        def bwd_post(module, grad_input, grad_output):
            _sync()
            costs[backward_unit[id(module)]] += time.perf_counter() - started.pop(-id(module), time.perf_counter())

        inside_blocks = {id(m) for b in blocks for m in b.modules() if m is not b}
        timed = [
            m for m in model.modules()
            if id(m) in block_index or (id(m) not in inside_blocks and not list(m.children()) and list(m.parameters(recurse=False)))
        ]
        backward_unit: dict[int, int] = {}
        handles = []
        for m in timed:
            handles += [m.register_forward_pre_hook(pre), m.register_forward_hook(post)]

        def remember_unit(module, args, output):
            backward_unit[id(module)] = unit_of(module) if id(module) in block_index else phase["unit"]

        for m in timed:
            handles += [m.register_forward_hook(remember_unit, prepend=True),
                        m.register_full_backward_pre_hook(bwd_pre), m.register_full_backward_hook(bwd_post)]
        try:
            with warnings.catch_warnings():
                # The first timed module (an embedding of integer tokens) has no input that
                # requires grad; torch warns that its hook sees output gradients only, as intended.
                warnings.filterwarnings("ignore", message="Full backward hook is firing")
                output = run_forward()
                loss = sum(t.float().sum() for t in _tensors(output) if t.requires_grad)
                loss.backward()
        finally:
            for handle in handles:
                handle.remove()
        model.zero_grad(set_to_none=True)
        samples.append(costs)
    median = torch.tensor(samples).median(dim=0).values
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(median, op=dist.ReduceOp.SUM)
        median /= dist.get_world_size()
    median = median.tolist()
    return Profile(median[0], median[1:-1], median[-1])


def _tensors(value):
    if isinstance(value, torch.Tensor):
        return [value]
    if isinstance(value, dict):
        value = list(value.values())
    if isinstance(value, (list, tuple)):
        return [t for v in value for t in _tensors(v)]
    return [t for t in vars(value).values() if isinstance(t, torch.Tensor)] if hasattr(value, "__dict__") else []


def balanced_split(costs: list[float], first_extra: float, last_extra: float, num_stages: int) -> list[int]:
    """Stage of each block: contiguous, at least one block per stage, the largest stage cost
    (the first stage also pays `first_extra`, the last `last_extra`) as small as possible."""
    n = len(costs)
    if num_stages > n:
        raise LayoutError(f"{num_stages} pipeline stages need at least {num_stages} trunk layers to cut between; the model has {n}.")
    prefix = [0.0]
    for c in costs:
        prefix.append(prefix[-1] + c)

    def stage_cost(start, end, stage):
        extra = (first_extra if stage == 0 else 0.0) + (last_extra if stage == num_stages - 1 else 0.0)
        return prefix[end] - prefix[start] + extra

    inf = float("inf")
    # best[s][i]: smallest max cost putting blocks[:i] on stages 0..s-1; cut[s][i]: where stage s-1 began.
    best = [[inf] * (n + 1) for _ in range(num_stages + 1)]
    cut = [[0] * (n + 1) for _ in range(num_stages + 1)]
    best[0][0] = 0.0
    for s in range(1, num_stages + 1):
        for i in range(s, n - (num_stages - s) + 1):
            for j in range(s - 1, i):
                value = max(best[s - 1][j], stage_cost(j, i, s - 1))
                if value < best[s][i]:
                    best[s][i], cut[s][i] = value, j
    stages, end = [0] * n, n
    for s in range(num_stages, 0, -1):
        start = cut[s][end]
        for i in range(start, end):
            stages[i] = s - 1
        end = start
    return stages


def stage_costs(profile: Profile, block_stage: list[int], num_stages: int) -> list[float]:
    costs = [0.0] * num_stages
    for cost, stage in zip(profile.blocks, block_stage):
        costs[stage] += cost
    costs[0] += profile.prologue
    costs[-1] += profile.epilogue
    return costs


def split_from_names(trunk: str, names: list[str], n_blocks: int, num_stages: int) -> list[int]:
    """Stage of each block from explicit split points: the names of the layers that begin
    stages 1, 2, ... (e.g. ["blocks.2", "blocks.4"])."""
    if len(names) != num_stages - 1:
        raise LayoutError(
            f"pipeline_split lists {len(names)} split points, but {num_stages} stages need {num_stages - 1}: the "
            f"names of the layers that begin stages 1..{num_stages - 1} (e.g. '{trunk}.2')."
        )
    starts = []
    for name in names:
        prefix = f"{trunk}."
        index = name[len(prefix):] if name.startswith(prefix) else None
        if index is None or not index.isdigit() or not 0 < int(index) < n_blocks:
            raise LayoutError(
                f"pipeline_split point {name!r} is not a layer of the trunk {trunk!r} other than the first "
                f"(use '{trunk}.1' ... '{trunk}.{n_blocks - 1}')."
            )
        starts.append(int(index))
    if starts != sorted(set(starts)):
        raise LayoutError(f"pipeline_split points {names} must be distinct and in order.")
    return [sum(1 for start in starts if i >= start) for i in range(n_blocks)]
