"""The measured pipeline bubble per schedule, beside (P-1)/(M+P-1), and the main job's timeline.

    python benchmarks/pipeline_timeline.py     # docs/timeline.md, docs/timeline.png, results/timeline.json

Each schedule trains the main job's model (configs/model/gpt.yaml) on its byte corpus at the
main job's layout, pp=2 x tp=2 on 4 CPU processes (configs/strategy/3d.yaml), with M=4
micro-batches, and lightning_parallel.PipelineTimeline records training step 2 on every rank.
The main job's own schedule (1f1b) gives the picture in the README.
"""

from __future__ import annotations

import json
import shutil
import sys
import tempfile
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from lightning_parallel import parity  # noqa: E402
from lightning_parallel.timeline import ideal_bubble  # noqa: E402

SCHEDULES = ["gpipe", "1f1b", "interleaved_1f1b", "looped_bfs", "zero_bubble", "zbv", "dualpipev"]
PP, M = 2, 4


def datasets(seq_len: int, train_samples: int, val_samples: int):
    """The main job's byte corpus, cut to sizes the batches divide."""
    from torch.utils.data import Subset

    from examples.data import make_datasets

    train, val = make_datasets(seq_len, max_train_samples=train_samples)
    return train, Subset(val, range(val_samples))


def main_job_parts() -> tuple[dict, dict]:
    model = yaml.safe_load((REPO / "configs" / "model" / "gpt.yaml").read_text())
    strategy = yaml.safe_load((REPO / "configs" / "strategy" / "3d.yaml").read_text())
    model.pop("_target_")
    strategy = {k: v for k, v in strategy.items() if k not in ("_target_", "data_parallel")}
    return model, strategy


def measure(schedule: str, out_dir: Path) -> dict:
    model, strategy = main_job_parts()
    micro = M * (2 if schedule == "dualpipev" else 1)  # DualPipeV needs M >= 2P
    spec = dict(model="examples.gpt:GPT", model_kwargs=model, data="benchmarks.pipeline_timeline:datasets",
                data_kwargs={"seq_len": model["seq_len"], "train_samples": 256, "val_samples": 32}, batch_size=16,
                val_batch_size=16, max_steps=3, devices=4, record_params=False,
                strategy={**strategy, "schedule": schedule, "micro_batches": micro},
                callbacks=[["lightning_parallel.timeline:PipelineTimeline", {"output_dir": str(out_dir), "steps": [2]}]])
    record = parity.run(spec, pythonpath=[str(REPO)])
    return {"schedule": schedule, "micro_batches": micro, "bubble": record["timeline_bubble"],
            "ideal": ideal_bubble(PP, micro)}


def main() -> None:
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for schedule in SCHEDULES:
            out = Path(tmp, schedule)
            rows.append(measure(schedule, out))
            print(json.dumps(rows[-1]), flush=True)
            if schedule == "1f1b":
                shutil.copy(out / "timeline.png", REPO / "docs" / "timeline.png")
    (REPO / "benchmarks" / "results" / "timeline.json").write_text(json.dumps(rows, indent=1))
    write_report(rows)


def report(rows: list[dict]) -> list[str]:
    lines = ["# Pipeline bubble per schedule, measured", "",
             "`python benchmarks/pipeline_timeline.py`: the main job's GPT and layout (pp=2 x tp=2, 4 CPU processes,",
             "gloo), training step 2 recorded by `PipelineTimeline`. Bubble = 1 - busy compute / step time, the mean",
             "over ranks; ideal = (P-1)/(M+P-1) for equal stages and free communication.", "",
             "| schedule | M | measured bubble | (P-1)/(M+P-1) |", "|---|---|---|---|"]
    lines += [f"| {r['schedule']} | {r['micro_batches']} | {r['bubble']:.2f} | {r['ideal']:.2f} |" for r in rows]
    lines += ["", "GPipe, 1F1B and looped BFS come out near (P-1)/(M+P-1); the interleaved and V-shaped schedules",
              "(interleaved_1f1b, zbv, dualpipev) go below it, as they are built to (two stages per rank, and for",
              "the zero-bubble family weight gradients filling the gaps). With a much smaller model (the tests' tiny",
              "GPT) a send or receive over gloo takes as long as a micro-batch's forward, and the bubble doubles:",
              "the timeline then shows the stages waiting on their receives.", "", "![1F1B timeline](timeline.png)", ""]
    return lines


def write_report(rows: list[dict]) -> None:
    lines = report(rows)
    (REPO / "docs" / "timeline.md").write_text("\n".join(lines))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
