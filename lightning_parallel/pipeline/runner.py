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
- A training step's loss and logged values travel as one tensor on the device: no `.item()`
  and no pickled collective, except when the names the step logs change (its first step, say);
  the other stages read one number of that tensor to learn whether they did.
"""

from __future__ import annotations

import inspect
from collections import OrderedDict
from contextlib import contextmanager, nullcontext
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.pipelining import PipelineStage
from torch.overrides import TorchFunctionMode
from torch.utils._pytree import tree_flatten, tree_map, tree_unflatten

from lightning_parallel.gradients import average_over
from lightning_parallel.layout import LayoutError
from lightning_parallel.pipeline.declared import call_by_name
from lightning_parallel.pipeline.schedules import build_eval_schedule, build_schedule, stages_of_rank

REDUCERS = {"mean": torch.mean, "sum": torch.sum, "max": torch.max, "min": torch.min}


class _Captured(Exception):
    pass


def capture_call(module, step_name: str, *step_args, entry: str | None = None) -> tuple[str, tuple, dict]:
    """Which module the step runs the model through, and the (args, kwargs) of that call: the
    LightningModule's own `self(...)`, or a child holding parameters called directly
    (`self.model(...)`, a Hugging Face model say). `entry` names it when known."""
    if entry is None:
        candidates = [("", module)] + [(n, c) for n, c in module.named_children() if any(True for _ in c.parameters())]
    else:
        candidates = [(entry, module.get_submodule(entry))]
    call: dict[str, Any] = {}

    def recorder(name):
        def record(*args, **kwargs):
            call.update(name=name, args=args, kwargs=kwargs)
            raise _Captured

        return record

    for name, candidate in candidates:
        candidate.forward = recorder(name)
    try:
        getattr(module, step_name)(*step_args)
    except _Captured:
        pass
    finally:
        for _, candidate in candidates:
            del candidate.forward
    if "args" not in call:
        raise LayoutError(
            f"{type(module).__name__}.{step_name} never calls the model. Under pipeline_parallel the step must run "
            "it through its forward, `self(x)` or a child module's `self.model(x)`, whose output the last stage provides."
        )
    return call["name"], call["args"], call["kwargs"]


@contextmanager
def output_standing_in(module, output):
    """Within this block, `module(...)` returns `output` instead of running the forward."""
    module.forward = lambda *args, **kwargs: output
    try:
        yield
    finally:
        del module.forward


@contextmanager
def standing_in(module, params: dict):
    """Within this block, `module`'s parameters named in `params` are fresh leaves (yielded by
    name): what differentiates the step's loss reaches them, not the parameters."""
    stand_ins = {}
    for name, param in params.items():
        owner_name, _, attr = name.rpartition(".")
        stand_ins[name] = nn.Parameter(param.detach(), requires_grad=True)
        module.get_submodule(owner_name)._parameters[attr] = stand_ins[name]
    try:
        yield stand_ins
    finally:
        for name, param in params.items():
            owner_name, _, attr = name.rpartition(".")
            module.get_submodule(owner_name)._parameters[attr] = param


class _ForwardParameterAudit(TorchFunctionMode):
    """Records the forward's parameters a step uses itself, outside the forward, and lends it
    zeros in their place (they may sit on another stage, or be sharded) so the step completes
    and every rank can refuse the run together."""

    def __init__(self, forward_params: dict[int, str], device):
        super().__init__()
        self.forward_params = forward_params
        self.device = device
        self.used: set[str] = set()

    def __torch_function__(self, func, types, args=(), kwargs=None):
        def lend(value):
            if isinstance(value, torch.Tensor) and id(value) in self.forward_params:
                self.used.add(self.forward_params[id(value)])
                return torch.zeros(value.shape, dtype=value.dtype, device=self.device)
            return value

        args, kwargs = tree_map(lend, (args, kwargs or {}))
        return func(*args, **kwargs)


@contextmanager
def collecting_logs(module, records: list):
    def log(name, value, *args, **kwargs):
        records.append((name, value, args, kwargs))

    module.log = log
    try:
        yield
    finally:
        del module.log


def combine_logs(records: list, module, device) -> list[tuple[str, object, tuple, dict]]:
    """One entry per name: the micro-batches' values combined with the name's reduce_fx, as a
    0-d float tensor on `device`. A torchmetrics Metric travels as ("metric", its attribute
    name): every stage logs its own copy, whose sync group spans the stages (the other stages'
    copies hold empty states)."""
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
        values = torch.stack([torch.as_tensor(v, device=device).detach().float().reshape(()) for v, _, _ in calls])
        if "batch_size" in kwargs:
            kwargs["batch_size"] = sum(c[2].get("batch_size", 0) for c in calls)
        combined.append((name, reduce(values).reshape(()), args, kwargs))
    return combined


def log_layout(combined: list) -> tuple:
    """What a step logs apart from the values: names, arguments, metrics."""
    return tuple((name, value if isinstance(value, tuple) else None, args, tuple(sorted(kwargs.items())))
                 for name, value, args, kwargs in combined)


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


class _Holder(nn.Module):
    """A stage as torch's PipelineStage sees it when it must not recognize the FSDP2 module
    inside: it then keeps FSDP2's own per-backward behaviour (each block's parameters gathered
    for its forward and its backward, its gradients reduce-scattered right after) instead of
    keeping every block gathered and its gradients unsharded until the step's last micro-batch."""

    def __init__(self, stage: nn.Module) -> None:
        super().__init__()
        self.stage = stage

    def forward(self, *args, **kwargs):
        return self.stage(*args, **kwargs)


class PipelineRunner:
    """This rank's stages, their schedules (one per input shape), and Lightning's steps run
    through them."""

    SHAPES_KEPT = 8  # schedules kept (training and evaluation ones), the least recently used dropped first

    def __init__(self, module, split, spec, micro_batches: int, pp_group, dp_group, device,
                 reshard_per_micro_batch: bool = False, tied=None) -> None:
        self.module = module
        self.tied = tied  # weights tied across stages (pipeline/tied.py)
        self.reshard_per_micro_batch = reshard_per_micro_batch
        self.entry_name = split.entry
        self.entry = module.get_submodule(split.entry)
        self.split = split
        self.spec = spec
        self.micro_batches = micro_batches
        self.pp_group = pp_group
        self.dp_group = dp_group
        self.device = device
        pp = dist.get_world_size(pp_group)
        # The pp-group rank that holds the last stage (rank 0 for the V-shaped schedules).
        self.last_stage_rank = next(r for r in range(pp) if split.num_stages - 1 in stages_of_rank(spec, r, pp))
        self.has_first = 0 in split.stage_ids
        self.has_last = split.num_stages - 1 in split.stage_ids
        # Parameters no stage's forward uses train on the last stage, where the steps run.
        outside = {name: module.get_parameter(name) for name in split.outside} if self.has_last else {}
        self.outside = {name: p for name, p in outside.items() if p.requires_grad}
        self.parameters = [p for sm in split.stage_modules for p in sm.parameters()] + list(self.outside.values())
        # The last stage's output travels as tensors; the steps see the model's own output.
        self.model_output = split.stage_modules[-1].flat_output.rebuild if self.has_last else None
        self.forward_params = {id(p): name for name, p in module.named_parameters() if name not in split.outside}
        self._schedules: OrderedDict = OrderedDict()
        self._audited: set[str] = set()
        self._loss_fn = None
        self._set_aside: list = []
        self._train_log_layout = None  # what training_step logged last, as every stage knows it

    def _call_loss_fn(self, output, index):
        return self._loss_fn(output, index)

    def _schedule(self, kind: str, batch):
        """The schedule for this batch's shapes. torch's stages infer the shapes they send and
        receive on their first step and keep them, so each shape gets stages of its own."""
        key = (kind, tuple((tuple(t.shape), t.dtype) for t in tree_flatten(batch)[0] if isinstance(t, torch.Tensor)))
        if key not in self._schedules:
            stages = [
                PipelineStage(_Holder(sm) if self.reshard_per_micro_batch else sm, sid, self.split.num_stages,
                              self.device, group=self.pp_group)
                for sm, sid in zip(self.split.stage_modules, self.split.stage_ids)
            ]
            build = build_schedule if kind == "train" else build_eval_schedule
            self._schedules[key] = build(self.spec, stages, self.micro_batches, self._call_loss_fn)
            if len(self._schedules) > self.SHAPES_KEPT:
                self._schedules.popitem(last=False)
        self._schedules.move_to_end(key)
        return self._schedules[key]

    def _audit(self, step_name: str):
        """On a step's first call: which of the forward's parameters the step uses itself."""
        if step_name in self._audited or not self.has_last:
            return None
        return _ForwardParameterAudit(self.forward_params, self.device)

    def train_step(self, batch, batch_idx, accumulate: int):
        """Runs forward and backward of every micro-batch. Lightning zeroes gradients after the
        step and before its backward, so the gradients are set aside here and handed back by
        `restore_gradients` (called from the strategy's backward)."""
        micro = split_batch(batch, self.micro_batches)
        if batch_idx % accumulate == 0:  # a new accumulation window starts from zero
            for p in self.parameters:
                p.grad = None
        args, kwargs = self._model_inputs("training_step", batch, batch_idx)
        # Keyed by micro-batch: on a schedule's first step, torch's shape inference also calls
        # loss_fn for micro-batch 0; the call that counts for that micro-batch comes later.
        records: dict[int, list] = {}
        losses: dict[int, torch.Tensor] = {}
        outside_grads: dict[int, tuple] = {}
        audit = self._audit("training_step")

        def loss_fn(output, index):
            index = int(index)
            records[index] = []
            output = self.model_output(output)
            with collecting_logs(self.module, records[index]), output_standing_in(self.entry, output), \
                    audit or nullcontext(), standing_in(self.module, self.outside) as stand_ins:
                result = self.module.training_step(micro[index], batch_idx)
            loss = result["loss"] if isinstance(result, dict) else result
            if not isinstance(loss, torch.Tensor):
                raise LayoutError("Under pipeline_parallel, training_step must return the loss (a tensor or {'loss': ...}).")
            losses[index] = loss.detach().float()
            # One process computes the batch's mean loss once; here each micro-batch is 1/M of it.
            loss = loss / (self.micro_batches * accumulate)
            outside_grads[index] = self._outside_gradients(loss, stand_ins)
            return loss

        self._loss_fn = loss_fn
        self._schedule("train", batch).step(*args, target=self._micro_batch_indices(), return_outputs=False, **kwargs)
        self._add_outside_gradients(outside_grads.values())
        self._average_outside_gradients()
        self._set_aside = [(p, p.grad) for p in self.parameters]
        for p in self.parameters:
            p.grad = None
        loss = torch.stack([losses[i] for i in sorted(losses)]).mean() if self.has_last else None
        logs = [record for index in sorted(records) for record in records[index]]
        return self._share_training_step(loss, logs, audit)

    def _micro_batch_indices(self):
        """The schedule hands the last stage's loss_fn one of these per micro-batch: on the host,
        so that reading it costs no device sync."""
        return torch.arange(self.micro_batches) if self.has_last else None

    def _share_training_step(self, loss, records, audit):
        """Sends the last stage's loss and logged values to every stage as one device tensor, with
        the log layout (names, arguments) pickled only when it changed; logs on every stage."""
        layout, values = (), []
        if self.has_last:
            combined = combine_logs(records, self.module, self.device)
            layout = log_layout(combined)
            values = [value for _, value, _, _ in combined if not isinstance(value, tuple)]
        known = self._train_log_layout
        # The other stages learn from the last whether the layout changed (on the first step it has).
        changed = (audit is not None or layout != known) if self.has_last else known is None
        # Sized by the layout every stage knows: [changed, loss, the values it lists].
        payload = torch.zeros(2 + sum(1 for entry in known or () if entry[1] is None), device=self.device)
        if self.has_last:
            payload[0] = float(changed)
            payload[1] = loss
            if not changed and values:
                payload[2:] = torch.stack(values)
        dist.broadcast(payload, group=self.pp_group, group_src=self.last_stage_rank)
        if not self.has_last and bool(payload[0]):  # the one read: did the layout change?
            changed = True
        if changed:
            misused = sorted(audit.used) if audit is not None else []
            shared = [(layout, misused, [v.item() for v in values])]
            dist.broadcast_object_list(shared, group=self.pp_group, group_src=self.last_stage_rank, device=self.device)
            layout, misused, plain_values = shared[0]
            self._audited.add("training_step")
            self._refuse_misuse("training_step", misused)
            self._train_log_layout = layout
            values = [torch.tensor(v, device=self.device) for v in plain_values] if not self.has_last else values
        elif not self.has_last:
            layout, values = known, list(payload[2:])
        self._log(layout, values)
        return payload[1] if not self.has_last else loss

    def _log(self, layout: tuple, values: list) -> None:
        values = iter(values)
        for name, metric, args, kwargs in layout:
            self._log_one(name, metric if metric is not None else next(values), args, dict(kwargs))

    def _log_one(self, name, value, args, kwargs) -> None:
        if isinstance(value, tuple):  # ("metric", attribute)
            value = self.module.get_submodule(value[1])
            if not self.has_last:
                # Updated on the last stage, whose states this copy receives when it syncs;
                # counting the update keeps torchmetrics from warning that it never ran.
                value._update_count += 1
        self.module.log(name, value, *args, **kwargs)

    def _outside_gradients(self, loss, stand_ins: dict) -> tuple:
        """The gradients of the parameters outside the forward from one micro-batch's loss, taken
        here: torch's schedules differentiate only what their stages hold (the split-backward ones
        compute weight gradients for the stages' own parameters alone)."""
        if not stand_ins:
            return ()
        return torch.autograd.grad(loss, list(stand_ins.values()), retain_graph=True, allow_unused=True)

    def _add_outside_gradients(self, per_micro_batch) -> None:
        for grads in per_micro_batch:
            for param, grad in zip(self.outside.values(), grads):
                if grad is not None:
                    param.grad = grad if param.grad is None else param.grad + grad

    def _model_inputs(self, step_name: str, *step_args) -> tuple[tuple, dict]:
        """What this rank hands the schedule: the model's call on the first stage's rank; under a
        declared plan, the call by name on every rank (each stage reads its own micro-batch of
        the call's tensors, labels say, instead of receiving them from the stage before)."""
        if not (self.has_first or self.split.declared):
            return (), {}
        _, args, kwargs = capture_call(self.module, step_name, *step_args, entry=self.entry_name)
        if self.split.declared:
            return (), call_by_name(self.entry, args, kwargs)
        return args, kwargs

    def _average_outside_gradients(self) -> None:
        """Data parallelism for the parameters outside the forward: one all-reduce of their
        gradients (averaging already-averaged ones again changes nothing, so accumulation works)."""
        average_over([p.grad for p in self.outside.values() if p.grad is not None], self.dp_group)

    def restore_gradients(self) -> None:
        for p, grad in self._set_aside:
            p.grad = grad
        self._set_aside = []

    def eval_step(self, step_name: str, batch, batch_idx, *rest):
        split_batch(batch, self.micro_batches)  # the divisibility check
        args, kwargs = self._model_inputs(step_name, batch, batch_idx, *rest)
        # The schedule asks the last stage for a loss even when it runs forward only.
        self._loss_fn = lambda output, index: output.new_zeros(()) if isinstance(output, torch.Tensor) else torch.zeros(())
        with torch.inference_mode(False), torch.no_grad():
            output = self._schedule("eval", batch).eval(*args, target=self._micro_batch_indices(), **kwargs)
        records, result = [], None
        audit = self._audit(step_name)
        if self.has_last:
            output = self.model_output(output)
            with collecting_logs(self.module, records), output_standing_in(self.entry, output), audit or nullcontext():
                result = getattr(self.module, step_name)(batch, batch_idx, *rest)
        return self._share_and_log(step_name, records, result, audit)

    def _share_and_log(self, step_name, records, result, audit):
        """Sends the last stage's logs and step result (any object: predictions, say) to every
        stage; logs there. Evaluation only: it pickles what it sends."""
        misused = sorted(audit.used) if audit is not None else []
        combined = [(n, v if isinstance(v, tuple) else v.item(), a, k)
                    for n, v, a, k in combine_logs(records, self.module, self.device)]
        payload = [(combined, result, misused)]
        dist.broadcast_object_list(payload, group=self.pp_group, group_src=self.last_stage_rank, device=self.device)
        logs, result, misused = payload[0]
        self._audited.add(step_name)
        self._refuse_misuse(step_name, misused)
        for name, value, args, kwargs in logs:
            if not isinstance(value, tuple):
                value = torch.tensor(value, device=self.device)
            self._log_one(name, value, args, kwargs)
        return result

    def _refuse_misuse(self, step_name: str, misused: list) -> None:
        """Refuses the run on every stage alike if the step used the forward's parameters itself."""
        if misused:
            raise LayoutError(
                f"{type(self.module).__name__}.{step_name} uses the parameter(s) {misused} itself, outside the "
                "forward, which uses them too. Under pipeline_parallel these live on one stage (sharded under data "
                "parallelism) while the step runs on the last: use them only in the forward, or only in the step."
            )
