"""Run an unmodified LightningModule's steps through a pipeline schedule.

- The first stage learns the model's inputs by running the user's step until it calls
  `self(...)` (the call is captured, the rest of the step skipped).
- The last stage runs the user's own step with the stage's output standing in for the
  model's output: in training once per micro-batch (its loss drives that micro-batch's
  backward), in evaluation once per batch on the merged output.
- What the step logs is collected on the last stage, combined over the micro-batches as one
  step over the whole batch would have logged it, sent to every stage, and logged there, so
  every rank's (and rank 0's) callback_metrics, progress bar and loggers see it. The training
  loss and the evaluation steps' return values (predictions, say) reach every stage too.
"""

from __future__ import annotations

import inspect
from contextlib import contextmanager
from typing import Any

import torch
import torch.distributed as dist
from torch.distributed.pipelining import PipelineStage
from torch.utils._pytree import tree_flatten, tree_unflatten

from lightning_parallel.layout import LayoutError
from lightning_parallel.pipeline.schedules import build_eval_schedule, build_schedule, stages_of_rank

REDUCERS = {"mean": torch.mean, "sum": torch.sum, "max": torch.max, "min": torch.min}


class _Captured(Exception):
    pass


def capture_forward_call(module, step_name: str, *step_args) -> tuple[tuple, dict]:
    """The (args, kwargs) the user's step passes to `self(...)`."""
    call: dict[str, Any] = {}

    def record(*args, **kwargs):
        call["args"], call["kwargs"] = args, kwargs
        raise _Captured

    module.forward = record
    try:
        getattr(module, step_name)(*step_args)
    except _Captured:
        pass
    finally:
        del module.forward
    if "args" not in call:
        raise LayoutError(
            f"{type(module).__name__}.{step_name} never calls self(...). Under pipeline_parallel the step must "
            "run the model through its forward (e.g. `logits = self(x)`), whose output the last stage provides."
        )
    return call["args"], call["kwargs"]


@contextmanager
def output_standing_in(module, output):
    """Within this block, `module(...)` returns `output` instead of running the forward."""
    module.forward = lambda *args, **kwargs: output
    try:
        yield
    finally:
        del module.forward


@contextmanager
def collecting_logs(module, records: list):
    def log(name, value, *args, **kwargs):
        records.append((name, value, args, kwargs))

    module.log = log
    try:
        yield
    finally:
        del module.log


def combine_logs(records: list, module) -> list[tuple[str, object, tuple, dict]]:
    """One entry per name: the micro-batches' values combined with the name's reduce_fx.
    A torchmetrics Metric travels as its attribute name: every stage logs its own copy, whose
    sync group spans the stages (the other stages' copies hold empty states)."""
    from torchmetrics import Metric

    by_name: dict[str, list] = {}
    for name, value, args, kwargs in records:
        by_name.setdefault(name, []).append((value, args, kwargs))
    combined = []
    for name, calls in by_name.items():
        value, args, kwargs = calls[-1][0], calls[-1][1], dict(calls[-1][2])
        kwargs.pop("sync_dist_group", None)  # a process group does not travel; our dp group is the default
        if isinstance(value, Metric):
            attribute = next((n for n, m in module.named_modules() if m is value), None)
            if attribute is None:
                raise LayoutError(f"self.log({name!r}, metric): under pipeline_parallel the metric must be an attribute of the module.")
            combined.append((name, ("metric", attribute), args, kwargs))
            continue
        reduce_fx = kwargs.get("reduce_fx", "mean")
        reduce = REDUCERS.get(reduce_fx, reduce_fx) if isinstance(reduce_fx, str) else reduce_fx
        values = torch.stack([torch.as_tensor(v).detach().float().cpu() for v, _, _ in calls])
        if "batch_size" in kwargs:
            kwargs["batch_size"] = sum(c[2].get("batch_size", 0) for c in calls)
        combined.append((name, float(reduce(values)), args, kwargs))
    return combined


def split_batch(batch, micro_batches: int) -> list:
    """The batch cut into equal micro-batches along dim 0 of every tensor."""
    leaves, spec = tree_flatten(batch)
    sizes = {leaf.shape[0] for leaf in leaves if isinstance(leaf, torch.Tensor) and leaf.dim() > 0}
    for size in sizes:
        if size % micro_batches:
            raise LayoutError(
                f"A batch of {size} samples does not divide into micro_batches={micro_batches}. Make each rank's "
                f"batch size a multiple of {micro_batches} (and drop a short last batch: drop_last=True)."
            )
    chunks = [
        torch.tensor_split(leaf, micro_batches) if isinstance(leaf, torch.Tensor) and leaf.dim() > 0 else [leaf] * micro_batches
        for leaf in leaves
    ]
    return [tree_unflatten([chunk[i] for chunk in chunks], spec) for i in range(micro_batches)]


def concrete_args_for(module, args: tuple, kwargs: dict) -> dict:
    """Forward parameters the step leaves out, fixed to their defaults for tracing."""
    params = list(inspect.signature(module.forward).parameters.values())
    passed = {p.name for p in params[: len(args)]} | set(kwargs)
    return {
        p.name: p.default for p in params
        if p.name not in passed and p.default is not inspect.Parameter.empty
        and p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)
    }


class PipelineRunner:
    """This rank's stages, their schedule, and the Lightning steps run through it."""

    def __init__(self, module, split, spec, micro_batches: int, pp_group, device) -> None:
        self.module = module
        self.micro_batches = micro_batches
        self.pp_group = pp_group
        self.device = device
        pp = dist.get_world_size(pp_group)
        # The pp-group rank that holds the last stage (rank 0 for the V-shaped schedules).
        self.last_stage_rank = next(r for r in range(pp) if split.num_stages - 1 in stages_of_rank(spec, r, pp))
        self.has_first = 0 in split.stage_ids
        self.has_last = split.num_stages - 1 in split.stage_ids
        self.stages = [
            PipelineStage(sm, sid, split.num_stages, device, group=pp_group)
            for sm, sid in zip(split.stage_modules, split.stage_ids)
        ]
        self._loss_fn = None
        self.schedule = build_schedule(spec, self.stages, micro_batches, self._call_loss_fn)
        self.eval_schedule = build_eval_schedule(spec, self.stages, micro_batches, self._call_loss_fn)
        self.parameters = [p for sm in split.stage_modules for p in sm.parameters()]
        self._set_aside: list = []

    def _call_loss_fn(self, output, index):
        return self._loss_fn(output, index)

    def train_step(self, batch, batch_idx, accumulate: int):
        """Runs forward and backward of every micro-batch. Lightning zeroes gradients after the
        step and before its backward, so the gradients are set aside here and handed back by
        `restore_gradients` (called from the strategy's backward)."""
        micro = split_batch(batch, self.micro_batches)
        if batch_idx % accumulate == 0:  # a new accumulation window starts from zero
            for p in self.parameters:
                p.grad = None
        args, kwargs = capture_forward_call(self.module, "training_step", batch, batch_idx) if self.has_first else ((), {})
        # Keyed by micro-batch: the stage's first-step shape inference also calls loss_fn (on
        # placeholder data, for micro-batch 0); the real call for that micro-batch comes later.
        records: dict[int, list] = {}
        losses: dict[int, torch.Tensor] = {}

        def loss_fn(output, index):
            index = int(index)
            records[index] = []
            with collecting_logs(self.module, records[index]), output_standing_in(self.module, output):
                result = self.module.training_step(micro[index], batch_idx)
            loss = result["loss"] if isinstance(result, dict) else result
            if not isinstance(loss, torch.Tensor):
                raise LayoutError("Under pipeline_parallel, training_step must return the loss (a tensor or {'loss': ...}).")
            losses[index] = loss.detach().float()
            # One process computes the batch's mean loss once; here each micro-batch is 1/M of it.
            return loss / (self.micro_batches * accumulate)

        self._loss_fn = loss_fn
        target = torch.arange(self.micro_batches, device=self.device) if self.has_last else None
        self.schedule.step(*args, target=target, return_outputs=False, **kwargs)
        self._set_aside = [(p, p.grad) for p in self.parameters]
        for p in self.parameters:
            p.grad = None
        loss = torch.stack(list(losses.values())).mean().item() if self.has_last else None
        loss, _ = self._share_and_log(loss, [record for index in sorted(records) for record in records[index]], None)
        return torch.tensor(loss, device=self.device)

    def restore_gradients(self) -> None:
        for p, grad in self._set_aside:
            p.grad = grad
        self._set_aside = []

    def eval_step(self, step_name: str, batch, batch_idx, *rest):
        split_batch(batch, self.micro_batches)  # the divisibility check
        args, kwargs = capture_forward_call(self.module, step_name, batch, batch_idx, *rest) if self.has_first else ((), {})
        # The schedule asks the last stage for a loss even when it runs forward only.
        self._loss_fn = lambda output, index: output.new_zeros(()) if isinstance(output, torch.Tensor) else torch.zeros(())
        target = torch.arange(self.micro_batches, device=self.device) if self.has_last else None
        with torch.inference_mode(False), torch.no_grad():
            output = self.eval_schedule.eval(*args, target=target, **kwargs)
        records, result = [], None
        if self.has_last:
            with collecting_logs(self.module, records), output_standing_in(self.module, output):
                result = getattr(self.module, step_name)(batch, batch_idx, *rest)
        _, result = self._share_and_log(None, records, result)
        return result

    def _share_and_log(self, loss, records, result):
        """Sends the last stage's loss, logs and step result to every stage; logs there."""
        payload = [(loss, combine_logs(records, self.module), result)]
        dist.broadcast_object_list(payload, group=self.pp_group, group_src=self.last_stage_rank)
        loss, logs, result = payload[0]
        for name, value, args, kwargs in logs:
            if isinstance(value, tuple):  # ("metric", attribute)
                value = self.module.get_submodule(value[1])
                if not self.has_last:
                    # Updated on the last stage, whose states this copy receives when it syncs;
                    # counting the update keeps torchmetrics from warning that it never ran.
                    value._update_count += 1
            else:
                value = torch.tensor(value, device=self.device)
            self.module.log(name, value, *args, **kwargs)
        return loss, result
