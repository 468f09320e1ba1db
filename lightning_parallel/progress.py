"""A progress bar that counts optimizer steps when training is bounded by `max_steps`.

Lightning's bars count an epoch's batches; with `max_steps` and no `max_epochs` they read
"Epoch 0/-2" (max_epochs is -1 there) and restart every epoch, so they never say how far the
run is. This one shows `step k/max_steps` across epochs, and is Lightning's TQDM bar otherwise.
"""

from __future__ import annotations

from typing import Any

import lightning.pytorch as pl
from lightning.pytorch.callbacks import TQDMProgressBar


def bounded_by_steps(trainer: pl.Trainer) -> bool:
    """Whether max_steps ends the run (no max_epochs given, or none that comes first)."""
    return trainer.max_steps > 0 and trainer.max_epochs in (None, -1)


class StepProgressBar(TQDMProgressBar):
    """`Trainer(callbacks=[StepProgressBar()])`: under `max_steps`, the bar runs from 0 to
    max_steps over the whole run and is labelled with the epoch."""

    def on_train_epoch_start(self, trainer: pl.Trainer, *args: Any) -> None:
        super().on_train_epoch_start(trainer, *args)
        if bounded_by_steps(trainer):
            bar = self.train_progress_bar
            bar.total = trainer.max_steps
            bar.n = trainer.global_step
            bar.set_description(f"Epoch {trainer.current_epoch}, step")

    def on_train_batch_end(self, trainer: pl.Trainer, module: pl.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        if not bounded_by_steps(trainer):
            return super().on_train_batch_end(trainer, module, outputs, batch, batch_idx)
        bar = self.train_progress_bar
        step = trainer.global_step
        if bar is not None and not bar.disable and (step % self.refresh_rate == 0 or step == bar.total):
            bar.n = step
            bar.set_postfix(self.get_metrics(trainer, module))  # refreshes the bar


__all__ = ["StepProgressBar", "bounded_by_steps"]
