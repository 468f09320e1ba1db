"""What a forward costs, counted rather than timed, so every run and every rank cuts alike.

Each aten op is priced by a roofline with a fixed overhead: max(FLOPs / peak, bytes / bandwidth)
+ overhead. FLOPs come from torch's own counting formulas (`FlopCounterMode`); bytes are the op's
inputs and outputs. Ops run on the meta device (their inputs are converted on the way in), so
counting allocates nothing and works on a model that was never materialized. A forward that
needs real values (`.item()`, data-dependent shapes) is counted by running it for real instead.
Each unit is priced forward and backward (its backward run on meta too); the code between units
at three times its forward.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten, tree_map
from torch.utils.flop_counter import FlopCounterMode


@dataclass(frozen=True)
class Hardware:
    name: str
    flops_per_s: float
    bytes_per_s: float
    seconds_per_op: float  # dispatch and launch overhead


# Measured on the project's 2-core CPU machines (one thread per process): a 512x512 matmul,
# a large out-of-place multiply, and fwd+bwd of tiny ops.
CPU = Hardware("cpu", flops_per_s=1.0e11, bytes_per_s=3.0e10, seconds_per_op=5e-6)
# A recent data-centre GPU in bf16: well below its datasheet peaks, as real kernels run.
CUDA = Hardware("cuda", flops_per_s=4.0e14, bytes_per_s=2.0e12, seconds_per_op=4e-6)


def hardware_for(device: torch.device) -> Hardware:
    return CUDA if torch.device(device).type == "cuda" else CPU


_FLOP_FORMULAS = FlopCounterMode(display=False).flop_registry


class OpCost(TorchDispatchMode):
    """Adds up the priced seconds of every op run inside it. With `on_meta`, ops run on meta
    tensors: nothing is computed or allocated, and no real tensor is modified (an in-place op
    on a real tensor hands back that tensor, untouched)."""

    def __init__(self, hardware: Hardware, on_meta: bool = True) -> None:
        super().__init__()
        self.hardware = hardware
        self.on_meta = on_meta
        self.seconds = 0.0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        real_args = args
        if self.on_meta:
            args, kwargs = tree_map(_to_meta, (args, kwargs))
        out = func(*args, **kwargs)
        self.seconds += self._price(func, args, kwargs, out)
        mutated = real_args[0] if func._schema.is_mutable and real_args else None
        if self.on_meta and isinstance(mutated, torch.Tensor) and not mutated.is_meta:
            return mutated  # `buffer += x` must leave a real buffer, not rebind it to a meta one
        return out

    def _price(self, func, args, kwargs, out) -> float:
        formula = _FLOP_FORMULAS.get(func.overloadpacket)
        flops = formula(*args, **kwargs, out_val=out) if formula is not None else 0
        tensors = [t for t in tree_flatten((args, kwargs, out))[0] if isinstance(t, torch.Tensor)]
        nbytes = sum(t.numel() * t.element_size() for t in tensors)
        hw = self.hardware
        return max(flops / hw.flops_per_s, nbytes / hw.bytes_per_s) + hw.seconds_per_op


def _to_meta(value):
    return value.to("meta") if isinstance(value, torch.Tensor) and not value.is_meta else value
