"""A SLURM job for tests/test_slurm.py: trains the tiny GPT at pp=2 x dp=2 on two nodes from a
StatefulDataLoader; after step SIGNAL_STEP, rank SIGNAL_RANK alone receives SLURM's requeue
signal (SIGUSR1), as a preempted job's ranks may at different moments. Rank 0 prints "started at
step N" (N > 0 after the requeued job resumed from its checkpoint), "step N loss L" after every
step and "finished at step N". The data and model are the parity spec `SPEC` of the test.

    srun python tests/slurm_requeue_job.py RUN_DIR SIGNAL_RANK SIGNAL_STEP
"""

import os
import signal
import sys
from pathlib import Path

import lightning.pytorch as pl
from torchdata.stateful_dataloader import StatefulDataLoader

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from lightning_parallel import HybridParallel  # noqa: E402
from tests.models import tiny_gpt, token_data  # noqa: E402

MAX_STEPS = 12  # the epoch is 8 steps (64 samples in global batches of 8)


class Progress(pl.Callback):
    def __init__(self, signal_rank: int, signal_step: int):
        self.signal_rank, self.signal_step = signal_rank, signal_step

    def on_train_start(self, trainer, module):
        if trainer.is_global_zero:
            print(f"started at step {trainer.global_step}", flush=True)

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx):
        if trainer.is_global_zero:
            print(f"step {trainer.global_step} loss {float(trainer.callback_metrics['train_loss'])!r}", flush=True)
        if trainer.global_rank == self.signal_rank and trainer.global_step == self.signal_step:
            os.kill(os.getpid(), signal.SIGUSR1)

    def on_train_end(self, trainer, module):
        if trainer.is_global_zero:
            print(f"finished at step {trainer.global_step}", flush=True)


def main(run_dir: Path, signal_rank: int, signal_step: int) -> None:
    pl.seed_everything(0)
    train, _ = token_data()
    trainer = pl.Trainer(
        accelerator="cpu", num_nodes=2, devices=2, max_steps=MAX_STEPS, default_root_dir=run_dir,
        strategy=HybridParallel(pipeline_parallel=2, data_parallel=2, micro_batches=2, timeout=120),
        logger=False, enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
        callbacks=[Progress(signal_rank, signal_step)],
    )
    trainer.fit(tiny_gpt(n_layers=2), StatefulDataLoader(train, batch_size=4, shuffle=True))  # 4 per dp rank


if __name__ == "__main__":
    main(Path(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]))
