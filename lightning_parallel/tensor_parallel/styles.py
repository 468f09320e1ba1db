"""Plan style names (plain strings, so YAML can hold them) and the DTensor styles they stand for."""

from __future__ import annotations

from torch.distributed.tensor import Replicate, Shard
from torch.distributed.tensor.parallel import (
    ColwiseParallel,
    ParallelStyle,
    PrepareModuleInput,
    RowwiseParallel,
    SequenceParallel,
)

from lightning_parallel.layout import LayoutError

# What each style does, for error messages and the README.
STYLES = {
    "colwise": "Linear/Embedding split by output features (Megatron's first matrix)",
    "rowwise": "Linear split by input features, outputs summed (Megatron's second matrix)",
    "colwise_gather_output": "colwise with the full output gathered on every rank (e.g. an LM head)",
    "embedding_rowwise": "Embedding split by vocabulary rows, full output on every rank",
    "rowwise_split_input": "rowwise that takes a full input and splits it itself",
    "sequence_parallel": "norm/dropout run on a sequence shard (needs sequence_parallel=True)",
    "shard_sequence": "the module's first input is split along the sequence (dim 1) here",
}
# Names Hugging Face transformers (v4 and v5) use in their declared plans.
ALIASES = {
    "colwise_rep": "colwise_gather_output",
    "rowwise_rep": "rowwise_split_input",
    "local_colwise": "colwise",
    "local_rowwise": "rowwise",
}
SEQ = Shard(1)


def canonical(style: str) -> str:
    return ALIASES.get(style, style)


def check_style(name: str, style) -> None:
    if not isinstance(style, str) or canonical(style) not in STYLES:
        known = ", ".join(sorted(STYLES))
        raise LayoutError(f"Unknown tensor-parallel style {style!r} for {name!r}. Known styles: {known}.")


def make_style(style: str, sequence_parallel: bool, loss_parallel: bool = False) -> ParallelStyle:
    """The DTensor style for a plan entry. With sequence parallelism the activations between
    tensor-parallel regions are split along the sequence, so the regions' edges change."""
    style = canonical(style)
    between = SEQ if sequence_parallel else Replicate()
    if style == "colwise":
        return ColwiseParallel(input_layouts=between)
    if style == "rowwise":
        return RowwiseParallel(output_layouts=between)
    if style == "colwise_gather_output":
        if loss_parallel:  # logits stay split over the vocabulary; the loss is computed on the shards
            return ColwiseParallel(input_layouts=between, output_layouts=Shard(-1), use_local_output=False)
        return ColwiseParallel(input_layouts=between, output_layouts=Replicate())
    if style == "embedding_rowwise":
        return RowwiseParallel(input_layouts=Replicate(), output_layouts=between)
    if style == "rowwise_split_input":
        return RowwiseParallel(input_layouts=Replicate(), output_layouts=between)
    if style == "sequence_parallel":
        return SequenceParallel()
    if style == "shard_sequence":
        return PrepareModuleInput(input_layouts=(Replicate(),), desired_input_layouts=(SEQ,), use_local_output=True)
    raise AssertionError(style)
