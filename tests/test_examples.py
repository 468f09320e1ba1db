"""The main job and the example module, run as a new user would."""

import re
import subprocess
import sys

from lightning_parallel import parity
from tests.harness import REPO, REPORT_ROW, report_rows, run

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


# The warnings the README explains ("What `make demo` prints"): Lightning's hint on a machine
# that has SLURM's srun, when the job was not started with it.
EXPLAINED_WARNINGS = {"The `srun` command is available on your system but is not used."}


def warnings_in(output):
    """The first sentence of every warning Python printed (`file.py:line: [Category: ]message`)."""
    found = re.findall(r"^\S+\.py:\d+: (?:\w+(?:Warning|Error): )?(.*)$", output, re.M)
    return {message.split(". ")[0].rstrip(".") + "." for message in found}


def readme_report():
    """The start-up report as the README shows it."""
    text = (REPO / "README.md").read_text()
    return re.search(r"<!-- tested by tests/test_examples.py -->\n```\n(.*?)```", text, re.S)[1].splitlines()


def test_main_job_prints_layout_and_loss_falls():
    cmd = [sys.executable, "examples/train.py", "trainer.max_steps=30", "model.n_layers=2"]
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=300)
    output = proc.stdout + proc.stderr
    assert proc.returncode == 0, output[-3000:]
    assert "HybridParallel layout pp=2 x dp=1 x tp=2 on 4 processes" in output
    assert [(r["rank"], r["node"], r["pp"], r["dp"], r["tp"]) for r in report_rows(output)] == [
        (0, 0, 0, 0, 0), (1, 0, 0, 0, 1), (2, 0, 1, 0, 0), (3, 0, 1, 0, 1)]
    assert "Tensor-parallel plan (given), tp=2:" in output
    assert "Pipeline split (balanced by counted cost), 2 stages:" in output
    assert warnings_in(output) <= EXPLAINED_WARNINGS, output[-3000:]
    # The README's copy of the report: every line but those that vary with the host and the model.
    lines = output.splitlines()
    for line in readme_report():
        if REPORT_ROW.match(line) or line.startswith(("  stage ", "  estimated")):
            continue
        if line.startswith("  rank "):
            assert any(re.fullmatch(r"  rank +host +node +pp +dp +tp +parameters +gradients +optimizer +MiB", l)
                       for l in lines), line
        else:
            assert line in lines, line
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
