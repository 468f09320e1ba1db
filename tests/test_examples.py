"""The main job and the example module, run as a new user would."""

import re
import subprocess
import sys

from lightning_parallel import parity
from tests.harness import REPO, run

EXAMPLE = dict(
    model="examples.gpt:GPT",
    model_kwargs={"seq_len": 32, "d_model": 32, "n_layers": 2},
    data="tests.models:example_corpus",
    batch_size=8,
    max_steps=5,
    devices=2,
)


def test_example_module_trains_as_under_ddp():
    ddp = run({**EXAMPLE, "strategy": "ddp"})
    hybrid = run({**EXAMPLE, "strategy": {"data_parallel": 2}})
    parity.assert_parity(ddp, hybrid)


def test_main_job_prints_layout_and_loss_falls():
    cmd = [sys.executable, "examples/train.py", "trainer.max_steps=30", "model.n_layers=2"]
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=300)
    output = proc.stdout + proc.stderr
    assert proc.returncode == 0, output[-3000:]
    assert "HybridParallel layout pp=2 x dp=1 x tp=2 on 4 processes" in output
    assert re.search(r"rank +2 on \S+ \(node 0\): pp=1 dp=0 tp=0", output)
    assert "Tensor-parallel plan (given), tp=2:" in output
    assert "Pipeline split (balanced by counted cost), 2 stages:" in output
    curve = re.search(r"train_loss by step: (.*)", output).group(1)
    losses = [float(point.split(": ")[1]) for point in curve.split(", ")]
    assert losses and losses[-1] < losses[0] - 1.0, losses


def test_main_job_under_torchrun():
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=4", "examples/train.py",
           "trainer.max_steps=3", "model.n_layers=2"]
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=300)
    output = proc.stdout + proc.stderr
    assert proc.returncode == 0, output[-3000:]
    assert "HybridParallel layout pp=2 x dp=1 x tp=2 on 4 processes" in output
    assert "`Trainer.fit` stopped: `max_steps=3` reached." in output
