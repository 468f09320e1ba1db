"""The example GPT and byte corpus under LightningCLI (pip install -e ".[cli]"): every argument of
the model, the data, the Trainer and HybridParallel is typed on the command line, and a wrong
type is refused before any process starts.

    python examples/cli.py fit --trainer.strategy=lightning_parallel.HybridParallel \
        --trainer.strategy.tensor_parallel=2 --trainer.devices=2 --trainer.accelerator=cpu
    python examples/cli.py fit --print_config     # the whole config, as YAML for --config
"""

from lightning.pytorch.cli import LightningCLI

import lightning_parallel  # noqa: F401  (also registers Trainer(strategy="hybrid"))
from data import ByteDataModule
from gpt import GPT


def main() -> None:
    # overwrite: a second run in the same directory may rewrite the config.yaml it saves.
    LightningCLI(GPT, ByteDataModule, save_config_kwargs={"overwrite": True})


if __name__ == "__main__":
    main()
