"""Manual optimization (`self.automatic_optimization = False`) under data parallelism.

A manual step runs backward and steps optimizers itself, as often as it likes, in the middle of
the step (a GAN: the discriminator's backward and step, then the generator's forward through the
updated discriminator). The automatic path cannot carry that:
- torch's DistributedDataParallel reduces once per forward; Lightning's DDPStrategy re-arms its
  reducer before each manual backward through private calls, and needs find_unused_parameters
  once toggle_optimizer leaves parameters out of a backward.
- FSDP2 keeps the root's parameters (everything outside the repeated blocks) gathered for the
  whole step and reduces their gradients from hooks on the root's output, which a manual step
  never backpropagates. The first manual backward that passes through a block ends by
  resharding the root (the rest of the step meets sharded DTensors: "mixed torch.Tensor and
  DTensor"), and a backward that touches only root parameters is never reduced.

So under manual optimization the step runner is FSDP2's root but holds no parameters:
- The blocks are FSDP2 units as in automatic optimization. Each forward gathers a block from its
  current shards, so a block used after an optimizer step computes with the updated values and
  toggle_optimizer's requires_grad reaches the gathered copy; every backward that passes through
  a block ends with FSDP2's reduction of every block's gradients.
- The other parameters (embeddings, heads, norms, bare parameters of the LightningModule,
  parameters only the loss uses) are FSDP2's `ignored_params`: replicated over the data-parallel
  ranks, not sharded, so the optimizer holds the very tensors the step computes with. After each
  backward their new gradients are averaged over the data-parallel group in one all-reduce, apart
  from what earlier backward passes accumulated (each backward's gradients are reduced once).
Under pipeline parallelism Lightning's loop is replaced by a schedule that runs every
micro-batch's forward and backward itself, which a step that calls backward cannot join: refused.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.fsdp import MixedPrecisionPolicy

from lightning_parallel.data_parallel import apply_data_parallel, data_parallel_units
from lightning_parallel.gradients import average_over
from lightning_parallel.layout import LayoutError


def check_manual_optimization(module: nn.Module, pipeline_parallel: int, layout: str) -> None:
    """Refuses training with manual optimization where it cannot run (on every rank, before any
    collective): under pipeline parallelism, and with layout="auto", whose planner learns the
    model's inputs by running training_step, which here steps optimizers the Trainer has not built yet."""
    if module.automatic_optimization:
        return
    name = type(module).__name__
    if pipeline_parallel > 1:
        raise LayoutError(
            f"{name} sets automatic_optimization = False, which pipeline_parallel={pipeline_parallel} cannot run: "
            "the pipeline schedule runs every micro-batch's forward and backward itself, so a training_step that "
            "calls manual_backward and steps its optimizers cannot be split into stages. Use automatic optimization "
            "(return the loss from training_step), or pipeline_parallel=1 with data and tensor parallelism, which "
            "run manual optimization."
        )
    if layout == "auto":
        raise LayoutError(
            f"{name} sets automatic_optimization = False, which layout='auto' cannot plan for: the planner runs "
            "training_step to find the model's inputs, and a manual step calls the optimizers and backward. Give "
            "the layout (data_parallel, tensor_parallel, sharding; pipeline_parallel stays 1)."
        )


class ReplicatedGradients:
    """Averages the gradients one backward gives the replicated parameters over the data-parallel
    group: `set_aside()` before the backward, `average()` after it. A gradient that arrives
    outside that window (`loss.backward()` instead of `self.manual_backward(loss)`) would leave
    the replicas to drift apart: the next optimizer step refuses it (`check_averaged()`)."""

    def __init__(self, params: list[nn.Parameter], group, reduce_dtype: Optional[torch.dtype]) -> None:
        self.params = params
        self.group = group
        self.reduce_dtype = reduce_dtype
        self._earlier: list[Optional[torch.Tensor]] = []
        self._in_backward = False
        self._missed: list[nn.Parameter] = []
        for p in params:
            p.register_post_accumulate_grad_hook(self._arrived)

    def _arrived(self, param: nn.Parameter) -> None:
        if not self._in_backward:
            self._missed.append(param)

    def set_aside(self) -> None:
        self._in_backward = True
        self._earlier = [p.grad for p in self.params]
        for p in self.params:
            p.grad = None

    def average(self) -> None:
        # Every rank runs the same step, so the same parameters got gradients on each.
        average_over([p.grad for p in self.params if p.grad is not None], self.group, self.reduce_dtype)
        for p, earlier in zip(self.params, self._earlier):
            if earlier is not None:
                p.grad = earlier if p.grad is None else earlier.add_(p.grad)
        self._earlier = []
        self._in_backward = False

    def check_averaged(self, module: nn.Module) -> None:
        if not self._missed:
            return
        names = {id(p): name for name, p in module.named_parameters()}
        missed = sorted({names.get(id(p), "?") for p in self._missed})
        raise LayoutError(
            f"The parameter(s) {missed} got gradients from a backward that did not go through "
            f"self.manual_backward(loss) (loss.backward(), or torch.autograd.backward): under data parallelism their "
            "gradients would not be averaged over the ranks, which would drift apart. Call self.manual_backward(loss)."
        )


def apply_manual_data_parallel(runner: nn.Module, dp_mesh: DeviceMesh, mp_policy: MixedPrecisionPolicy,
                               dp_group) -> ReplicatedGradients:
    """FSDP2 on the blocks under `runner`, and on `runner` itself as a root that holds none of the
    other parameters; returns what averages those others' gradients after each backward."""
    in_blocks = {p for block in data_parallel_units(runner) for p in block.parameters()}
    replicated = [p for p in runner.parameters() if p not in in_blocks]
    apply_data_parallel(runner, dp_mesh, mp_policy, ignored_params=set(replicated))
    return ReplicatedGradients(replicated, dp_group, mp_policy.reduce_dtype)
