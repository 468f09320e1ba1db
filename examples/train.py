"""The main job: train the example GPT on a byte-level corpus with HybridParallel.

    python examples/train.py                                  # configs/train.yaml as it composes
    python examples/train.py strategy=dp trainer.devices=2    # another layout from configs/strategy/
    python examples/train.py trainer.devices=4 strategy.sharding=full

The config is composed from configs/ by lightning_parallel.config (no Hydra needed);
examples/train_hydra.py runs the same `main` as a Hydra app.
"""

import sys
from pathlib import Path

import lightning.pytorch as pl
from omegaconf import DictConfig

from lightning_parallel import LayoutError
from lightning_parallel.config import ConfigError, compose, instantiate

CONFIG = Path(__file__).resolve().parents[1] / "configs" / "train.yaml"


class LossCurve(pl.Callback):
    """Prints the training loss at a few points when training ends (rank 0)."""

    def __init__(self):
        self.losses = []

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx):
        self.losses.append(float(trainer.callback_metrics["train_loss"]))

    def on_train_end(self, trainer, module):
        points = sorted({0, len(self.losses) // 4, len(self.losses) // 2, 3 * len(self.losses) // 4, len(self.losses) - 1})
        if trainer.is_global_zero and self.losses:
            print("train_loss by step: " + ", ".join(f"{i + 1}: {self.losses[i]:.3f}" for i in points))


def main(cfg: DictConfig) -> None:
    """Builds everything before training starts, so a bad config fails in this process alone."""
    pl.seed_everything(cfg.seed)
    strategy = instantiate(cfg.strategy, "strategy")
    trainer = instantiate(cfg.trainer, "trainer", strategy=strategy, callbacks=[LossCurve()])
    trainer.fit(instantiate(cfg.model, "model"), instantiate(cfg.data, "data"))


def exit_on_config_error(run, cfg: DictConfig) -> None:
    """Runs `run(cfg)`; a config that cannot run ends the process with its message, without a traceback."""
    try:
        run(cfg)
    except (ConfigError, LayoutError) as err:
        sys.exit(f"{type(err).__name__}: {err}")


if __name__ == "__main__":
    try:
        config = compose(CONFIG, sys.argv[1:])
    except ConfigError as err:
        sys.exit(f"ConfigError: {err}")
    exit_on_config_error(main, config)
