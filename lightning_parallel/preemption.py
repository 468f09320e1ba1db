"""SLURM preemption: save and requeue at a point every rank reaches together.

Lightning's auto-requeue handler saves a checkpoint inside the signal handler, wherever each
rank happens to be when the signal lands. A sharded save is collective: ranks caught in
different collectives (one mid pipeline schedule, another in a gradient reduction) would
deadlock or mix their messages. Here the handler only records the signal; at the start of the
next training step all ranks agree on it (one MAX all-reduce) and run Lightning's handler
together, which saves `hpc_ckpt_N.ckpt` and has rank 0 call `scontrol requeue`. The requeued
job resumes from that checkpoint by itself (Lightning looks for it under SLURM).
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.distributed as dist
from lightning.fabric.plugins.environments import SLURMEnvironment
from lightning.pytorch.trainer.connectors.signal_connector import _SignalConnector


class DeferredRequeue:
    def __init__(self, trainer) -> None:
        self.connector = trainer._signal_connector
        self.signum = 0
        # Lightning registers this attribute as the handler after the strategy's setup.
        self.connector._slurm_sigusr_handler_fn = self.record

    def record(self, signum, frame) -> None:
        self.signum = int(signum)

    def at_step_start(self, device: torch.device) -> None:
        """Collective: every rank must call it at the same step."""
        signalled = torch.tensor([self.signum], device=device)
        dist.all_reduce(signalled, op=dist.ReduceOp.MAX)
        if signalled.item():
            self.signum = 0
            _SignalConnector._slurm_sigusr_handler_fn(self.connector, int(signalled.item()), None)


def defer_slurm_requeue(trainer, environment) -> Optional[DeferredRequeue]:
    """Takes over Lightning's requeue handler when it would be installed (SLURM, auto-requeue on)."""
    if isinstance(environment, SLURMEnvironment) and environment.auto_requeue:
        return DeferredRequeue(trainer)
    return None
