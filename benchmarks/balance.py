"""Timed stage costs of the automatic pipeline split against a worse one, on this machine.

Tests assert counted costs only; this script times the splits (forward and backward of each
stage on a micro-batch, one thread, median of 15 passes, then the smallest of 5 such medians)
and writes docs/balance.md.  Run: .venv/bin/python benchmarks/balance.py
"""

import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from tests.stage_timing import plan_for, spread, stage_seconds  # noqa: E402
from tests.test_pipeline_checks import HeavyHeadModule  # noqa: E402
from tests.user_models import ResNetStyle, image_data  # noqa: E402


def timed(entry, plan, call):
    samples = torch.tensor([stage_seconds(entry, plan, call) for _ in range(5)])
    return samples.min(dim=0).values.tolist()


def row(name, module, batch, other):
    entry, _, auto, call = plan_for(module, batch, 2)
    _, _, worse, _ = plan_for(module, batch, 2, names=[other])
    a, w = timed(entry, auto, call), timed(entry, worse, call)
    return (f"| {name} | {' / '.join(f'{t * 1e3:.2f}' for t in a)} ms ({spread(a):.0%}) "
            f"| `{other}`: {' / '.join(f'{t * 1e3:.2f}' for t in w)} ms ({spread(w):.0%}) |")


def main():
    torch.manual_seed(0)
    images = image_data(size=32)[0][:8]
    rows = [
        row("ResNet-style, nn.Sequential stages", ResNetStyle(stages_as="sequential"), images, "stages.3.0"),
        row("ResNet-style, torchvision attributes", ResNetStyle(stages_as="attributes"), images, "layer4.0"),
        row("16 blocks and a head worth ~3", HeavyHeadModule(), torch.randint(1024, (16, 64)), "blocks.8"),
    ]
    text = "\n".join([
        "# Pipeline balance, timed (benchmarks/balance.py)", "",
        "Stage 0 / stage 1 forward+backward time of a micro-batch at pp=2, one thread, on this 2-core",
        "CPU machine; the automatic split (counted costs) against a worse split point.", "",
        "| model | automatic split | worse split |", "|---|---|---|", *rows, ""])
    Path(ROOT, "docs", "balance.md").write_text(text)
    print(text)


if __name__ == "__main__":
    main()
