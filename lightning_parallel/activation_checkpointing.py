"""Activation checkpointing of the trunk blocks: memory for compute.

- "full": a block keeps only its inputs from the forward; the backward runs its forward again
  to get the activations it needs.
- "selective": the outputs of matmul-like ops (matmuls, convolutions, attention) and of
  collectives are kept; the cheap ops between them (norms, activations, adds, reshapes) are
  recomputed.

Each block's forward is replaced by an instance attribute that runs the original under
`torch.utils.checkpoint` (non-reentrant), instead of the block being wrapped in a new module:
parameter names (state dicts, checkpoints, tensor plans) stay as they are, FSDP2's hooks
(registered on the block afterwards) run outside the checkpointed region, and DTensor
parameters pass through untouched. The RNG state is restored for the recompute, so dropout
draws the same masks twice.
"""

from __future__ import annotations

import functools

import torch
from lightning.pytorch.utilities.rank_zero import rank_zero_info, rank_zero_warn
from torch import nn
from torch.utils.checkpoint import checkpoint, create_selective_checkpoint_contexts

from lightning_parallel.layout import LayoutError
from lightning_parallel.pipeline.schedules import SCHEDULES

AC_CHOICES = ("none", "full", "selective")

_MATMUL_LIKE = ("mm", "addmm", "bmm", "baddbmm", "linear", "convolution",
                # scaled_dot_product_attention's kernels, by backend
                "_scaled_dot_product_flash_attention_for_cpu", "_scaled_dot_product_flash_attention",
                "_scaled_dot_product_efficient_attention", "_scaled_dot_product_cudnn_attention",
                "_scaled_dot_product_fused_attention_overrideable", "_scaled_dot_product_attention_math")
# Kept so that the recompute does not communicate again (tensor and sequence parallelism).
_COLLECTIVES = ("all_reduce", "reduce_scatter_tensor", "all_gather_into_tensor", "all_to_all_single", "wait_tensor")


def check_activation_checkpointing(mode: str, schedule_spec) -> None:
    """Refuses selective checkpointing with the pipeline schedules that run a block's backward
    twice. `schedule_spec` is the pipeline's ScheduleSpec, None without pipeline parallelism."""
    if mode != "selective" or schedule_spec is None or not schedule_spec.split_backward:
        return
    name = schedule_name(schedule_spec)
    raise LayoutError(f"activation_checkpointing='selective' does not work with schedule={name!r}: "
                      "it computes a stage's input and weight gradients in two backward passes, and selective "
                      "checkpointing keeps the outputs it saves for one backward only. Choose "
                      "activation_checkpointing='full' (which recomputes a block for each pass), or schedule='gpipe', "
                      "'1f1b', 'interleaved_1f1b' or 'looped_bfs'.")


def schedule_name(schedule_spec) -> str:
    return next((name for name, spec in SCHEDULES.items() if spec == schedule_spec), schedule_spec.cls_name)


def _ops(namespace, names: tuple[str, ...]) -> list:
    return [getattr(namespace, name).default for name in names if hasattr(namespace, name)]


@functools.cache
def saved_by_selective() -> list:
    """The ops whose outputs selective checkpointing keeps (those this torch build has)."""
    return _ops(torch.ops.aten, _MATMUL_LIKE) + _ops(torch.ops._c10d_functional, _COLLECTIVES)


def _selective_contexts():
    return create_selective_checkpoint_contexts(saved_by_selective())


class CheckpointedForward:
    """A block's forward, run under torch.utils.checkpoint. A callable object rather than a
    closure, so that a deep copy of the block calls the copy's own forward."""

    def __init__(self, forward, selective: bool) -> None:
        self.inner = forward
        self.selective = selective

    def __call__(self, *args, **kwargs):
        if self.selective:
            return checkpoint(self.inner, *args, use_reentrant=False, context_fn=_selective_contexts, **kwargs)
        return checkpoint(self.inner, *args, use_reentrant=False, **kwargs)


def trunk_blocks(blocks: list[nn.Module]) -> list[nn.Module]:
    """The blocks worth checkpointing or compiling: not torch.nn's own single layers (an
    embedding or a head that a pipeline stage holds), whose backward needs only their input."""
    return [block for block in blocks
            if next(block.children(), None) is not None or not type(block).__module__.startswith("torch.nn.")]


def apply_activation_checkpointing(blocks: list[nn.Module], mode: str) -> None:
    """Runs each block's forward under checkpointing as `mode` says ("none" changes nothing).
    Touches no tensor: the blocks may still be on the meta device."""
    if mode == "none":
        return
    chosen = trunk_blocks(blocks)
    if not chosen:
        rank_zero_warn(f"activation_checkpointing={mode!r} found no blocks to checkpoint (the parameter-holding "
                       "elements of an nn.ModuleList, nn.Sequential or nn.ModuleDict): nothing is recomputed.")
        return
    for block in chosen:
        if not isinstance(block.forward, CheckpointedForward):  # Lightning may set a model up twice
            block.forward = CheckpointedForward(block.forward, selective=mode == "selective")
    rank_zero_info(f"Activation checkpointing ({mode}) of {len(chosen)} blocks ({_kinds(chosen)}).")


def _kinds(blocks: list[nn.Module]) -> str:
    return ", ".join(dict.fromkeys(type(block).__name__ for block in blocks))
