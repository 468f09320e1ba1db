"""torch.compile of the trunk blocks.

Each block's forward (its checkpointed forward, under activation checkpointing, so that the
compiler sees the recompute and plans it) is replaced by an instance attribute that calls one
compiled function shared by every block: the blocks share their code, so they share compiled
graphs too (one per mode, train or eval, and input shape), instead of one compilation per block.
FSDP2's hooks, registered on the blocks afterwards, stay outside the compiled region.
"""

from __future__ import annotations

import functools

import torch
from lightning.pytorch.utilities.rank_zero import rank_zero_info, rank_zero_warn
from torch import nn

from lightning_parallel.activation_checkpointing import schedule_name, trunk_blocks
from lightning_parallel.layout import LayoutError


def check_compile(compile: bool, schedule_spec) -> None:
    """Refuses compile=True with the pipeline schedules torch cannot run compiled stages with.
    `schedule_spec` is the pipeline's ScheduleSpec, None without pipeline parallelism."""
    if not compile or schedule_spec is None or not schedule_spec.split_backward:
        return
    name = schedule_name(schedule_spec)
    raise LayoutError(f"compile=True does not work with schedule={name!r}: it computes a stage's "
                      "input and weight gradients in two backward passes over a retained graph, which a compiled "
                      "block's backward refuses (it frees its buffers in the first; pytorch/pytorch#161904). Choose "
                      "schedule='gpipe', '1f1b', 'interleaved_1f1b' or 'looped_bfs', or set compile=False.")


def _call(forward, *args, **kwargs):
    return forward(*args, **kwargs)


@functools.cache
def _compiled_call():
    return torch.compile(_call)


class CompiledForward:
    """A block's forward, run through the shared compiled function. A callable object rather
    than a closure, so that a deep copy of the block calls the copy's own forward."""

    def __init__(self, forward) -> None:
        self.inner = forward

    def __call__(self, *args, **kwargs):
        return _compiled_call()(self.inner, *args, **kwargs)


def apply_compile(blocks: list[nn.Module]) -> None:
    """Compiles each block's forward (after activation checkpointing, before data parallelism).
    Touches no tensor: the blocks may still be on the meta device."""
    chosen = trunk_blocks(blocks)
    if not chosen:
        rank_zero_warn("compile=True found no blocks to compile (the parameter-holding elements of an "
                       "nn.ModuleList, nn.Sequential or nn.ModuleDict): the model runs uncompiled.")
        return
    for block in chosen:
        if not isinstance(block.forward, CompiledForward):  # Lightning may set a model up twice
            block.forward = CompiledForward(block.forward)
    rank_zero_info(f"torch.compile of {len(chosen)} blocks (compiled at their first call).")
