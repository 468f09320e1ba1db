"""SLURM preemption: save and requeue at a point every rank reaches together.

Lightning's auto-requeue handler saves a checkpoint inside the signal handler, wherever each
rank happens to be when the signal lands. A sharded save is collective: ranks caught in
different collectives (one mid pipeline schedule, another in a gradient reduction) would
deadlock or mix their messages. Here the handler only records the signal. At the first batch of
each optimizer step all ranks vote on it (one MAX all-reduce, started before the step's work);
after the step's optimizer update they read the vote, which never waits for the step's work, and
if any rank was signalled they run Lightning's handler together: it saves `hpc_ckpt_N.ckpt` and
has rank 0 call `scontrol requeue`. The save is where a `ModelCheckpoint(every_n_train_steps)`
save would be, so the requeued job, which resumes from it by itself (Lightning looks for it under
SLURM), goes on exactly: no accumulated gradient is lost and a stateful loader's position counts
the batches trained.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.distributed as dist
from lightning.fabric.plugins.environments import SLURMEnvironment
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.trainer.connectors.signal_connector import _SignalConnector


class DeferredRequeue(Callback):
    def __init__(self, trainer, device: torch.device) -> None:
        self.connector = trainer._signal_connector
        self.device = device
        self.signum = 0
        self.requeuing = False  # while Lightning's handler saves and requeues
        # The vote in flight: its host copy, the event its copy completes, the step it began at.
        self._vote = None
        # Lightning registers this attribute as the handler after the strategy's setup.
        self.connector._slurm_sigusr_handler_fn = self.record

    def record(self, signum, frame) -> None:
        self.signum = int(signum)

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if self._vote is None:  # the step's first batch (the others accumulate into it)
            self._vote = (*self._start_vote(), trainer.global_step)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if self._vote is None or trainer.global_step == self._vote[2]:
            return  # no optimizer update yet: gradients are being accumulated
        (host_vote, copied, _), self._vote = self._vote, None
        if copied is not None:
            copied.synchronize()  # waits for the vote's copy alone, long done by now
        signum = int(host_vote.item())
        if signum:
            self.signum = 0
            self.requeuing = True
            try:
                _SignalConnector._slurm_sigusr_handler_fn(self.connector, signum, None)
            finally:
                self.requeuing = False

    def _start_vote(self):
        signalled = torch.full((1,), self.signum, device=self.device)
        dist.all_reduce(signalled, op=dist.ReduceOp.MAX)
        if self.device.type != "cuda":
            return signalled, None
        host_vote = signalled.to("cpu", non_blocking=True)
        copied = torch.cuda.Event()
        copied.record()
        return host_vote, copied


def defer_slurm_requeue(trainer, environment, device: torch.device) -> Optional[DeferredRequeue]:
    """Takes over Lightning's requeue handler when it would be installed (SLURM, auto-requeue on):
    the returned callback joins the trainer's callbacks."""
    trainer.callbacks[:] = [c for c in trainer.callbacks if not isinstance(c, DeferredRequeue)]  # an earlier fit's
    if not (isinstance(environment, SLURMEnvironment) and environment.auto_requeue):
        return None
    requeue = DeferredRequeue(trainer, device)
    trainer.callbacks.append(requeue)
    return requeue
