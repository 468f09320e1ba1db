"""Resident memory per rank while a ~100M-parameter GPT trains, against each rank's ideal share.

    python benchmarks/memory.py                          # every layout, 2 steps, table to docs/memory.md
    python benchmarks/memory.py --layouts one,pp2 --steps 3 --out /tmp/memory.md
    python benchmarks/memory.py --mmap-threshold 0       # glibc's default allocator settings only

The model is tests.models:large_gpt (about 100M parameters, 400 MB in fp32), trained with AdamW on
random tokens (global batch 8, sequence 32) through the parity harness (lightning_parallel/parity.py):
fresh processes started as users start them, one process with no strategy and the model built as
it is, or a HybridParallel layout with the model built empty (`trainer.init_module(empty_init=True)`).
Per rank, above the resident memory after imports:
- setup: the peak up to `on_fit_start` (building the model, splitting, sharding, allocating);
- training: the peak up to `on_train_end` (`--steps` optimizer steps);
- live: the peak of what glibc's malloc had handed out and not taken back (`mallinfo2`, sampled
  every 2 ms), which is live tensors and other heap objects: the difference to the resident peak is
  freed memory the allocator kept;
- ideal: 16 bytes (fp32 parameter, gradient, AdamW's two moments) per parameter element the rank
  holds (`elements_held`), activations not counted.
Each layout runs twice: with glibc's default allocator settings, and with a fixed mmap threshold
(`MALLOC_MMAP_THRESHOLD_`, `--mmap-threshold` bytes; 0 skips that run): tensors above it get
their own mapping, returned to the system when freed, instead of heap space glibc keeps.
"""

from __future__ import annotations

import argparse
import ctypes
import datetime
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

MIB = 2**20
BATCH, SEQ_LEN, VOCAB = 8, 32, 8192

# name -> (HybridParallel arguments or None for one process, processes)
LAYOUTS = {
    "one": (None, 1),
    "dp2_full": (dict(data_parallel=2, sharding="full"), 2),
    "dp4_full": (dict(data_parallel=4, sharding="full"), 4),
    # HSDP: 2 replicas of 2 shards each.
    "dp4_hybrid": (dict(data_parallel=4, sharding="hybrid", data_parallel_shard=2), 4),
    "tp2": (dict(tensor_parallel=2, data_parallel=1), 2),
    "pp2": (dict(pipeline_parallel=2, data_parallel=1), 2),
    "pp2_tp2": (dict(pipeline_parallel=2, tensor_parallel=2, data_parallel=1), 4),
    "pp2_tp2_dp2_full": (dict(pipeline_parallel=2, tensor_parallel=2, data_parallel=2, sharding="full"), 8),
    # The same, each block gathered and its gradients reduce-scattered for every micro-batch.
    "pp2_tp2_dp2_full_rpmb": (dict(pipeline_parallel=2, tensor_parallel=2, data_parallel=2, sharding="full",
                                   reshard_per_micro_batch=True), 8),
}


# ---------------------------------------------------------------------------- in the workers


def _mallinfo():
    """glibc's malloc counters, or None elsewhere."""
    try:
        libc = ctypes.CDLL("libc.so.6")
        fields = "arena ordblks smblks hblks hblkhd usmblks fsmblks uordblks fordblks keepcost".split()
        info = type("MallInfo2", (ctypes.Structure,), {"_fields_": [(n, ctypes.c_size_t) for n in fields]})
        libc.mallinfo2.restype = info
        return libc.mallinfo2
    except (OSError, AttributeError):
        return None


def _rss() -> int:
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _hwm() -> int:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith("VmHWM"):
                return int(line.split()[1]) * 1024
    return 0


class MemoryProbe:
    """A Lightning callback (named in the parity spec, built before the Trainer): the resident
    peak at the end of setup and of training, and the sampled peak of malloc's live bytes; every
    rank's figures land in rank 0's record."""

    def __new__(cls):
        import lightning.pytorch as pl

        class Probe(pl.Callback):
            def __init__(self):
                self.record = {}
                self.figures = {"rss_start": _rss()}
                self._mallinfo = _mallinfo()
                if self._mallinfo is not None:
                    self.figures["live_start"] = self._live()
                    self.figures["live_peak"] = self.figures["live_start"]
                    threading.Thread(target=self._sample, daemon=True).start()

            def _live(self) -> int:
                info = self._mallinfo()
                return info.uordblks + info.hblkhd

            def _sample(self):
                while True:
                    self.figures["live_peak"] = max(self.figures["live_peak"], self._live())
                    time.sleep(0.002)

            def on_fit_start(self, trainer, module):
                self.figures["setup_hwm"] = _hwm()
                if self._mallinfo is not None:
                    self.figures["setup_live_peak"] = self.figures["live_peak"]

            def on_train_batch_start(self, trainer, module, batch, batch_idx):
                self._start = time.perf_counter()

            def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx):
                self.figures.setdefault("step_seconds", []).append(time.perf_counter() - self._start)

            def on_train_end(self, trainer, module):
                import torch.distributed as dist

                self.figures["train_hwm"] = _hwm()
                figures = [self.figures]
                if dist.is_initialized():
                    figures = [None] * dist.get_world_size()
                    dist.all_gather_object(figures, dict(self.figures))
                self.record["memory"] = figures

        return Probe()


# ---------------------------------------------------------------------------- the driver


def spec_for(layout: str, steps: int) -> dict:
    from tests.models import GPT_PLAN

    strategy, devices = LAYOUTS[layout]
    if strategy is not None:
        strategy = {**strategy, "tensor_plan": GPT_PLAN} if strategy.get("tensor_parallel", 1) > 1 else dict(strategy)
    return dict(
        model="tests.models:large_gpt",
        data="tests.models:token_data",
        data_kwargs=dict(n_train=BATCH * steps, n_val=BATCH, seq_len=SEQ_LEN, vocab=VOCAB),
        batch_size=BATCH,
        val_batch_size=BATCH,
        max_steps=steps,
        devices=devices,
        strategy=strategy,
        build="init" if strategy is None else "empty",
        record_params=False,
        trainer=dict(num_sanity_val_steps=0, limit_val_batches=1),
        callbacks=["benchmarks.memory:MemoryProbe"],
    )


def measure(layout: str, steps: int, mmap_threshold: int | None) -> dict:
    """Runs `layout` in fresh processes; per-rank figures in MiB above the RSS after imports."""
    import torch

    from lightning_parallel import parity

    saved = os.environ.get("MALLOC_MMAP_THRESHOLD_")
    if mmap_threshold:
        os.environ["MALLOC_MMAP_THRESHOLD_"] = str(mmap_threshold)  # read by glibc when each process starts
    else:
        os.environ.pop("MALLOC_MMAP_THRESHOLD_", None)
    try:
        with tempfile.TemporaryDirectory(prefix="lp-memory-") as tmp:
            out = Path(tmp, "record.pt")
            start = time.perf_counter()
            proc = parity.run_processes(spec_for(layout, steps), out, [str(REPO)], timeout=900)
            seconds = time.perf_counter() - start
            if proc.returncode != 0 or not out.exists():
                raise RuntimeError(f"{layout} failed (exit {proc.returncode}):\n{proc.stderr[-4000:]}")
            record = torch.load(out, weights_only=False)
    finally:
        if saved is None:
            os.environ.pop("MALLOC_MMAP_THRESHOLD_", None)
        else:
            os.environ["MALLOC_MMAP_THRESHOLD_"] = saved

    base = record["rss_after_imports"]
    figures = record["memory"]
    result = {
        "processes": len(base),
        "seconds": seconds,
        "held": record["elements_held"],
        "ideal": [16 * n / MIB for n in record["elements_held"]],
        "setup": [(f["setup_hwm"] - b) / MIB for f, b in zip(figures, base)],
        "train": [(f["train_hwm"] - b) / MIB for f, b in zip(figures, base)],
        # Rank 0's steps after the first (which also sets up the pipeline schedules).
        "step_seconds": figures[0]["step_seconds"][1:] or figures[0]["step_seconds"],
    }
    if "live_peak" in figures[0]:
        # Live bytes count from the probe's start (after imports) on: malloc's count then is
        # mostly the imported libraries' heap, which the RSS after imports includes too.
        result["live"] = [(f["live_peak"] - f["live_start"]) / MIB for f in figures]
    return result


def spread(values, fmt="{:.0f}") -> str:
    low, high = min(values), max(values)
    return fmt.format(high) if round(low) == round(high) else f"{fmt.format(low)}-{fmt.format(high)}"


def row(layout: str, default: dict, fixed: dict | None) -> str:
    ideal = max(default["ideal"])
    cells = [
        f"`{layout}`",
        str(default["processes"]),
        f"{max(default['held']) / 1e6:.1f}",
        f"{ideal:.0f}",
        spread(default["setup"]),
        spread(default["train"]),
        spread(default["live"]) if "live" in default else "-",
        f"{max(default['train']) / ideal:.1f}",
        f"{statistics.median(default['step_seconds']):.1f}",
    ]
    if fixed is not None:
        cells += [spread(fixed["train"]), f"{max(fixed['train']) / ideal:.1f}", f"{statistics.median(fixed['step_seconds']):.1f}"]
    return "| " + " | ".join(cells) + " |"


def machine() -> str:
    cpu = next((line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name")), platform.processor())
    mem = next((int(line.split()[1]) for line in open("/proc/meminfo") if line.startswith("MemTotal")), 0) / 2**20
    import lightning
    import torch

    return (f"{os.cpu_count()} cores ({cpu}), {mem:.0f} GiB, no GPU, gloo; Python {platform.python_version()}, "
            f"torch {torch.__version__}, lightning {lightning.__version__}, glibc {platform.libc_ver()[1]}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--layouts", default=",".join(LAYOUTS), help=f"comma-separated, from {', '.join(LAYOUTS)}")
    parser.add_argument("--steps", type=int, default=2, help="optimizer steps per run")
    parser.add_argument("--mmap-threshold", type=int, default=128 * 1024,
                        help="bytes for the second run's MALLOC_MMAP_THRESHOLD_; 0: no second run")
    parser.add_argument("--out", default=str(REPO / "docs" / "memory.md"))
    args = parser.parse_args()
    layouts = [name.strip() for name in args.layouts.split(",") if name.strip()]
    unknown = [name for name in layouts if name not in LAYOUTS]
    if unknown:
        parser.error(f"unknown layout(s) {unknown}; choose from {', '.join(LAYOUTS)}")
    if args.steps < 1:
        parser.error("--steps must be at least 1")

    import torch

    from tests.models import LARGE_GPT, large_gpt

    with torch.device("meta"):
        params = sum(p.numel() for p in large_gpt().parameters())
    header = ["| layout | processes | parameters held (M, max rank) | ideal (MiB) | setup peak (MiB) "
              "| training peak (MiB) | live peak (MiB) | training peak / ideal | step (s) |"]
    rule = "|---|---|---|---|---|---|---|---|---|"
    if args.mmap_threshold:
        header[0] += f" training peak, mmap threshold {args.mmap_threshold // 1024} KiB (MiB) | its peak / ideal | its step (s) |"
        rule += "---|---|---|"
    rows, total_start = [], time.perf_counter()
    print(header[0] + "\n" + rule, flush=True)
    for layout in layouts:
        default = measure(layout, args.steps, None)
        fixed = measure(layout, args.steps, args.mmap_threshold) if args.mmap_threshold else None
        rows.append(row(layout, default, fixed))
        print(rows[-1], f"({default['seconds']:.0f}s" + (f" + {fixed['seconds']:.0f}s)" if fixed else ")"), flush=True)
    minutes = (time.perf_counter() - total_start) / 60

    fp32 = params * 4 / MIB
    text = [
        "# Memory per rank (benchmarks/memory.py)",
        "",
        f"Measured {datetime.date.today().isoformat()} on {machine()}.",
        f"Run: `.venv/bin/python benchmarks/memory.py` ({minutes:.0f} min; `--layouts`, `--steps`, "
        "`--mmap-threshold`, `--out` choose what runs).",
        "",
        f"`tests.models:large_gpt` ({', '.join(f'{k}={v}' for k, v in LARGE_GPT.items())}): "
        f"{params / 1e6:.1f}M parameters, {fp32:.0f} MiB in fp32; AdamW; global batch {BATCH}, sequence {SEQ_LEN}, "
        f"{args.steps} optimizer steps. One process builds the model as it is, with no strategy; every HybridParallel "
        "layout builds it empty (`trainer.init_module(empty_init=True)`); the pipeline layouts run 1F1B with 4 "
        "micro-batches, `_full` shards with FSDP2, `_rpmb` adds `reshard_per_micro_batch=True` (each block "
        "gathered and its gradients reduce-scattered for every micro-batch instead of once per step).",
        "",
        "All figures are per rank, in MiB above the rank's resident memory after imports (ranges over ranks):",
        "setup is the peak up to `on_fit_start`, training the peak up to `on_train_end`; live is the sampled peak "
        "of bytes glibc's malloc had handed out (live tensors and other heap objects); ideal is 16 bytes "
        "(parameter, gradient, two AdamW moments in fp32) per parameter element the rank holds, activations "
        "not counted.",
        "",
        *header,
        rule,
        *rows,
        "",
    ]
    if args.mmap_threshold:
        text += [
            f"The last three columns rerun each layout with `MALLOC_MMAP_THRESHOLD_={args.mmap_threshold}` in the "
            "environment: glibc then gives every allocation above that size its own mapping and unmaps it when "
            "freed. By default the threshold rises (up to 32 MiB) each time a mapped block is freed, so later "
            "tensors come from heap space that glibc keeps once they are freed.",
            "",
        ]
    text += [
        "Reading the table:",
        "",
        "- The gap between the training peak and the live peak is freed memory glibc keeps. With the default "
        "settings it keeps growing after the first steps (`--steps 16` shows where it levels off), so a short run "
        "understates it. A fixed mmap threshold removes most of it at a cost in step time: every freed tensor's "
        "pages go back to the kernel and the next allocation faults in fresh zeroed pages.",
        "- Pipeline stages sharded with FSDP2: torch's `PipelineStage` keeps every block's parameters gathered "
        "over dp and its gradients unsharded from a micro-batch's backward to the end of the step "
        "(`backward_maybe_with_nosync` in torch/distributed/pipelining/stage.py), about twice the stage's "
        "dp-gathered parameters on top of the rank's share. `_rpmb` gives that back for more all-gathers and "
        "reduce-scatters.",
        "- Without a pipeline, Lightning zeroes the gradients after `training_step`, so one step's gradients are "
        "still held during the next step's forward; the optimizer state is allocated in the first step.",
        "- Step times are rank 0's median after the first step, on a 2-core machine shared by all the ranks (and "
        "by whatever else runs): compare them within a row.",
        "",
    ]
    Path(args.out).parent.mkdir(exist_ok=True)
    Path(args.out).write_text("\n".join(text))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
