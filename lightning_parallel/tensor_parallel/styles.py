"""Plan style names (plain strings, so YAML can hold them) and the DTensor styles they stand for.

Every style transformers 5 registers (`ALL_PARALLEL_STYLES` in transformers/distributed/
tensor_parallel.py and expert_parallel.py) is either mapped onto DTensor styles here or refused
with its reason (REFUSED).
"""

from __future__ import annotations

import functools
from typing import Callable, Optional, Union

import torch
from torch import nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor import DTensor, Partial, Placement, Replicate, Shard, distribute_module
from torch.distributed.tensor.parallel import (
    ColwiseParallel,
    ParallelStyle,
    PrepareModuleInput,
    RowwiseParallel,
    SequenceParallel,
)

from lightning_parallel.layout import LayoutError
from lightning_parallel.tensor_parallel.conv1d import conv1d_placement

# What each style does, for error messages and the README.
STYLES = {
    "colwise": "Linear/Embedding split by output features (Megatron's first matrix)",
    "rowwise": "Linear split by input features, outputs summed (Megatron's second matrix)",
    "colwise_gather_output": "colwise with the full output gathered on every rank (e.g. an LM head)",
    "embedding_rowwise": "Embedding split by vocabulary rows, full output on every rank",
    "embedding_colwise": "Embedding split by embedding features, full output on every rank",
    "rowwise_split_input": "rowwise that takes a full input and splits it itself",
    "replicated_with_grad_allreduce": "parameters whole on every rank, applied to this rank's part of a split "
                                      "dim (a per-head norm); their gradients summed over the tp ranks",
    "replicate": "left whole on every rank",
    "mla_kv_a_proj": "multi-head latent attention's key/value down-projection (DeepSeek): whole on every rank; "
                     "the gradient of its rotary key part, used by this rank's heads only, summed over the tp ranks",
    "qkv_colwise": "a fused query/key/value Conv1D (GPT-2's c_attn) split by heads: each rank computes its heads' "
                   "q, k and v (its attention module's split_size becomes 1/tp)",
    "sequence_parallel": "norm/dropout run on a sequence shard (needs sequence_parallel=True)",
    "shard_sequence": "the module's first input is split along the sequence (dim 1) here",
}
# Names Hugging Face transformers (v4 and v5) use in their declared plans for the styles above.
# unit_colwise/unit_rowwise are colwise/rowwise wherever the heads divide by tensor_parallel
# (transformers then keeps no head on two ranks); where they do not, the plan's head check refuses.
ALIASES = {
    "colwise_rep": "colwise_gather_output",
    "rowwise_rep": "rowwise_split_input",
    "local_colwise": "colwise",
    "local_rowwise": "rowwise",
    "unit_colwise": "colwise",
    "unit_rowwise": "rowwise",
}
_LEAVE_ATTENTION = ("give tensor_plan explicitly, leaving these layers' attention unsplit (the MLP entries can stay), "
                    "or use tensor_parallel=1")
_LEAVE_EXPERTS = ("give tensor_plan explicitly without the experts' entries (the experts then stay whole on every "
                  "tensor-parallel rank; HybridParallel(expert_parallel=...) shards experts), or use tensor_parallel=1")
_EXPERT_PLAN = ("it belongs to the expert-parallel plan (base_model_ep_plan), which HybridParallel(expert_parallel=...) "
                "handles", "remove it from tensor_plan")
# Styles transformers registers that lightning_parallel does not run: (why, the fix).
REFUSED = {
    "packed_colwise": ("a fused weight packing several projections (gate and up) along its outputs, split so that "
                       "each rank keeps its part of each, is not supported", _LEAVE_EXPERTS),
    "packed_rowwise": ("a fused expert weight split along its packed dim is not supported", _LEAVE_EXPERTS),
    "moe_tp_experts": ("experts split by tensor parallelism (deprecated in transformers for expert parallelism) are "
                       "not supported", _LEAVE_EXPERTS),
    "local_params": ("the module's own parameters (attention sinks) split by head and read as local tensors inside "
                     "its forward are not supported", _LEAVE_ATTENTION),
    "all_reduce": ("a module whose output is a partial sum computed by transformers' own kernels is not supported",
                   "give tensor_plan explicitly ('rowwise' splits a Linear and sums its partial outputs), or use "
                   "tensor_parallel=1"),
    "grouped_gemm": _EXPERT_PLAN,
    "ep_dispatch_experts": _EXPERT_PLAN,
}
SEQ = Shard(1)


def canonical(style: str) -> str:
    return ALIASES.get(style, style)


def check_style(name: str, style, declared_by: Optional[str] = None) -> None:
    """Refuses a style that is unknown or not run. `declared_by` names the model whose own plan
    holds the entry (its class and model_type), for the message."""
    if isinstance(style, str) and style in REFUSED:
        why, fix = REFUSED[style]
        where = f"{declared_by} declares" if declared_by else "tensor_plan gives"
        raise LayoutError(f"{where} tensor-parallel style {style!r} for {name!r}: {why}. Fix: {fix}.")
    if not isinstance(style, str) or canonical(style) not in STYLES:
        known = ", ".join(sorted(STYLES))
        declared = (f" in the plan {declared_by} declares (pass tensor_plan explicitly, or use tensor_parallel=1)"
                    if declared_by else "")
        raise LayoutError(f"Unknown tensor-parallel style {style!r} for {name!r}{declared}. Known styles: {known}.")


def parameter_placement(style: str, module_type: type, param_name: str) -> Optional[Placement]:
    """How the DTensor style for `style` lays out a parameter of a module of `module_type` on the
    tp mesh (None: it stays a plain tensor)."""
    style = canonical(style)
    if module_type.__name__ == "Conv1D":  # transformers' transposed Linear (GPT-2)
        return conv1d_placement(style, param_name)
    embedding = issubclass(module_type, nn.Embedding)
    if style in ("colwise", "colwise_gather_output"):
        return Shard(1) if embedding else Shard(0)
    if style == "embedding_colwise":
        return Shard(1)
    if style in ("rowwise", "rowwise_split_input", "embedding_rowwise"):
        if embedding:
            return Shard(0)
        return Shard(1) if param_name == "weight" else Replicate()  # a rowwise Linear's bias is added after the sum
    if style in ("sequence_parallel", "replicated_with_grad_allreduce"):
        return Replicate()
    return None


def make_style(style: str, sequence_parallel: bool, loss_parallel: bool = False,
               rotary_dim: Optional[int] = None) -> Union[ParallelStyle, Callable, None]:
    """What applies a plan entry: a DTensor style for `parallelize_module`, a function
    (module, tp_mesh) that parallelizes the module itself, or None (nothing to do). With sequence
    parallelism the activations between tensor-parallel regions are split along the sequence, so
    the regions' edges change. `rotary_dim`: the rotary key width of multi-head latent attention
    (the model's `qk_rope_head_dim`), for 'mla_kv_a_proj'."""
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
    if style == "embedding_colwise":
        return ColwiseParallel(input_layouts=Replicate(), output_layouts=between)
    if style == "rowwise_split_input":
        return RowwiseParallel(input_layouts=Replicate(), output_layouts=between)
    if style == "replicated_with_grad_allreduce":
        return replicate_with_gradient_sum
    if style == "mla_kv_a_proj":
        return functools.partial(sum_rotary_key_gradient, rotary_dim=rotary_dim)
    if style == "replicate":
        return None
    if style == "sequence_parallel":
        return SequenceParallel()
    if style == "qkv_colwise":
        raise LayoutError("Style 'qkv_colwise' applies to a fused query/key/value Conv1D (GPT-2's c_attn) only.")
    if style == "shard_sequence":
        return PrepareModuleInput(input_layouts=(Replicate(),), desired_input_layouts=(SEQ,), use_local_output=True)
    raise AssertionError(style)


def replicate_with_gradient_sum(module: nn.Module, tp_mesh: DeviceMesh) -> None:
    """For a module between a colwise and a rowwise layer that works on this rank's part of the
    split dim with parameters of its own, such as Qwen3's per-head q_norm/k_norm (one weight
    entry per feature of a head; each rank normalizes its own heads). Its parameters stay whole
    on every rank, but each rank's gradient covers only its heads. `distribute_module` makes
    them Replicate DTensors, and the forward reads each as `full_tensor(grad_placements=[Partial()])`,
    whose gradient DTensor's backward sums over the tp group: no hand-written reduction, and
    FSDP2 shards these DTensors over dp like any other."""
    params: dict[str, torch.Tensor] = {}  # the module's own, put back after its forward
    buffers: dict[str, torch.Tensor] = {}  # distribute_module replicates them too

    def read_locally(sub: nn.Module, inputs, mesh):
        # The parameters in place now (FSDP2 may have swapped in its gathered ones) come back after the forward.
        params.update(sub._parameters)
        buffers.update(sub._buffers)
        for name, param in params.items():
            if isinstance(param, DTensor):
                sub._parameters[name] = param.full_tensor(grad_placements=[Partial()])
        for name, buffer in buffers.items():
            if isinstance(buffer, DTensor):
                sub._buffers[name] = buffer.to_local()
        return inputs

    def restore(sub: nn.Module, outputs, mesh):
        sub._parameters.update(params)
        sub._buffers.update(buffers)
        params.clear()
        buffers.clear()
        return outputs

    distribute_module(module, tp_mesh, input_fn=read_locally, output_fn=restore)


def sum_rotary_key_gradient(module: nn.Module, tp_mesh: DeviceMesh, rotary_dim: int) -> None:
    """Multi-head latent attention's key/value down-projection (DeepSeek's kv_a_proj_with_mqa),
    whole on every rank. Its output's first part goes through a norm to kv_b_proj, a colwise
    layer, whose input gradient DTensor already sums over the tp group; its last `rotary_dim`
    features are the rotary key that every head shares, and reach the attention directly, so
    each rank's gradient there covers its own heads only. That part passes through a Replicate
    DTensor read with a Partial gradient, which DTensor's backward sums over the group."""

    def sum_gradient_of_rotary_part(sub: nn.Module, inputs, output: torch.Tensor) -> torch.Tensor:
        latent, rotary = output.split([output.shape[-1] - rotary_dim, rotary_dim], dim=-1)
        rotary = DTensor.from_local(rotary, tp_mesh, [Replicate()], run_check=False).to_local(grad_placements=[Partial()])
        return torch.cat([latent, rotary], dim=-1)

    module.register_forward_hook(sum_gradient_of_rotary_part)
