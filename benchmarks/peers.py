"""HybridParallel against its peers: the same user-written module, the same global batch, the
same optimizer and precision, timed side by side.

    python benchmarks/peers.py                 # every comparison, 5 pairs each: docs/peers.md + results/peers.json
    python benchmarks/peers.py --only dp       # one comparison (dp, tp, pp, hsdp); merges into the results
    python benchmarks/peers.py --quick         # 3 pairs of short runs

Comparisons (s/step, ours / theirs):
  dp    HybridParallel(data_parallel=2, sharding="none")            vs Lightning DDPStrategy, 2 processes
  tp    HybridParallel(dp=2, tp=2, sharding="full", hand plan)      vs Lightning ModelParallelStrategy(2, 2) with the
                                                                       same plan written in configure_model, 4 processes
  pp    HybridParallel(pipeline_parallel=2, "1f1b", 4 micro-batches) vs a plain torch.distributed.pipelining loop
                                                                       (PipelineStage + Schedule1F1B + AdamW), 2 processes
  hsdp  HybridParallel(sharding="hybrid", data_parallel_shard=2)    vs HybridParallel(sharding="full"), 4 processes

Every run is a fresh set of processes started by torchrun (OMP_NUM_THREADS=1, as Lightning's
launcher would set on this machine too; each worker records torch.get_num_threads() and the
benchmark refuses a comparison whose sides differ). A run trains WARMUP + STEPS steps; the time
is the wall clock from the start of step WARMUP to the end of the last step (a barrier at each
end, none in between) divided by STEPS, the largest over the ranks. Runs alternate
ours, theirs, theirs, ours, ... and the ratio is the median of the per-pair ratios (range too).
Lightning runs have no progress bar, logger, checkpointing, model summary or sanity validation;
the module logs its loss with sync_dist=True as written, on every Lightning side alike.

Profiling: `--profile DIR` records the timed steps with torch.profiler on every rank (tables in
DIR); `--cprofile DIR` records them with cProfile on every rank. Profiled runs are not timed runs.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
# Workers import lightning_parallel and tests/ from a snapshot of the code taken when the benchmark
# starts (LP_PEERS_CODE), so that edits made while it runs cannot mix two states in one table.
sys.path.insert(0, os.environ.get("LP_PEERS_CODE", str(REPO)))
SNAPSHOT_DIRS = ("lightning_parallel", "tests", "examples")

# A TinyLlama-shaped decoder as a user writes it (tests/user_models.py:LlamaStyle: hand-written
# RMSNorm and SwiGLU, the position table a bare parameter on the LightningModule). About 0.35 s
# for one process's forward, backward and AdamW step on a batch of 8 with one thread here.
MODEL = dict(n_layers=6, d_model=256, vocab=2048, seq_len=128, n_heads=8, lr=1e-3)
GLOBAL_BATCH = 16
MICRO_BATCHES = 4
WARMUP, STEPS = 3, 10
QUICK_WARMUP, QUICK_STEPS = 2, 5

# The tensor plan, as HybridParallel style names; the ModelParallelStrategy side writes the same
# DTensor styles by hand in configure_model (TPLlama below).
TP_PLAN = {
    "tok": "embedding_rowwise",
    "blocks.*.attention.wq": "colwise",
    "blocks.*.attention.wk": "colwise",
    "blocks.*.attention.wv": "colwise",
    "blocks.*.attention.wo": "rowwise",
    "blocks.*.feed_forward.w1": "colwise",
    "blocks.*.feed_forward.w3": "colwise",
    "blocks.*.feed_forward.w2": "rowwise",
    "head": "colwise_gather_output",
}

COMPARISONS = {
    "dp": dict(
        procs=2,
        title="dp=2 (sharding none) vs Lightning DDPStrategy",
        ours=dict(kind="hybrid", strategy=dict(data_parallel=2, sharding="none"), dp=2),
        theirs=dict(kind="ddp", dp=2),
    ),
    "tp": dict(
        procs=4,
        title="dp=2 x tp=2 (sharding full) vs Lightning ModelParallelStrategy, same plan by hand",
        ours=dict(kind="hybrid", strategy=dict(data_parallel=2, tensor_parallel=2, sharding="full", tensor_plan=TP_PLAN), dp=2),
        theirs=dict(kind="model_parallel", dp=2, tp=2),
    ),
    "pp": dict(
        procs=2,
        title="pp=2, 1f1b, 4 micro-batches vs plain torch.distributed.pipelining loop",
        ours=dict(kind="hybrid", strategy=dict(pipeline_parallel=2, schedule="1f1b", micro_batches=MICRO_BATCHES), dp=1),
        theirs=dict(kind="plain_pp", pp=2),
    ),
    "hsdp": dict(
        procs=4,
        title="dp=4 sharding hybrid (2 shards x 2 replicas) vs sharding full (ours vs ours)",
        ours=dict(kind="hybrid", strategy=dict(data_parallel=4, sharding="hybrid", data_parallel_shard=2), dp=4),
        theirs=dict(kind="hybrid", strategy=dict(data_parallel=4, sharding="full"), dp=4),
    ),
}


# What the ratios were made of when they were measured (profiles and trial fixes, 2026-11-24, commit
# 2aae1d2 / its parent's working tree); written to the doc under the table.
NOTES = [
    "## What the ratios are made of (measured 2026-11-24)",
    "",
    "Profiles (`--cprofile DIR`, `--profile DIR`) of both sides, and trial fixes measured with `--code DIR` on a "
    "private copy of the package:",
    "",
    "- **dp, about +44 ms/step (ratio 1.10).** `sharding=\"none\"` is FSDP2 on a (replicate=2, shard=1) mesh. On CPU, "
    "FSDP2 issues each unit's gradient all-reduce synchronously (`dist.all_reduce` in `foreach_reduce`; no side "
    "stream to overlap it on), once per unit (6 blocks + root = 7 per step): 40 ms/step in post-backward hooks, 33 "
    "of them waiting on gloo, where DDP reduces 2 buckets asynchronously during the backward (5 ms/step of waits, "
    "the loss log's all-reduce included). Wrapping the root only (one unit) under `sharding=\"none\"`: 0.474 -> "
    "0.447 s/step, ratio 1.03 (1.03-1.06, 3 pairs). torch DDP instead of FSDP2 for `sharding=\"none\"` without tensor "
    "parallelism: ratio 1.01 (0.98-1.01, 3 pairs). Of the remaining 17 ms, DTensor parameters cost AdamW 2.4 ms/step "
    "(20.3 -> 22.7 ms, measured alone); the rest is FSDP2's copy-in/copy-out around the one-rank all-gather and "
    "reduce-scatter, and its root all-reduce, which is not overlapped either.",
    "- **tp, no gap (0.97-1.00).** Both sides are the same DTensor plan and FSDP2 units. Threads: one per process on "
    "both sides, under torchrun and under Lightning's launcher alike (it sets OMP_NUM_THREADS to cores/processes).",
    "- **pp, +10-20 ms/step (ratio 1.02-1.04 over three 5-pair runs of the same code).** The per-step `.item()` and "
    "`broadcast_object_list` of the runner before commit 49fc846 cost about 5 ms/step (that runner measured "
    "1.040 in the same session as 1.024 for the current one). What remains is on the critical path of a "
    "last-stage-bound pipeline: the last stage's forward, loss and backward take +6 ms/step (433 against 427 ms; "
    "the user's training_step per micro-batch, the stage's interpreted forward), and the first stage's work "
    "outside the schedule +5.8 ms/step (6.4 against 0.6 ms: Lightning's loop with its per-step SIGTERM broadcast, "
    "the runner's capture of the model call, the shared loss and logs). The plain loop pays 2.2 ms/step "
    "merging outputs (`schedule.step` returns them by default) that the runner skips.",
    "- **hsdp, no gap (0.98-1.00):** on one machine, reduce-scatter within pairs plus an all-reduce across them costs "
    "what a 4-rank reduce-scatter does.",
]


# ---------------------------------------------------------------------------- data and timing


def token_dataset(n: int):
    import torch
    from torch.utils.data import TensorDataset

    gen = torch.Generator().manual_seed(0)
    x = torch.randint(MODEL["vocab"], (n, MODEL["seq_len"] + 1), generator=gen)
    return TensorDataset(x[:, :-1].contiguous(), x[:, 1:].contiguous())


class WindowTimer:
    """Wall clock of steps [warmup, warmup + steps): a barrier at the window's two ends only.
    Also each step's own time (no barrier) and, optionally, a profiler over the window."""

    def __init__(self, warmup: int, steps: int, profile: str | None, cprofile: str | None, label: str):
        self.warmup, self.steps = warmup, steps
        self.profile, self.cprofile, self.label = profile, cprofile, label
        self.step_times: list[float] = []
        self.t0 = self.t1 = None
        self.threads = None
        self._prof = None

    def start(self, index: int) -> None:
        import torch
        import torch.distributed as dist

        if index == self.warmup:
            self.threads = torch.get_num_threads()
            dist.barrier()
            self._start_profilers()
            self.t0 = time.perf_counter()
        self._step_start = time.perf_counter()

    def end(self, index: int) -> None:
        import torch.distributed as dist

        if index >= self.warmup:
            self.step_times.append(time.perf_counter() - self._step_start)
        if index == self.warmup + self.steps - 1:
            dist.barrier()
            self.t1 = time.perf_counter()
            self._stop_profilers()

    def _start_profilers(self) -> None:
        if self.profile:
            from torch.profiler import ProfilerActivity, profile

            self._prof = profile(activities=[ProfilerActivity.CPU], record_shapes=False, with_stack=False)
            self._prof.__enter__()
        if self.cprofile:
            import cProfile

            self._prof = cProfile.Profile()
            self._prof.enable()

    def _stop_profilers(self) -> None:
        import torch.distributed as dist

        rank = dist.get_rank()
        if self.profile and self._prof is not None:
            self._prof.__exit__(None, None, None)
            out = Path(self.profile)
            out.mkdir(parents=True, exist_ok=True)
            table = self._prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=60, max_name_column_width=70)
            (out / f"{self.label}.rank{rank}.txt").write_text(
                f"{self.label} rank {rank}: {self.steps} steps profiled\n{table}\n")
            self._prof.export_chrome_trace(str(out / f"{self.label}.rank{rank}.json"))
        if self.cprofile and self._prof is not None:
            import io
            import pstats

            self._prof.disable()
            out = Path(self.cprofile)
            out.mkdir(parents=True, exist_ok=True)
            self._prof.dump_stats(str(out / f"{self.label}.rank{rank}.prof"))
            buf = io.StringIO()
            pstats.Stats(self._prof, stream=buf).sort_stats("cumulative").print_stats(80)
            (out / f"{self.label}.rank{rank}.txt").write_text(buf.getvalue())

    def result(self) -> dict:
        return {"window": (self.t1 - self.t0) / self.steps, "step_median": statistics.median(self.step_times),
                "threads": self.threads}


# ---------------------------------------------------------------------------- the module


def tp_module_class():
    """LlamaStyle as a user adapts it to ModelParallelStrategy: the same plan, by hand."""
    from torch.distributed.fsdp import fully_shard
    from torch.distributed.tensor import Replicate
    from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel, parallelize_module

    from tests.user_models import LlamaStyle

    class TPLlama(LlamaStyle):
        def configure_model(self):
            if getattr(self, "_parallelized", False):
                return
            tp_mesh, dp_mesh = self.device_mesh["tensor_parallel"], self.device_mesh["data_parallel"]
            plan = {"tok": RowwiseParallel(input_layouts=Replicate()), "head": ColwiseParallel(output_layouts=Replicate())}
            for i in range(len(self.blocks)):
                plan.update({
                    f"blocks.{i}.attention.wq": ColwiseParallel(),
                    f"blocks.{i}.attention.wk": ColwiseParallel(),
                    f"blocks.{i}.attention.wv": ColwiseParallel(),
                    f"blocks.{i}.attention.wo": RowwiseParallel(),
                    f"blocks.{i}.feed_forward.w1": ColwiseParallel(),
                    f"blocks.{i}.feed_forward.w3": ColwiseParallel(),
                    f"blocks.{i}.feed_forward.w2": RowwiseParallel(),
                })
            parallelize_module(self, tp_mesh, plan)
            for block in self.blocks:
                fully_shard(block, mesh=dp_mesh)
            fully_shard(self, mesh=dp_mesh)
            self._parallelized = True

    return TPLlama


# ---------------------------------------------------------------------------- workers


def worker_lightning(cfg) -> dict:
    import lightning.pytorch as pl
    import torch
    from torch.utils.data import DataLoader

    from tests.user_models import LlamaStyle

    pl.seed_everything(0, verbose=False)
    warmup, steps = cfg["warmup"], cfg["steps"]
    timer = WindowTimer(warmup, steps, cfg.get("profile"), cfg.get("cprofile"), cfg["label"])

    class Timer(pl.Callback):
        def on_train_batch_start(self, trainer, module, batch, batch_idx):
            timer.start(batch_idx)

        def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx):
            timer.end(batch_idx)

    kind, procs = cfg["kind"], cfg["procs"]
    model_cls = LlamaStyle
    if kind == "hybrid":
        from lightning_parallel import HybridParallel

        strategy = HybridParallel(**cfg["strategy"])
    elif kind == "ddp":
        from lightning.pytorch.strategies import DDPStrategy

        strategy = DDPStrategy()
    elif kind == "model_parallel":
        from lightning.pytorch.strategies import ModelParallelStrategy

        strategy = ModelParallelStrategy(data_parallel_size=cfg["dp"], tensor_parallel_size=cfg["tp"])
        model_cls = tp_module_class()
    else:
        raise ValueError(kind)
    trainer = pl.Trainer(accelerator="cpu", devices=procs, strategy=strategy, precision="32-true",
                         max_steps=warmup + steps, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                         enable_model_summary=False, num_sanity_val_steps=0, limit_val_batches=0, callbacks=[Timer()])
    loader = DataLoader(token_dataset(GLOBAL_BATCH * (warmup + steps)), batch_size=GLOBAL_BATCH // cfg["dp"], drop_last=True)
    trainer.fit(model_cls(**MODEL), loader)
    result = timer.result()
    if kind == "hybrid":
        import lightning_parallel

        result["package"] = lightning_parallel.__file__
    if kind == "hybrid" and trainer.strategy._pipeline is not None:
        result["owned"] = sorted(trainer.strategy._pipeline.split.owned_names)
    return result


def worker_plain_pp(cfg) -> dict:
    """The same module split by hand into the stages HybridParallel's automatic split picks
    (cfg["split"] blocks on stage 0), run with torch.distributed.pipelining alone."""
    import torch
    import torch.distributed as dist
    import torch.nn.functional as F
    from torch import nn
    from torch.distributed import pipelining

    from tests.user_models import LlamaStyle

    dist.init_process_group("gloo")
    rank, pp = dist.get_rank(), cfg["pp"]
    assert pp == 2
    torch.manual_seed(0)
    full = LlamaStyle(**MODEL)
    k = cfg["split"]

    class First(nn.Module):
        def __init__(self):
            super().__init__()
            self.tok, self.pos, self.blocks = full.tok, full.pos, nn.ModuleList(full.blocks[:k])

        def forward(self, idx):
            x = self.tok(idx) + self.pos[: idx.shape[1]]
            for block in self.blocks:
                x = block(x)
            return x

    class Last(nn.Module):
        def __init__(self):
            super().__init__()
            self.blocks, self.norm, self.head = nn.ModuleList(full.blocks[k:]), full.norm, full.head

        def forward(self, x):
            for block in self.blocks:
                x = block(x)
            return self.head(self.norm(x))

    stage_module = First() if rank == 0 else Last()
    del full

    def loss_fn(logits, targets):
        return F.cross_entropy(logits.view(-1, logits.size(-1)), targets.view(-1))

    stage = pipelining.PipelineStage(stage_module, rank, pp, torch.device("cpu"))
    schedule = pipelining.Schedule1F1B(stage, cfg["micro_batches"], loss_fn=loss_fn)
    optimizer = torch.optim.AdamW(stage_module.parameters(), lr=MODEL["lr"])
    warmup, steps = cfg["warmup"], cfg["steps"]
    data = token_dataset(GLOBAL_BATCH * (warmup + steps))
    timer = WindowTimer(warmup, steps, cfg.get("profile"), cfg.get("cprofile"), cfg["label"])
    for i in range(warmup + steps):
        x, y = data[i * GLOBAL_BATCH:(i + 1) * GLOBAL_BATCH]
        timer.start(i)
        optimizer.zero_grad()
        if rank == 0:
            schedule.step(x)
        else:
            schedule.step(target=y)
        optimizer.step()
        timer.end(i)
    dist.barrier()
    dist.destroy_process_group()
    return timer.result()


def worker(cfg) -> dict:
    return worker_plain_pp(cfg) if cfg["kind"] == "plain_pp" else worker_lightning(cfg)


# ---------------------------------------------------------------------------- launching


def launch(cfg: dict) -> dict:
    """One run in fresh processes; the slowest rank's times."""
    with tempfile.TemporaryDirectory() as tmp:
        code = os.environ.get("LP_PEERS_CODE", str(REPO))
        env = {**os.environ, "PYTHONPATH": code, "LP_PEERS_CODE": code, "LP_PEERS_OUT": tmp, "OMP_NUM_THREADS": "1",
               "PYTHONWARNINGS": "ignore"}
        script = Path(code, "benchmarks", "peers.py")  # the snapshot's copy: editing this file mid-run changes nothing
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={cfg['procs']}",
               str(script if script.exists() else __file__), "--worker", json.dumps(cfg)]
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=900, cwd=REPO)
        ranks = [json.loads(p.read_text()) for p in sorted(Path(tmp).glob("rank*.json"))]
        if proc.returncode != 0 or len(ranks) != cfg["procs"]:
            raise RuntimeError(f"{cfg['label']} failed (exit {proc.returncode}):\n{proc.stderr[-4000:]}")
    for r in ranks:
        if "package" in r and not r["package"].startswith(env["LP_PEERS_CODE"]):
            raise RuntimeError(f"{cfg['label']} imported {r['package']}, not the snapshot in {env['LP_PEERS_CODE']}")
    threads = {r["threads"] for r in ranks}
    if len(threads) != 1:
        raise RuntimeError(f"{cfg['label']}: ranks ran with different thread counts {threads}")
    out = {"s_per_step": max(r["window"] for r in ranks), "step_median": max(r["step_median"] for r in ranks),
           "threads": threads.pop()}
    if "owned" in ranks[0]:
        out["owned"] = [r["owned"] for r in ranks]
    return out


def auto_split_blocks(owned: list[list[str]]) -> int:
    """How many blocks HybridParallel's automatic split put on stage 0."""
    return sum(1 for name in owned[0] if name.startswith("blocks.") and name.count(".") == 1)


def compare(name: str, pairs: int, warmup: int, steps: int, profile=None, cprofile=None, log=print) -> dict:
    spec = COMPARISONS[name]
    common = dict(procs=spec["procs"], warmup=warmup, steps=steps, micro_batches=MICRO_BATCHES, profile=profile,
                  cprofile=cprofile)
    ours_cfg = {**common, **spec["ours"], "label": f"{name}-ours"}
    theirs_cfg = {**common, **spec["theirs"], "label": f"{name}-theirs"}
    if name == "pp":
        # The plain loop uses the stages HybridParallel picks: ask it once (not timed).
        probe = launch({**ours_cfg, "warmup": 0, "steps": 1, "profile": None, "cprofile": None, "label": "pp-probe"})
        theirs_cfg["split"] = auto_split_blocks(probe["owned"])
        log(f"  pp: automatic split puts {theirs_cfg['split']} of {MODEL['n_layers']} blocks on stage 0 "
            f"(stage 0 holds {', '.join(n for n in probe['owned'][0] if n.count('.') == 0)})")
    ours, theirs, ratios = [], [], []
    for i in range(pairs):
        order = ("ours", "theirs") if i % 2 == 0 else ("theirs", "ours")
        got = {}
        for side in order:
            got[side] = launch(ours_cfg if side == "ours" else theirs_cfg)
            log(f"  {name} pair {i + 1}/{pairs} {side:6s}: {got[side]['s_per_step']:.4f} s/step "
                f"(median step {got[side]['step_median']:.4f}, {got[side]['threads']} thread(s)/process)")
        if got["ours"]["threads"] != got["theirs"]["threads"]:
            raise RuntimeError(f"{name}: threads per process differ: {got}")
        ours.append(got["ours"]["s_per_step"])
        theirs.append(got["theirs"]["s_per_step"])
        ratios.append(ours[-1] / theirs[-1])
    return {
        "title": spec["title"], "procs": spec["procs"], "pairs": pairs, "warmup": warmup, "steps": steps,
        "ours": ours, "theirs": theirs, "ratios": ratios,
        "ours_median": statistics.median(ours), "theirs_median": statistics.median(theirs),
        "ratio_median": statistics.median(ratios), "ratio_min": min(ratios), "ratio_max": max(ratios),
        "threads": got["ours"]["threads"], "ours_config": spec["ours"], "theirs_config": spec["theirs"],
        **({"pp_split_blocks_stage0": theirs_cfg["split"]} if name == "pp" else {}),
    }


def git(*args) -> str:
    return subprocess.run(["git", *args], cwd=REPO, capture_output=True, text=True, check=True).stdout


def snapshot_code(dest: Path, source: Path, use: list[str]) -> dict:
    """Copies lightning_parallel/, tests/ and examples/ from `source` (the working tree by default) and this
    script to `dest`,
    then replaces the files named in `use` ("REF:PATH") with their version at git REF. Returns the
    state measured: the commit, the files that differ from it, and a digest of the package."""
    import shutil

    for name in SNAPSHOT_DIRS:
        shutil.copytree(source / name, dest / name, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    (dest / "benchmarks").mkdir()
    shutil.copy(Path(__file__), dest / "benchmarks" / "peers.py")
    for item in use:
        ref, path = item.split(":", 1)
        (dest / path).write_text(git("show", f"{ref}:{path}"))
    head = git("rev-parse", "--short", "HEAD").strip()
    differs, digest = [], hashlib.sha256()
    tracked = set(git("ls-files", "lightning_parallel").split())
    for path in sorted(p.relative_to(dest).as_posix() for p in (dest / "lightning_parallel").rglob("*.py")):
        data = (dest / path).read_bytes()
        digest.update(path.encode() + data)
        if path not in tracked:
            differs.append(path + " (untracked)")
        elif data != subprocess.run(["git", "show", f"HEAD:{path}"], cwd=REPO, capture_output=True).stdout:
            differs.append(path)
    return {"commit": head, "source": str(source), "use": use, "differs_from_commit": differs,
            "package_sha256": digest.hexdigest()[:12]}


def versions() -> dict:
    import lightning
    import torch

    return {"torch": torch.__version__, "lightning": lightning.__version__, "cpus": os.cpu_count()}


def table(results: dict) -> list[str]:
    rows = ["| comparison | processes | ours s/step | theirs s/step | median ratio (ours/theirs) | range | pairs |",
            "|---|---|---|---|---|---|---|"]
    for name in COMPARISONS:
        if name not in results:
            continue
        r = results[name]
        rows.append(f"| {name}: {r['title']} | {r['procs']} | {r['ours_median']:.3f} | {r['theirs_median']:.3f} | "
                    f"{r['ratio_median']:.3f} | {r['ratio_min']:.3f}-{r['ratio_max']:.3f} | {r['pairs']} |")
    return rows


def write_doc(path: Path, results: dict, meta: dict) -> None:
    text = [
        "# HybridParallel against its peers",
        "",
        f"`python benchmarks/peers.py` on this machine ({meta['versions']['cpus']} cores, CPU, gloo, torch "
        f"{meta['versions']['torch']}, lightning {meta['versions']['lightning']}). The module is "
        f"`tests/user_models.py:LlamaStyle` (a TinyLlama-style decoder as a user writes it: {MODEL['n_layers']} blocks, "
        f"d_model {MODEL['d_model']}, {MODEL['n_heads']} heads, vocabulary {MODEL['vocab']}, sequence {MODEL['seq_len']}), "
        f"global batch {GLOBAL_BATCH}, AdamW, fp32, one intra-op thread per process on both sides. "
        "s/step is the wall clock of the timed steps (after warm-up; a barrier at each end of the window only) per "
        "step, the slowest rank's; each pair runs both sides in fresh processes, alternating which goes first; the "
        "ratio is the median of the pairs' ratios.",
        "",
        *table(results),
        "",
        "Peers: `dp` Lightning's `DDPStrategy()` (defaults); `tp` Lightning's `ModelParallelStrategy(data_parallel_size=2, "
        "tensor_parallel_size=2)` with the module's `configure_model` applying the same plan (`parallelize_module`, then "
        "`fully_shard` on each block and on the module); `pp` a torchrun script with the module split by hand into the "
        "stages HybridParallel's automatic split picks, `PipelineStage`, `Schedule1F1B`, AdamW, no Lightning; `hsdp` "
        "HybridParallel's own `sharding=\"full\"`.",
        "",
        "Code measured (per comparison: the commit, and the files of lightning_parallel/ that differed from it):",
        "",
        *[f"- {name}: {results[name]['code_state']['commit']}"
          + (f" + {', '.join(results[name]['code_state']['differs_from_commit'])}" if results[name]['code_state']['differs_from_commit'] else "")
          + f" (package digest {results[name]['code_state']['package_sha256']}), {results[name]['date']}"
          for name in COMPARISONS if name in results],
    ]
    text += ["", *NOTES]
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(text) + "\n")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--worker")
    parser.add_argument("--only", action="append", choices=list(COMPARISONS))
    parser.add_argument("--quick", action="store_true", help="3 pairs of short runs")
    parser.add_argument("--pairs", type=int)
    parser.add_argument("--profile", help="torch.profiler tables of the timed steps into this directory (1 pair)")
    parser.add_argument("--cprofile", help="cProfile of the timed steps into this directory (1 pair)")
    parser.add_argument("--json", default=str(REPO / "benchmarks" / "results" / "peers.json"))
    parser.add_argument("--doc", default=str(REPO / "docs" / "peers.md"))
    parser.add_argument("--no-write", action="store_true")
    parser.add_argument("--doc-only", action="store_true", help="rewrite the doc from the stored results")
    parser.add_argument("--code", default=str(REPO), help="take lightning_parallel/ and tests/ from this tree")
    parser.add_argument("--use", action="append", default=[], metavar="REF:PATH",
                        help="measure PATH as committed at git REF (e.g. HEAD:lightning_parallel/pipeline/runner.py)")
    args = parser.parse_args()
    if args.worker:
        import faulthandler

        # A rank stuck in a collective fails the run (with every thread's stack) instead of hanging.
        faulthandler.dump_traceback_later(float(os.environ.get("LP_PEERS_HANG_S", "300")), exit=True)
        cfg = json.loads(args.worker)
        result = worker(cfg)
        rank = int(os.environ.get("RANK", "0"))
        Path(os.environ["LP_PEERS_OUT"], f"rank{rank}.json").write_text(json.dumps(result))
        return

    if args.doc_only:
        stored = json.loads(Path(args.json).read_text())
        write_doc(Path(args.doc), stored["results"], stored)
        print("\n".join(table(stored["results"])))
        return
    profiling = bool(args.profile or args.cprofile)
    pairs = args.pairs or (1 if profiling else 3 if args.quick else 5)
    warmup, steps = (QUICK_WARMUP, QUICK_STEPS) if args.quick else (WARMUP, STEPS)
    names = args.only or list(COMPARISONS)
    snapshot = tempfile.TemporaryDirectory(prefix="lp-peers-code-")
    state = snapshot_code(Path(snapshot.name), Path(args.code), args.use)
    os.environ["LP_PEERS_CODE"] = snapshot.name
    print(f"code: commit {state['commit']}, differing files {state['differs_from_commit']}, "
          f"package digest {state['package_sha256']}", flush=True)
    results = {}
    for name in names:
        print(f"{name}: {COMPARISONS[name]['title']}", flush=True)
        results[name] = compare(name, pairs, warmup, steps, args.profile, args.cprofile,
                                log=lambda line: print(line, flush=True))
    print()
    print("\n".join(table(results)))
    if profiling or args.no_write:
        return
    json_path = Path(args.json)
    stored = json.loads(json_path.read_text()) if json_path.exists() else {}
    merged = {**stored.get("results", {}), **results}
    meta = {"versions": versions(), "date": time.strftime("%Y-%m-%d %H:%M"),
            "model": MODEL, "global_batch": GLOBAL_BATCH, "micro_batches": MICRO_BATCHES,
            }
    for name in results:
        results[name]["code_state"] = state
        results[name]["date"] = meta["date"]
    json_path.parent.mkdir(parents=True, exist_ok=True)
    json_path.write_text(json.dumps({**meta, "results": merged}, indent=1) + "\n")
    write_doc(Path(args.doc), merged, meta)
    print(f"wrote {json_path} and {args.doc}")


if __name__ == "__main__":
    main()
