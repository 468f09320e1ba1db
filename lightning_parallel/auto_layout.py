"""`HybridParallel(layout="auto")`: the planner's first layout for this model, batch and world.

Chosen in the strategy's setup, when the model and a batch exist: rank 0 plans on a meta copy of
the module (nothing allocated) with the batch the user's DataLoader gives (its size is per
data-parallel rank, as in Lightning, so each layout trains on that times its dp degree and
layouts are ranked by seconds per sample), and every rank takes rank 0's choice.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Optional

import torch
from torch.utils._pytree import tree_map

from lightning_parallel import planner
from lightning_parallel.layout import LayoutError

LAYOUT_CHOICES = ("given", "auto")
# The arguments layout="auto" chooses, with the values that leave them to it.
CHOSEN = {"data_parallel": "auto", "tensor_parallel": 1, "pipeline_parallel": 1, "expert_parallel": 1, "sharding": "none",
          "data_parallel_shard": "auto", "micro_batches": None, "schedule": "1f1b", "activation_checkpointing": "none"}


def check_auto_layout(layout: str, machine: Optional[str], given: dict) -> None:
    if layout not in LAYOUT_CHOICES:
        raise LayoutError(f"layout={layout!r} is not one of {LAYOUT_CHOICES}: 'auto' lets the planner choose the degrees, "
                          "sharding, schedule, micro-batches and activation checkpointing.")
    if machine is not None and machine not in planner.MACHINES:
        raise LayoutError(f"machine={machine!r} is not a planner preset: choose one of {sorted(planner.MACHINES)}.")
    set_too = [name for name, value in given.items() if name in CHOSEN and value != CHOSEN[name]]
    if layout == "auto" and set_too:
        raise LayoutError(f"layout='auto' chooses {', '.join(CHOSEN)} itself, but {', '.join(set_too)} "
                          "were given too: leave them unset, or drop layout='auto'.")


def default_machine(device: torch.device) -> str:
    if device.type != "cuda":
        return "cpu"
    name = torch.cuda.get_device_name(device)
    return "8xa100" if "A100" in name else "8xh100"


def choose(module, step: str, batch, world_size: int, per_node: int, device: torch.device, machine: Optional[str],
           precision: str, tensor_plan, expert_plan="auto") -> tuple[Optional[planner.Option], str]:
    """(the first layout that fits, or None; the ranked table to show). Runs on one rank."""
    preset = replace(planner.MACHINES[machine or default_machine(device)], devices_per_node=per_node)
    on_meta = tree_map(lambda t: t.to("meta") if isinstance(t, torch.Tensor) else t, batch)
    predictions = planner.plan_per_rank_batch(planner.meta_copy(module), on_meta, world_size, preset, precision,
                                              tensor_plan, step, expert_plan=expert_plan)
    first = next((p for p in predictions if p.fits), None)
    return (first.option if first else None), planner.format_plan(predictions, top=5)


def applied(strategy, option: planner.Option) -> None:
    """Sets the strategy's arguments to the chosen layout's."""
    strategy.data_parallel, strategy.tensor_parallel = option.dp, option.tp
    strategy.pipeline_parallel, strategy.sharding = option.pp, option.sharding
    strategy.expert_parallel = option.ep
    strategy.data_parallel_shard = option.dp_shard if option.sharding == "hybrid" else "auto"
    strategy.schedule, strategy.activation_checkpointing = option.schedule, option.activation_checkpointing
    strategy.micro_batches = option.micro_batches if option.pp > 1 else 2 * option.pp
