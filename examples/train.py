"""The main job: train the example GPT on a byte-level corpus with HybridParallel.

    python examples/train.py                                  # configs/train.yaml as it is
    python examples/train.py trainer.devices=4 strategy.sharding=full
"""

from pathlib import Path

import lightning.pytorch as pl
from omegaconf import OmegaConf

from data import ByteDataModule
from gpt import GPT
from lightning_parallel import HybridParallel

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


def main() -> None:
    cfg = OmegaConf.merge(OmegaConf.load(CONFIG), OmegaConf.from_cli())
    cfg = OmegaConf.to_container(cfg, resolve=True)
    pl.seed_everything(cfg["seed"])
    trainer = pl.Trainer(**cfg["trainer"], strategy=HybridParallel(**cfg["strategy"]), callbacks=[LossCurve()])
    trainer.fit(GPT(**cfg["model"]), ByteDataModule(**cfg["data"]))


if __name__ == "__main__":
    main()
