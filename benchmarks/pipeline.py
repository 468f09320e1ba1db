"""Pipeline benchmark: step time per schedule, the bubble against the ideal, and the overhead
of HybridParallel over a plain torch.distributed.pipelining loop of the same model and schedule.

    python benchmarks/pipeline.py                 # all configurations, table to docs/benchmarks.md
    python benchmarks/pipeline.py --quick         # fewer configurations

Each configuration runs in fresh processes under torchrun (both columns, so both get one
intra-op thread per process). A run trains a GPT (examples/gpt.py)
for a few steps and reports the median step time on rank 0 after warm-up. The bubble is
1 - M * t_stage / t_step, where t_stage is the slowest stage's forward+backward time for one
micro-batch measured alone before training; the ideal for gpipe and 1f1b is (P-1)/(M+P-1).
CPU numbers on an oversubscribed 2-core machine are noisy: read them as ratios.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

MODEL = dict(vocab_size=256, seq_len=64, d_model=64, n_heads=4, n_layers=8, lr=1e-3)
BATCH, STEPS, WARMUP = 16, 14, 4


def data():
    import torch
    from torch.utils.data import TensorDataset

    gen = torch.Generator().manual_seed(0)
    x = torch.randint(256, (BATCH * STEPS, MODEL["seq_len"]), generator=gen)
    return TensorDataset(x, torch.roll(x, -1, dims=1))


def even_split(pp: int) -> list[str]:
    per = MODEL["n_layers"] // pp
    return [f"blocks.{per * s}" for s in range(1, pp)]


def stage_time(stage_fn, example, repeats=5) -> float:
    """Seconds of one micro-batch's forward+backward through `stage_fn` alone."""
    import torch

    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        out = stage_fn(example)
        out.float().sum().backward()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def worker_lightning(cfg) -> dict:
    import lightning.pytorch as pl
    import torch
    import torch.distributed as dist
    from torch.utils.data import DataLoader

    from examples.gpt import GPT
    from lightning_parallel import HybridParallel

    pl.seed_everything(0, verbose=False)
    step_times: list[float] = []

    class Timer(pl.Callback):
        def on_train_batch_start(self, trainer, module, batch, batch_idx):
            dist.barrier()
            self.start = time.perf_counter()

        def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx):
            step_times.append(time.perf_counter() - self.start)

    strategy = HybridParallel(pipeline_parallel=cfg["pp"], schedule=cfg["schedule"], micro_batches=cfg["m"],
                              pipeline_split=even_split(cfg["pp"] * cfg["stages_per_rank"]) if cfg["stages_per_rank"] == 1 else "auto")
    trainer = pl.Trainer(accelerator="cpu", devices=cfg["pp"], strategy=strategy, max_steps=STEPS, logger=False,
                         enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                         num_sanity_val_steps=0, callbacks=[Timer()])
    trainer.fit(GPT(**MODEL), DataLoader(data(), batch_size=BATCH))
    return {"step": statistics.median(step_times[WARMUP:])}


def worker_plain(cfg) -> dict:
    """The same model, split and schedule with torch.distributed.pipelining alone."""
    import torch
    import torch.distributed as dist
    from torch import nn
    from torch.distributed import pipelining

    from examples.gpt import GPT

    dist.init_process_group("gloo")
    rank, pp, m = dist.get_rank(), cfg["pp"], cfg["m"]
    torch.manual_seed(0)
    gpt = GPT(**MODEL)
    per = MODEL["n_layers"] // pp

    class Stage(nn.Module):
        def __init__(self):
            super().__init__()
            self.blocks = nn.ModuleList(gpt.blocks[rank * per:(rank + 1) * per])
            self.tok_emb, self.pos_emb = (gpt.tok_emb, gpt.pos_emb) if rank == 0 else (None, None)
            self.norm, self.head = (gpt.norm, gpt.head) if rank == pp - 1 else (None, None)

        def forward(self, x):
            if self.tok_emb is not None:
                x = self.tok_emb(x) + self.pos_emb(torch.arange(x.shape[1]))
            for block in self.blocks:
                x = block(x)
            return self.head(self.norm(x)) if self.head is not None else x

    stage_module = Stage()
    example = (torch.randint(256, (BATCH // m, MODEL["seq_len"])) if rank == 0
               else torch.randn(BATCH // m, MODEL["seq_len"], MODEL["d_model"], requires_grad=True))
    t_stage = torch.tensor(stage_time(stage_module, example))
    stage_module.zero_grad(set_to_none=True)
    dist.all_reduce(t_stage, op=dist.ReduceOp.MAX)

    def loss_fn(logits, y):
        return nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), y.reshape(-1))

    stage = pipelining.PipelineStage(stage_module, rank, pp, torch.device("cpu"))
    schedule = getattr(pipelining, {"gpipe": "ScheduleGPipe", "1f1b": "Schedule1F1B"}[cfg["schedule"]])(stage, m, loss_fn=loss_fn)
    optimizer = torch.optim.AdamW(stage_module.parameters(), lr=1e-3)
    dataset = data()
    times = []
    for step in range(STEPS):
        x, y = dataset.tensors[0][step * BATCH:(step + 1) * BATCH], dataset.tensors[1][step * BATCH:(step + 1) * BATCH]
        dist.barrier()
        start = time.perf_counter()
        optimizer.zero_grad()
        if rank == 0:
            schedule.step(x)
        elif rank == pp - 1:
            schedule.step(target=y)
        else:
            schedule.step()
        optimizer.step()
        times.append(time.perf_counter() - start)
    dist.barrier()
    dist.destroy_process_group()
    return {"step": statistics.median(times[WARMUP:]), "t_stage": t_stage.item()}


def launch(cfg) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp, "result.json")
        env = {**os.environ, "PYTHONPATH": str(REPO), "LP_BENCH_OUT": str(out)}
        # torchrun for both, so both get the same thread settings (one intra-op thread per process).
        cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={cfg['pp']}", __file__,
               "--worker", json.dumps(cfg)]
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=900)
        if not out.exists():
            raise RuntimeError(f"{cfg} failed:\n{proc.stderr[-3000:]}")
        return json.loads(out.read_text())


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--worker")
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--out", default=str(REPO / "docs" / "benchmarks.md"))
    args = parser.parse_args()
    if args.worker:
        cfg = json.loads(args.worker)
        result = (worker_lightning if cfg["mode"] == "lightning" else worker_plain)(cfg)
        if int(os.environ.get("RANK", os.environ.get("LOCAL_RANK", "0"))) == 0 and os.environ.get("LP_BENCH_OUT"):
            Path(os.environ["LP_BENCH_OUT"]).write_text(json.dumps(result))
        return

    from lightning_parallel.pipeline.schedules import SCHEDULES

    rows = []
    grid = [(2, 2), (2, 4), (2, 8), (4, 4), (4, 8)] if not args.quick else [(2, 4)]
    for pp, m in grid:
        for schedule in ("gpipe", "1f1b"):
            plain = launch({"mode": "plain", "pp": pp, "m": m, "schedule": schedule})
            ours = launch({"mode": "lightning", "pp": pp, "m": m, "schedule": schedule, "stages_per_rank": 1})
            ideal = (pp - 1) / (m + pp - 1)
            bubble = 1 - m * plain["t_stage"] / plain["step"]
            rows.append(f"| {schedule} | {pp} | {m} | {ours['step'] * 1e3:.0f} | {plain['step'] * 1e3:.0f} | "
                        f"{ours['step'] / plain['step']:.2f} | {bubble:.2f} | {ideal:.2f} |")
            print(rows[-1], flush=True)
    others = [] if args.quick else [name for name in SCHEDULES if name not in ("gpipe", "1f1b")]
    other_rows = []
    for schedule in others:
        ours = launch({"mode": "lightning", "pp": 2, "m": 4, "schedule": schedule, "stages_per_rank": SCHEDULES[schedule].stages_per_rank})
        other_rows.append(f"| {schedule} | 2 | 4 | {ours['step'] * 1e3:.0f} |")
        print(other_rows[-1], flush=True)

    text = [
        "# Pipeline benchmark",
        "",
        f"`python benchmarks/pipeline.py` on this machine ({os.cpu_count()} cores, CPU, gloo); a GPT of "
        f"{MODEL['n_layers']} blocks (d_model {MODEL['d_model']}, sequence {MODEL['seq_len']}), global batch {BATCH}, "
        f"median step time of steps {WARMUP + 1}-{STEPS}. Stages split evenly by layer count in both columns.",
        "",
        "| schedule | P | M | HybridParallel step (ms) | plain pipelining step (ms) | overhead ratio | measured bubble | ideal bubble (P-1)/(M+P-1) |",
        "|---|---|---|---|---|---|---|---|",
        *rows,
    ]
    if other_rows:
        text += ["", "Multi-stage schedules (two stages per rank, split by measured cost):", "",
                 "| schedule | P | M | HybridParallel step (ms) |", "|---|---|---|---|", *other_rows]
    Path(args.out).parent.mkdir(exist_ok=True)
    Path(args.out).write_text("\n".join(text) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
