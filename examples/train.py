"""The main job: train the example GPT on a byte-level corpus with HybridParallel.

    python examples/train.py                                  # configs/train.yaml as it composes
    python examples/train.py strategy=dp trainer.devices=2    # another layout from configs/strategy/
    python examples/train.py +experiment=pp_small '~trainer.logger'   # any Hydra override
    python examples/train.py --multirun strategy=dp,tp trainer.devices=2   # a sweep

Hydra composes configs/ (its Compose API: nothing is written, the working directory stays, and
every rank Lightning starts composes the same). Hydra's own flags (--multirun, --cfg, --info,
...) run the same `main` as a Hydra app, examples/train_hydra.py.
"""

import os
import sys
import warnings
from pathlib import Path

import lightning.pytorch as pl
from omegaconf import DictConfig

from lightning_parallel import LayoutError
from lightning_parallel.config import ConfigError, compose, instantiate

CONFIG = Path(__file__).resolve().parents[1] / "configs" / "train.yaml"

# Deprecations inside our dependencies, one per process, that neither this job nor its user can
# act on: Lightning 2.6's CombinedLoader builds torch's LeafSpec, and torchdata 0.11's
# StatefulDataLoader calls torch.set_vital (torch 2.13 deprecates both).
warnings.filterwarnings("ignore", message=r"`isinstance\(treespec, LeafSpec\)` is deprecated")
warnings.filterwarnings("ignore", message="'set_vital' is deprecated")


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
    pl.seed_everything(cfg.seed, verbose=False)
    strategy = instantiate(cfg.strategy, "strategy")
    callbacks = [instantiate(node, f"trainer.callbacks[{i}]") for i, node in enumerate(cfg.trainer.get("callbacks", []))]
    trainer = instantiate(cfg.trainer, "trainer", strategy=strategy, callbacks=[*callbacks, LossCurve()])
    trainer.fit(instantiate(cfg.model, "model"), instantiate(cfg.data, "data"))


def exit_on_config_error(run, cfg: DictConfig) -> None:
    """Runs `run(cfg)`; a config that cannot run ends the process with its message, without a traceback."""
    try:
        run(cfg)
    except (ConfigError, LayoutError) as err:
        sys.exit(f"{type(err).__name__}: {err}")


def config_from_command_line(words: list[str]) -> DictConfig:
    """configs/train.yaml composed with these overrides, as this script runs it."""
    return compose(CONFIG, words)


if __name__ == "__main__":
    if any(word.startswith("-") for word in sys.argv[1:]):  # Hydra's flags: the Hydra app runs them
        app = str(Path(__file__).with_name("train_hydra.py"))
        os.execv(sys.executable, [sys.executable, app, *sys.argv[1:]])
    try:
        config = config_from_command_line(sys.argv[1:])
    except ConfigError as err:
        sys.exit(f"ConfigError: {err}")
    exit_on_config_error(main, config)
