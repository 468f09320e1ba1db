"""Peak memory per rank and step time with activation checkpointing none, full and selective.

    python benchmarks/activation_memory.py                 # every layout, table to docs/activation_checkpointing.md
    python benchmarks/activation_memory.py --layouts one --steps 3 --no-compile --out /tmp/ac.md

The model is the example GPT made long and narrow so that activations dominate its memory
(MODEL below: sequence 512, width 64, 8 blocks; 0.47M parameters, 7 MiB of parameters, gradients
and AdamW state), trained on random tokens through the parity harness (lightning_parallel/parity.py)
in fresh processes, with the memory probe of benchmarks/memory.py: per rank, the resident peak
up to the end of training and the sampled peak of malloc's live bytes, above the resident memory
after imports, and rank 0's step times. Every run uses HybridParallel (one process included, so
that checkpointing applies) and the same data per data-parallel rank.
"""

from __future__ import annotations

import argparse
import datetime
import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from benchmarks.memory import MIB, machine, spread  # noqa: E402

MODEL = dict(vocab_size=256, seq_len=512, d_model=64, n_heads=4, n_layers=8, lr=1e-3)
BATCH_PER_RANK = 8
MODES = ("none", "full", "selective")

# name -> (HybridParallel arguments, processes, data-parallel degree)
LAYOUTS = {
    "one": (dict(data_parallel=1), 1, 1),
    "dp2_full": (dict(data_parallel=2, sharding="full"), 2, 2),
    # 1F1B keeps up to pipeline_parallel micro-batches' activations on the first stage.
    "pp2": (dict(pipeline_parallel=2, data_parallel=1, micro_batches=4), 2, 1),
}


def spec_for(layout: str, mode: str, compile: bool, steps: int) -> dict:
    strategy, devices, dp = LAYOUTS[layout]
    batch = BATCH_PER_RANK * dp
    return dict(
        model="tests.models:tiny_gpt",
        model_kwargs=MODEL,
        data="tests.models:token_data",
        data_kwargs=dict(n_train=batch * steps, n_val=batch, seq_len=MODEL["seq_len"], vocab=MODEL["vocab_size"]),
        batch_size=batch,
        max_steps=steps,
        devices=devices,
        strategy={**strategy, "activation_checkpointing": mode, "compile": compile},
        record_params=False,
        trainer=dict(num_sanity_val_steps=0, limit_val_batches=1),
        callbacks=["benchmarks.memory:MemoryProbe"],
    )


def measure(layout: str, mode: str, compile: bool, steps: int) -> dict:
    """Per-rank peaks in MiB above the RSS after imports, and rank 0's step times."""
    import torch

    from lightning_parallel import parity

    with tempfile.TemporaryDirectory(prefix="lp-ac-memory-") as tmp:
        out = Path(tmp, "record.pt")
        proc = parity.run_processes(spec_for(layout, mode, compile, steps), out, [str(REPO)], timeout=900)
        if proc.returncode != 0 or not out.exists():
            raise RuntimeError(f"{layout} {mode} failed (exit {proc.returncode}):\n{proc.stderr[-4000:]}")
        record = torch.load(out, weights_only=False)
    base, figures = record["rss_after_imports"], record["memory"]
    return {
        "train": [(f["train_hwm"] - b) / MIB for f, b in zip(figures, base)],
        "live": [(f["live_peak"] - f["live_start"]) / MIB for f in figures],
        # After the first step, which also compiles and sets up pipeline schedules.
        "step": statistics.median(figures[0]["step_seconds"][1:] or figures[0]["step_seconds"]),
    }


def row(layout: str, mode: str, compile: bool, result: dict, baseline: dict) -> str:
    return "| " + " | ".join([
        f"`{layout}`", mode, "yes" if compile else "no",
        spread(result["train"]), spread(result["live"]),
        f"{max(result['live']) / max(baseline['live']):.2f}",
        f"{result['step']:.2f}", f"{result['step'] / baseline['step']:.2f}",
    ]) + " |"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--layouts", default=",".join(LAYOUTS), help=f"comma-separated, from {', '.join(LAYOUTS)}")
    parser.add_argument("--steps", type=int, default=4, help="optimizer steps per run")
    parser.add_argument("--no-compile", action="store_true", help="skip the compile=True runs (of the first layout)")
    parser.add_argument("--out", default=str(REPO / "docs" / "activation_checkpointing.md"))
    args = parser.parse_args()
    layouts = [name.strip() for name in args.layouts.split(",") if name.strip()]
    if unknown := [name for name in layouts if name not in LAYOUTS]:
        parser.error(f"unknown layout(s) {unknown}; choose from {', '.join(LAYOUTS)}")

    runs = [(layout, mode, False) for layout in layouts for mode in MODES]
    if not args.no_compile:
        runs += [(layouts[0], mode, True) for mode in MODES]
    header = ("| layout | activation checkpointing | compile | training peak (MiB) | live peak (MiB) "
              "| live peak / none's | step (s) | step / none's |")
    rule = "|---|---|---|---|---|---|---|---|"
    print(header + "\n" + rule, flush=True)
    rows, baselines, start = [], {}, time.perf_counter()
    for layout, mode, compile in runs:
        result = measure(layout, mode, compile, args.steps)
        baseline = baselines.setdefault((layout, compile), result)  # the "none" run comes first
        rows.append(row(layout, mode, compile, result, baseline))
        print(rows[-1], flush=True)
    minutes = (time.perf_counter() - start) / 60
    write_doc(Path(args.out), header, rule, rows, args.steps, minutes)
    print(f"wrote {args.out}")


BEGIN, END = "<!-- activation_memory.py: begin -->", "<!-- activation_memory.py: end -->"


def write_doc(out: Path, header: str, rule: str, rows: list[str], steps: int, minutes: float) -> None:
    """Replaces the measured section of `out` (between BEGIN and END), keeping the rest."""
    import torch

    from tests.models import tiny_gpt

    with torch.device("meta"):
        params = sum(p.numel() for p in tiny_gpt(**MODEL).parameters())
    section = "\n".join([
        BEGIN,
        f"Measured {datetime.date.today().isoformat()} on {machine()}.",
        f"Run: `.venv/bin/python benchmarks/activation_memory.py` ({minutes:.0f} min; `--layouts`, `--steps`, "
        "`--no-compile`, `--out` choose what runs).",
        "",
        f"`tests.models:tiny_gpt({', '.join(f'{k}={v}' for k, v in MODEL.items())})`: {params / 1e6:.2f}M parameters; "
        f"AdamW; {BATCH_PER_RANK} sequences per data-parallel rank and step, {steps} optimizer steps; `pp2` runs 1F1B "
        "with 4 micro-batches, `dp2_full` shards with FSDP2. Per rank (ranges over ranks), in MiB above the rank's "
        "resident memory after imports: the training peak is the resident peak up to the end of training, the live "
        "peak the sampled peak of bytes glibc's malloc had handed out (live tensors and other heap objects), which "
        "freed memory the allocator keeps does not blur. Step times are rank 0's median after the first step; the "
        "ratios compare each row with the layout's `none` row (compiled rows with the compiled `none`).",
        "",
        header,
        rule,
        *rows,
        END,
    ])
    text = out.read_text() if out.exists() else f"# Activation checkpointing\n\n{BEGIN}\n{END}\n"
    if BEGIN not in text or END not in text:
        raise SystemExit(f"{out} lacks the markers {BEGIN} and {END} around the measured section.")
    head, rest = text.split(BEGIN, 1)
    out.write_text(head + section + rest.split(END, 1)[1])


if __name__ == "__main__":
    main()
