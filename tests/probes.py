"""Callbacks that look inside a parallel run; parity specs name them under "callbacks"."""

import lightning.pytorch as pl
from torch.distributed.tensor.debug import CommDebugMode

REDUCTIONS = ("allreduce", "reduce_scatter")


class GradSyncProbe(pl.Callback):
    """Counts the gradient reductions each backward pass issues (one entry per batch)."""

    def __init__(self):
        self.record = {"reductions_per_backward": []}
        self._mode = None

    def on_before_backward(self, trainer, module, loss):
        self._mode = CommDebugMode()
        self._mode.__enter__()

    def on_after_backward(self, trainer, module):
        self._mode.__exit__(None, None, None)
        counts = self._mode.get_comm_counts()
        reductions = sum(n for op, n in counts.items() if any(r in str(op) for r in REDUCTIONS))
        self.record["reductions_per_backward"].append(reductions)


class CheckpointEveryTwoSteps(pl.callbacks.ModelCheckpoint):
    """Saves every two optimizer steps into $LP_TEST_CKPT_DIR."""

    def __init__(self):
        import os

        super().__init__(dirpath=os.environ["LP_TEST_CKPT_DIR"], every_n_train_steps=2, save_top_k=-1)


class LearningRates(pl.Callback):
    """Records the first parameter group's learning rate at every training step."""

    def __init__(self):
        self.record = {"learning_rates": []}

    def on_train_batch_start(self, trainer, module, batch, batch_idx):
        self.record["learning_rates"].append(trainer.optimizers[0].param_groups[0]["lr"])
