"""Every tensor a collective receives lives on the strategy's device (NCCL refuses CPU tensors).
A CPU run cannot tell "cpu" from "the device", so each helper is called with a device it would
never pick by itself (meta), and the collective is recorded instead of run."""

import pytest
import torch
import torch.distributed as dist
from torch import nn

from lightning_parallel import HybridParallel
from lightning_parallel.gradients import total_grad_norm
from lightning_parallel.pipeline.runner import PipelineRunner
from lightning_parallel.preemption import DeferredRequeue

META = torch.device("meta")


@pytest.fixture
def recorded(monkeypatch):
    """The devices of the tensors handed to all_reduce, broadcast and broadcast_object_list."""
    devices = []

    def all_reduce(tensor, *args, **kwargs):
        devices.append(tensor.device)

    def broadcast_object_list(objects, *args, device=None, **kwargs):
        devices.append(torch.device(device) if device is not None else None)

    monkeypatch.setattr(dist, "all_reduce", all_reduce)
    monkeypatch.setattr(dist, "broadcast", all_reduce)
    monkeypatch.setattr(dist, "broadcast_object_list", broadcast_object_list)
    monkeypatch.setattr(dist, "get_world_size", lambda group=None: 2)
    return devices


def test_gradient_norm_of_a_rank_without_gradients(recorded):
    no_grad = nn.Parameter(torch.zeros(3, device=META))
    for parameters in ([], [no_grad]):
        total_grad_norm(parameters, pp_group=object(), device=META)
    assert recorded == [META, META]


def test_outside_parameters_gradient_average(recorded):
    runner = PipelineRunner.__new__(PipelineRunner)
    param = nn.Parameter(torch.zeros(3, device=META))
    param.grad = torch.zeros(3, device=META)
    runner.outside, runner.dp_group = {"scale": param}, object()
    runner._average_outside_gradients()
    assert recorded == [META]


def test_pipeline_logs_and_results_broadcast(recorded):
    runner = PipelineRunner.__new__(PipelineRunner)
    runner.module, runner.pp_group, runner.last_stage_rank, runner.device = nn.Module(), object(), 0, META
    runner.has_last, runner._audited, runner._train_log_layout = True, set(), None
    runner._share_training_step(torch.zeros((), device=META), [], None)  # first step: the layout too
    runner._share_training_step(torch.zeros((), device=META), [], None)  # then the tensor only
    runner._share_and_log("validation_step", [], None, None)
    assert recorded == [META, META, META, META]


def test_strategy_broadcast(recorded, monkeypatch):
    import lightning_parallel.strategy as strategy_module

    monkeypatch.setattr(strategy_module, "_distributed_is_initialized", lambda: True)
    strategy = HybridParallel()
    strategy.parallel_devices = [META]
    strategy.broadcast("the split")
    assert recorded == [META]


def test_preemption_vote(recorded):
    from types import SimpleNamespace

    requeue = DeferredRequeue.__new__(DeferredRequeue)
    requeue.signum, requeue._vote, requeue.device = 0, None, META
    trainer = SimpleNamespace(global_step=3)
    requeue.on_train_batch_start(trainer, None, None, 0)  # starts the vote
    requeue.on_train_batch_start(trainer, None, None, 1)  # an accumulating batch: no second vote
    requeue.on_train_batch_end(trainer, None, None, None, 1)  # no optimizer update yet: not read
    trainer.global_step = 4
    with pytest.raises(RuntimeError, match="meta"):  # after the update it is read (a real tensor's)
        requeue.on_train_batch_end(trainer, None, None, None, 2)
    assert recorded == [META]
