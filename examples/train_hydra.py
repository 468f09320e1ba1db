"""The main job as a Hydra app: the same configs/ files and `main` as examples/train.py, which
hands Hydra's flags (--multirun, --cfg, --info, ...) to this script.

    python examples/train_hydra.py strategy=dp trainer.devices=2
    python examples/train_hydra.py --multirun strategy=dp,tp trainer.devices=2 trainer.max_steps=20
    python examples/train_hydra.py --cfg job +experiment=pp_small   # the composed config, nothing run

Run directories go under runs/hydra/ (configs/train.yaml, `hydra:`); the working directory stays.
"""

import subprocess
import sys

import hydra
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import DictConfig

SHOW_ONLY = ("--cfg", "-c", "--info", "-i", "--help", "-h", "--hydra-help")

# Lightning is imported before Hydra configures logging, so that it keeps its own console handler
# (else each of its messages prints twice, through it and through Hydra's); not for the flags that
# only show something.
if not any(word.split("=")[0] in SHOW_ONLY for word in sys.argv[1:]):
    from train import exit_on_config_error, main

SWEEP_FLAGS = ("-m", "--multirun")


@hydra.main(config_path="../configs", config_name="train", version_base="1.3")
def app(cfg: DictConfig) -> None:
    if HydraConfig.get().mode == RunMode.MULTIRUN:
        run_job_in_new_process()
    else:
        exit_on_config_error(main, cfg)


def run_job_in_new_process() -> None:
    """Runs this job of a sweep as a single run of its own overrides, in a fresh process.

    Lightning starts ranks 1.. by running this script again with sys.argv, which under
    --multirun holds the whole sweep, and a finished job leaves its process group and
    LOCAL_RANK behind in this process, where the next job would take them for its own.
    """
    job = HydraConfig.get()
    flags = [word for word in sys.argv[1:] if word.startswith("-") and word not in SWEEP_FLAGS]
    command = [sys.executable, sys.argv[0], *flags, *job.overrides.task,
               f'hydra.run.dir="{job.runtime.output_dir}"', "hydra.output_subdir=null"]
    returncode = subprocess.run(command).returncode
    if returncode:
        sys.exit(f"The job with overrides {' '.join(job.overrides.task)} failed (exit code {returncode}).")


if __name__ == "__main__":
    app()
