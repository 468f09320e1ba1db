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


def main() -> None:
    cfg = OmegaConf.merge(OmegaConf.load(CONFIG), OmegaConf.from_cli())
    cfg = OmegaConf.to_container(cfg, resolve=True)
    pl.seed_everything(cfg["seed"])
    trainer = pl.Trainer(**cfg["trainer"], strategy=HybridParallel(**cfg["strategy"]))
    trainer.fit(GPT(**cfg["model"]), ByteDataModule(**cfg["data"]))


if __name__ == "__main__":
    main()
