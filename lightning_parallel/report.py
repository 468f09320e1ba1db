"""The start-up report, printed once by rank 0 when the model is parallelized: one block with
every rank's host, node and mesh coordinates beside what it holds, then the tensor-parallel plan
and the pipeline split with each stage's estimated cost."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import astuple, dataclass

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.tensor import DTensor

from lightning_parallel.layout import Layout

MIB = 2**20
# Tensors of state per parameter element, by optimizer class (Adam keeps two moments).
OPTIMIZER_STATES = {"Adam": 2, "AdamW": 2, "Adamax": 2, "NAdam": 2, "RAdam": 2, "Adagrad": 1, "RMSprop": 1,
                    "Adadelta": 2, "SGD": 1, "ASGD": 2, "Rprop": 2}


@dataclass
class Held:
    """What one rank holds: elements of parameters, gradients and optimizer state, and their bytes."""

    parameters: int = 0
    gradients: int = 0
    optimizer: int = 0
    bytes: int = 0


def optimizer_states(optimizer: torch.optim.Optimizer) -> int:
    """Tensors of state the optimizer keeps per parameter element (unknown kinds count as Adam)."""
    name = type(optimizer).__name__
    if name == "SGD" and not optimizer.defaults.get("momentum"):
        return 0
    return OPTIMIZER_STATES.get(name, 2)


def local_elements(tensor: torch.Tensor) -> int:
    """Elements this rank stores: its shard of a DTensor, nothing of a tensor on meta."""
    if tensor.is_meta:
        return 0
    return (tensor.to_local() if isinstance(tensor, DTensor) else tensor).numel()


def held_by(module: nn.Module, optimizers: Iterable[torch.optim.Optimizer], training: bool) -> Held:
    """What this rank holds of `module`; gradients and optimizer state only when training (the
    optimizer's state, allocated at its first step, counted from its kind)."""
    held = Held()
    for param in module.parameters():
        elements, learns = local_elements(param), training and param.requires_grad
        held.parameters += elements
        held.gradients += elements if learns else 0
        held.bytes += elements * param.element_size() * (2 if learns else 1)
    for optimizer in optimizers if training else ():
        states = optimizer_states(optimizer)
        for group in optimizer.param_groups:
            for param in group["params"]:
                elements = states * local_elements(param)
                held.optimizer += elements
                held.bytes += elements * param.element_size()
    return held


def gather_held(held: Held, device: torch.device) -> list[Held]:
    """Every rank's `Held`, in rank order (a collective: every rank calls it)."""
    mine = torch.tensor(astuple(held), dtype=torch.int64, device=device)
    everyone = [torch.empty_like(mine) for _ in range(dist.get_world_size())]
    dist.all_gather(everyone, mine)
    return [Held(*values) for values in torch.stack(everyone).tolist()]


def startup_report(layout: Layout, ranks: Sequence[tuple[str, int, Sequence[int]]], held: Sequence[Held],
                   sections: Sequence[str] = (), experts_per_layer: Sequence[int] = ()) -> str:
    """`ranks[r]` is rank r's (host name, node rank, (pp, dp_replicate, dp_shard, tp) coordinate).
    The node index tells nodes apart where host names do not (several emulated nodes on one host).
    Under expert parallelism, each rank's ep coordinate (its dp coordinate modulo ep) and the
    experts it holds of each MoE layer (`experts_per_layer`: every experts module's count).
    `sections` (the tensor plan, the pipeline split) follow the table."""
    hybrid = 1 < layout.dp_shard < layout.dp
    counts = set(experts_per_layer)
    experts = f"experts (of {counts.pop()})" if len(counts) == 1 else "experts"
    header = ["rank", "host", "node", "pp", "dp (replica/shard)" if hybrid else "dp", "tp",
              *(["ep", experts] if layout.ep > 1 else []), "parameters", "gradients", "optimizer", "MiB"]
    rows = []
    for rank, ((host, node, (pp, replica, shard, tp)), mine) in enumerate(zip(ranks, held)):
        dp_index = replica * layout.dp_shard + shard
        dp = str(dp_index) + (f" ({replica}/{shard})" if hybrid else "")
        ep = [str(dp_index % layout.ep), _experts_held(dp_index % layout.ep, layout.ep, experts_per_layer)]
        rows.append([str(rank), host, str(node), str(pp), dp, str(tp), *(ep if layout.ep > 1 else []),
                     f"{mine.parameters:,}", f"{mine.gradients:,}", f"{mine.optimizer:,}", f"{mine.bytes / MIB:,.1f}"])
    lines = [f"HybridParallel layout {layout} on {layout.world_size} processes", *_table(header, rows),
             "  Each rank holds its parameters, gradients and optimizer state (elements; MiB together). Activations "
             "come on top: `lightning-parallel plan` estimates them."]
    return "\n".join([*lines, *sections])


def _experts_held(ep_index: int, ep: int, experts_per_layer: Sequence[int]) -> str:
    """The experts an ep rank holds of each MoE layer: their ids when every layer has as many."""
    counts = set(experts_per_layer)
    if len(counts) != 1:
        return f"{ep_index + 1}/{ep}"
    local = counts.pop() // ep
    return f"{ep_index * local}-{(ep_index + 1) * local - 1}"


def _table(header: list[str], rows: list[list[str]]) -> list[str]:
    """Columns as wide as their widest cell; the host column left-aligned, the others right."""
    widths = [max(len(row[i]) for row in [header, *rows]) for i in range(len(header))]
    host = header.index("host")

    def line(cells: list[str]) -> str:
        return "  " + "  ".join(c.ljust(w) if i == host else c.rjust(w) for i, (c, w) in enumerate(zip(cells, widths)))

    return [line(header)] + [line(row) for row in rows]


__all__ = ["Held", "OPTIMIZER_STATES", "gather_held", "held_by", "local_elements", "optimizer_states",
           "startup_report"]
