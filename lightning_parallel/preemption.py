"""SLURM preemption: save and requeue at a point every rank reaches together.

Lightning's auto-requeue handler saves a checkpoint inside the signal handler, wherever each
rank happens to be when the signal lands. A sharded save is collective: ranks caught in
different collectives (one mid pipeline schedule, another in a gradient reduction) would
deadlock or mix their messages. Here the handler only records the signal; at the start of the
next optimizer step all ranks agree on it (one MAX all-reduce, read at the step after, so that
the read never waits for a step's work; at an optimizer step's first batch, so that no
accumulated gradient is lost) and run Lightning's handler together, which saves `hpc_ckpt_N.ckpt` and has rank 0 call `scontrol requeue`. The requeued
job resumes from that checkpoint by itself (Lightning looks for it under SLURM).
"""

from __future__ import annotations

from typing import Callable, ContextManager, Optional

import torch
import torch.distributed as dist
from lightning.fabric.plugins.environments import SLURMEnvironment
from lightning.pytorch.trainer.connectors.signal_connector import _SignalConnector


class DeferredRequeue:
    def __init__(self, trainer, saving: Callable[[], ContextManager]) -> None:
        self.connector = trainer._signal_connector
        self.saving = saving  # the context the save runs in
        self.signum = 0
        self._vote = None  # the vote in flight: (its host copy, the event its copy completes)
        self.requeuing = False  # while Lightning's handler saves and requeues
        # Lightning registers this attribute as the handler after the strategy's setup.
        self.connector._slurm_sigusr_handler_fn = self.record

    def record(self, signum, frame) -> None:
        self.signum = int(signum)

    def at_step_start(self, device: torch.device) -> None:
        """Collective: every rank must call it at the same step. Acts on the vote taken at the
        previous step's start, read without waiting for that step's work (no host sync)."""
        previous, self._vote = self._vote, self._start_vote(device)
        if previous is None:
            return
        host_vote, copied = previous
        if copied is not None:
            copied.synchronize()  # waits for the vote's copy alone, long done by now
        signum = int(host_vote.item())
        if signum:
            self.signum = 0
            self.requeuing = True
            try:
                with self.saving():
                    _SignalConnector._slurm_sigusr_handler_fn(self.connector, signum, None)
            finally:
                self.requeuing = False

    def _start_vote(self, device: torch.device):
        signalled = torch.full((1,), self.signum, device=device)
        dist.all_reduce(signalled, op=dist.ReduceOp.MAX)
        if device.type != "cuda":
            return signalled, None
        host_vote = signalled.to("cpu", non_blocking=True)
        copied = torch.cuda.Event()
        copied.record()
        return host_vote, copied


def defer_slurm_requeue(trainer, environment, saving: Callable[[], ContextManager]) -> Optional[DeferredRequeue]:
    """Takes over Lightning's requeue handler when it would be installed (SLURM, auto-requeue on)."""
    if isinstance(environment, SLURMEnvironment) and environment.auto_requeue:
        return DeferredRequeue(trainer, saving)
    return None
