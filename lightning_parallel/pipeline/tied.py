"""Weights tied across pipeline stages: input and output embeddings, as Llama 3.2, Qwen2.5, Gemma
and GPT-2 ship them (`tie_word_embeddings=True`), or `self.head.weight = self.tok_emb.weight`.

Every rank holding a stage that uses the weight holds it (its shard, under tensor and data
parallelism) and keeps one parameter behind all of the weight's names, as one process does; the
copies on different ranks start equal and their gradients are summed across those ranks before
each optimizer step (Megatron's embedding group), so every copy takes the same step and they stay
equal. Names, checkpoints (each holder writes the same key; DCP keeps one copy) and exports stay
as one process has them. The global gradient norm counts the weight once.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.tensor import DTensor

from lightning_parallel.layout import LayoutError


@dataclass(frozen=True)
class Tie:
    names: tuple[str, ...]  # the weight's names, relative to the module cut into stages; the first is its own
    stages: tuple[int, ...]  # the stage whose module holds each name


def find_ties(entry: nn.Module, owned_modules: list[list[str]], owned_params: list[list[str]]) -> list[Tie]:
    """The parameters that modules of different stages hold. A parameter the forward reads directly
    (`x @ self.emb.weight.T`) cannot be one of them: the stage reading it holds no module to keep
    it by."""
    stage_of = {module: stage for stage, modules in enumerate(owned_modules) for module in modules}
    slots: dict[int, list[tuple[str, int]]] = {}
    for name, param in entry.named_parameters(remove_duplicate=False):
        stage = _stage_of(name, stage_of)
        if stage is not None:
            slots.setdefault(id(param), []).append((name, stage))
    for stage, names in enumerate(owned_params):
        for name in names:
            param = entry.get_parameter(name)
            others = sorted({s for _, s in slots.get(id(param), []) if s != stage})
            if others:
                raise LayoutError(
                    f"The forward reads the parameter {name!r} directly on pipeline stage {stage}, while modules of "
                    f"stage(s) {others} use it too. A weight tied across stages must be held by a module on each "
                    "(e.g. self.head.weight = self.tok_emb.weight, with the head called as a module)."
                )
    return [Tie(tuple(n for n, _ in found), tuple(s for _, s in found))
            for found in slots.values() if len({s for _, s in found}) > 1]


def _stage_of(name: str, stage_of: dict[str, int]):
    parts = name.split(".")
    for end in range(len(parts) - 1, 0, -1):
        stage = stage_of.get(".".join(parts[:end]))
        if stage is not None:
            return stage
    return None


def check_tensor_styles(ties: list[Tie], plan: dict[str, str] | None, prefix: str) -> None:
    """Copies on different ranks are summed shard by shard, so every name of a tied weight must be
    split alike by the tensor-parallel plan (an embedding split by vocabulary rows beside a head
    split by output features: both dim 0)."""
    for tie in ties:
        splits = {name: _weight_split((plan or {}).get(prefix + name.rpartition(".")[0])) for name in tie.names}
        if len(set(splits.values())) > 1:
            described = ", ".join(f"{prefix}{name} ({what})" for name, what in splits.items())
            raise LayoutError(
                f"The weight tied across pipeline stages is split differently by the tensor-parallel plan: {described}. "
                "Its copies are summed shard by shard: split the embedding by vocabulary rows ('embedding_rowwise') and "
                "the head by output features ('colwise' or 'colwise_gather_output'), or leave both out of the plan."
            )


def _weight_split(style: str | None) -> str:
    if style is None:
        return "not split"
    if style in ("embedding_rowwise", "colwise", "colwise_gather_output"):
        return "dim 0"
    return f"{style!r}"


class TiedWeights:
    """This rank's share of the ties: one parameter behind all of each weight's names, the
    gradient sum across the ranks holding copies, the copies made equal after initialization."""

    def __init__(self, entry: nn.Module, ties: list[Tie], stage_ids: list[int], pp_rank: int, rank_of_stage,
                 pp_rows: list[list[int]]) -> None:
        """`rank_of_stage(s)`: the pipeline rank holding stage s. `pp_rows`: every pipeline group's
        global ranks, by pipeline rank, to build the groups the copies are summed over."""
        self.entry = entry
        self.ties = ties
        self.stage_ids = set(stage_ids)
        self.held = [tie for tie in ties if set(tie.stages) & self.stage_ids]
        self.pp_rank = pp_rank
        self._group = {}  # tie -> its copies' group (None: one rank holds them all), and its first stage's rank
        for holders in sorted({_holders(tie, rank_of_stage) for tie in ties}):
            group = None
            if len(holders) > 1:  # every rank creates every group, in the same order
                group, _ = dist.new_subgroups_by_enumeration([[row[r] for r in holders] for row in pp_rows])
            for tie in ties:
                if _holders(tie, rank_of_stage) == holders:
                    self._group[tie] = (group, rank_of_stage(tie.stages[0]))

    def share(self) -> None:
        """Points every name of each weight at the one parameter this rank's stages hold (tensor and
        data parallelism replace a module's parameter only in the modules they parallelize); a
        rank holding none of its stages keeps one empty parameter behind the names."""
        for tie in self.ties:
            params = [self.entry.get_parameter(name) for name in tie.names]
            live = {id(p): p for p, stage in zip(params, tie.stages) if stage in self.stage_ids}
            if len(live) > 1:
                raise AssertionError(f"{tie.names} hold {len(live)} parameters on this rank")
            shared = next(iter(live.values()), params[0])
            for name in tie.names:
                owner, _, attr = name.rpartition(".")
                self.entry.get_submodule(owner)._parameters[attr] = shared

    @torch.no_grad()
    def copy_from_first(self) -> None:
        """After a rank-by-rank initialization: every copy takes the values of the stage holding
        the weight's own name."""
        for tie in self.held:
            group, first_rank = self._group[tie]
            if group is None:
                continue
            local = _local(self.entry.get_parameter(tie.names[0]))
            if self.pp_rank != first_rank:
                local.zero_()
            dist.all_reduce(local, group=group)

    @torch.no_grad()
    def sum_gradients(self) -> None:
        """Each copy's gradient becomes the sum of all of them (what one process computes for the
        one weight). Once per optimizer step, after any accumulation."""
        for tie in self.held:
            group, _ = self._group[tie]
            if group is None:
                continue
            param = self.entry.get_parameter(tie.names[0])
            if param.grad is None:
                param.grad = torch.zeros_like(param)
            elif isinstance(param.grad, DTensor) and param.grad.placements != param.placements:
                # A vocabulary-split embedding's gradient comes back whole: the copies are summed
                # shard by shard.
                param.grad = param.grad.redistribute(param.device_mesh, param.placements)
            dist.all_reduce(_local(param.grad), group=group)

    def counted_once(self, parameters: list[torch.Tensor]) -> list[torch.Tensor]:
        """`parameters` without the copies another rank counts in the global gradient norm."""
        others = {id(self.entry.get_parameter(tie.names[0])) for tie in self.held
                  if self._group[tie][0] is not None and self._group[tie][1] != self.pp_rank}
        return [p for p in parameters if id(p) not in others]


def _holders(tie: Tie, rank_of_stage) -> tuple[int, ...]:
    return tuple(sorted({rank_of_stage(s) for s in tie.stages}))


def _local(tensor: torch.Tensor) -> torch.Tensor:
    return tensor.to_local() if isinstance(tensor, DTensor) else tensor


def tied_weights(entry: nn.Module, ties: list[Tie], stage_ids: list[int], spec, device_mesh, splits_parameters: bool,
                 tensor_plan: dict[str, str] | None, prefix: str) -> TiedWeights:
    """Checks the ties against the layout (on every rank alike, before any collective but the
    groups' creation) and builds this rank's share."""
    from lightning_parallel.pipeline.schedules import stages_of_rank

    pp = device_mesh["pp"].size()
    rank_of_stage = {s: r for r in range(pp) for s in stages_of_rank(spec, r, pp)}.__getitem__
    check_ties(ties, rank_of_stage, splits_parameters, tensor_plan, prefix)
    pp_dim = device_mesh.mesh_dim_names.index("pp")
    pp_rows = device_mesh.mesh.movedim(pp_dim, -1).reshape(-1, pp).tolist()
    return TiedWeights(entry, ties, stage_ids, device_mesh["pp"].get_local_rank(), rank_of_stage, pp_rows)


def check_ties(ties: list[Tie], rank_of_stage, splits_parameters: bool, tensor_plan: dict[str, str] | None,
               prefix: str) -> None:
    """`splits_parameters`: tensor or data parallelism replaces parameters with shards."""
    for tie in ties:
        if splits_parameters and len(_holders(tie, rank_of_stage)) == 1:
            # Each stage is parallelized apart, so the rank would end up with two parameters.
            raise LayoutError(
                f"{' and '.join(prefix + n for n in tie.names)} are one weight tied across stages "
                f"{sorted(set(tie.stages))}, which this schedule puts on one rank; with tensor or data parallelism "
                "each stage's parameters are sharded apart. Choose a schedule with one stage per rank or a looped one "
                "(gpipe, 1f1b, interleaved_1f1b, looped_bfs, zero_bubble), or untie them."
            )
    check_tensor_styles(ties, tensor_plan, prefix)
