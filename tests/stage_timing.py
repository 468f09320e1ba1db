"""Times each stage of a pipeline split in one process: forward and backward of every stage
module on a real micro-batch, the median of several repeats. Tests check the counted-cost split
against these wall-clock stage costs."""

import time

import torch

from lightning_parallel.pipeline.balance import auto_split, named_split
from lightning_parallel.pipeline.cost import CPU
from lightning_parallel.pipeline.runner import capture_call, concrete_args_for, split_batch
from lightning_parallel.pipeline.split import StageModule, plan_stages


def plan_for(module, batch, num_stages, micro_batches=2, names=None):
    """The split `split_model` would choose (without freeing anything), and the micro-batch
    call of the module the step runs."""
    entry_name, args, kwargs = capture_call(module, "training_step", batch, 0)
    entry = module.get_submodule(entry_name)
    (margs, mkwargs), *_ = split_batch((args, kwargs), micro_batches)
    concrete = concrete_args_for(entry, args, kwargs)
    if names is None:
        split = auto_split(entry, num_stages, margs, mkwargs, concrete, CPU)
    else:
        split = named_split(entry, names, num_stages, margs, mkwargs, concrete, CPU)
    return entry, split, plan_stages(entry, split.graph, split.unit_stage, num_stages, split.measured), (margs, mkwargs)


def _floats(values):
    values = values if isinstance(values, tuple) else (values,)
    return [v for v in values if isinstance(v, torch.Tensor) and v.is_floating_point()]


def stage_seconds(entry, plan, call, repeats=15) -> list[float]:
    """Median seconds of forward + backward of each stage, inputs received as from the stage before."""
    stages = [StageModule(entry, plan, s) for s in range(plan.num_stages)]
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # several threads on a busy machine time their spin-waits, not the stage
    try:
        samples = [_one_pass(entry, stages, call) for _ in range(repeats)]
    finally:
        torch.set_num_threads(threads)
    return torch.tensor(samples).median(dim=0).values.tolist()


def _one_pass(entry, stages, call) -> list[float]:
    args, kwargs = call
    times = []
    for stage in stages:
        args = tuple(a.detach().requires_grad_(a.is_floating_point()) if isinstance(a, torch.Tensor) else a for a in args)
        start = time.perf_counter()
        out = stage(*args, **kwargs)
        torch.autograd.backward(_floats(out), [torch.ones_like(t) for t in _floats(out)])
        times.append(time.perf_counter() - start)
        args, kwargs = (out if isinstance(out, tuple) else (out,)), {}
    entry.zero_grad(set_to_none=True)
    return times


def spread(costs) -> float:
    return (max(costs) - min(costs)) / max(costs)
