"""Tensor-parallel styles for transformers' `Conv1D` (GPT-2's layers): a Linear whose weight is
stored transposed, [in, out], and computed as `addmm(bias, x, weight)`.

The module runs on DTensors, so its own forward (which reshapes to the full `nf`) is unchanged:
- colwise splits the weight's dim 1 and the bias: each rank computes a slice of the outputs;
- rowwise splits the weight's dim 0: partial outputs summed, the bias added once;
- packed colwise (GPT-2's fused query/key/value projection, `parts=3`) splits the weight's dim 1
  in contiguous slices too, so checkpoints stay plain shards, then gathers the outputs and keeps
  each part's slice of this rank (its heads' q, k and v); the backward reduce-scatters.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor import DTensor, Partial, Replicate, Shard, distribute_module, distribute_tensor
from torch.distributed.tensor.parallel import ParallelStyle

from lightning_parallel.layout import LayoutError


def is_conv1d(module: nn.Module) -> bool:
    return type(module).__name__ == "Conv1D" and hasattr(module, "nf") and hasattr(module, "nx")


class Conv1DParallel(ParallelStyle):
    """`rowwise=False`: colwise (`parts` > 1: the outputs are `parts` equal parts, each split);
    `rowwise=True`: rowwise. Inputs and outputs between the styles are plain local tensors, as
    with torch's ColwiseParallel/RowwiseParallel: replicated into colwise, split out of it."""

    def __init__(self, rowwise: bool = False, parts: int = 1, gather_output: bool = False) -> None:
        super().__init__()
        self.rowwise, self.parts, self.gather_output = rowwise, parts, gather_output

    def _apply(self, module: nn.Module, device_mesh: DeviceMesh) -> nn.Module:
        return distribute_module(module, device_mesh, self._partition, self._input, self._output)

    def _partition(self, name: str, module: nn.Module, mesh: DeviceMesh) -> None:
        placements = {"weight": Shard(0) if self.rowwise else Shard(1),
                      "bias": Replicate() if self.rowwise else Shard(0)}
        for param_name, param in list(module.named_parameters(recurse=False)):
            shard = distribute_tensor(param, mesh, [placements[param_name]], src_data_rank=self.src_data_rank)
            module.register_parameter(param_name, nn.Parameter(shard, requires_grad=param.requires_grad))

    def _input(self, module: nn.Module, inputs: tuple, mesh: DeviceMesh) -> tuple:
        x = inputs[0]
        if not isinstance(x, DTensor):
            x = DTensor.from_local(x, mesh, [Shard(-1) if self.rowwise else Replicate()], run_check=False)
        return (x, *inputs[1:])

    def _output(self, module: nn.Module, output: DTensor, mesh: DeviceMesh) -> torch.Tensor:
        if self.rowwise or self.gather_output:
            return output.redistribute(mesh, [Replicate()]).to_local()
        if self.parts == 1:
            return output.redistribute(mesh, [Shard(-1)]).to_local()
        # Every rank's contiguous slice holds parts of other ranks' heads: gather, keep ours.
        full = output.full_tensor(grad_placements=[Partial()])
        rank, size = mesh.get_local_rank(), mesh.size()
        width = module.nf // self.parts // size
        return torch.cat([part.narrow(-1, rank * width, width) for part in full.chunk(self.parts, dim=-1)], dim=-1)


# Plan styles on a Conv1D: (rowwise, parts, gather_output).
CONV1D_STYLES = {"colwise": (False, 1, False), "colwise_gather_output": (False, 1, True), "rowwise": (True, 1, False),
                 "qkv_colwise": (False, 3, False)}


def conv1d_style(name: str, style: str, sequence_parallel: bool) -> Conv1DParallel:
    if style not in CONV1D_STYLES:
        raise LayoutError(f"{name} is a Conv1D; style {style!r} does not apply to it: use one of {sorted(CONV1D_STYLES)}.")
    if sequence_parallel:
        raise LayoutError(f"{name} is a Conv1D, whose styles take whole sequences: sequence_parallel=True is not "
                          "supported with Conv1D layers (GPT-2). Leave it False.")
    return Conv1DParallel(*CONV1D_STYLES[style])


def conv1d_placement(style: str, param_name: str) -> Shard | Replicate | None:
    if style not in CONV1D_STYLES:
        return None
    if CONV1D_STYLES[style][0]:  # rowwise: the input features, dim 0 of the transposed weight
        return Shard(0) if param_name == "weight" else Replicate()
    return Shard(1) if param_name == "weight" else Shard(0)


def narrow_split_size(attention: nn.Module, fused: nn.Module, tp: int) -> None:
    """GPT-2's attention splits its fused projection's output into q, k, v by `split_size`: each
    rank now holds 1/tp of each."""
    if getattr(attention, "split_size", None) == fused.nf // 3:
        attention.split_size //= tp
