"""Expert parallelism against experts sharded only by FSDP2: step time and memory per rank.

    python benchmarks/expert_parallel.py                    # 3 pairs per model: docs/expert_parallel.md
    python benchmarks/expert_parallel.py --pairs 1 --steps 4 --no-write
    python benchmarks/expert_parallel.py --doc-only         # the doc again from benchmarks/results/expert_parallel.json

The same mixture-of-experts model, global batch, AdamW and fp32 on 2 CPU processes (gloo), both
fully sharded over the 2 data-parallel ranks:
  ep2  HybridParallel(data_parallel=2, expert_parallel=2, sharding="full"): each rank keeps half of
       every layer's experts and sends each token to them (two all-to-alls per MoE layer and pass)
  dp2  HybridParallel(data_parallel=2, sharding="full"): the experts are FSDP2-sharded too, but
       every rank gathers all of a layer's experts for its forward and backward and computes its
       own tokens with them (experts replicated in compute)
Models: the example GPT with MoE MLPs written as a user writes them (tests/moe_models.py, a loop
over the experts), and a Hugging Face Qwen3-MoE (grouped matmul experts); both with experts
dominating the parameters. Each run is a fresh set of processes (lightning_parallel.parity, as
users start them); the time is the wall clock from the start of step WARMUP to the end of the last
step (a barrier at each end) per step. Memory per rank is the resident peak above the resident
size after imports (VmHWM; on CPU glibc keeps freed memory, so this is an upper bound of the live
peak), the fullest rank's, and the state the rank holds (parameters, gradients, AdamW's two
moments, from the start-up report). Runs alternate ep2, dp2, dp2, ep2, ...; the ratio (ep2 / dp2)
is the median of the pairs' ratios.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import lightning.pytorch as pl

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

MIB = 2**20
BATCH, SEQ_LEN, VOCAB = 16, 64, 512
MODELS = {
    "user MoE GPT": dict(model="tests.moe_models:moe_gpt", expert_plan=["blocks.*.mlp.experts"], model_kwargs=dict(
        vocab_size=VOCAB, seq_len=SEQ_LEN, d_model=256, n_heads=4, n_layers=4, num_experts=8, expert_hidden=1024)),
    "Qwen3-MoE": dict(model="tests.hf_models:HFCausalLM", model_kwargs=dict(
        family="qwen3_moe", vocab_size=VOCAB, hidden_size=256, intermediate_size=512, moe_intermediate_size=1024,
        num_experts=8, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2, head_dim=64)),
}
# What the figures show, for the doc (written from the measured runs).
NOTES = [
    "Both sides hold the same state (each rank half of everything: ep2 half the experts, dp2 FSDP2's half of "
    "each parameter), so the difference is in what moves and what is gathered. dp2 all-gathers each layer's "
    "experts whole for the forward and again for the backward and reduce-scatters their gradients: about 3 x the "
    "experts' bytes per rank and step (the user GPT's 4 layers x 8 x 2 x 256 x 1024 fp32 elements are 67 MB, "
    "Qwen3-MoE's gated experts 101 MB), and the gathered "
    "layer sits beside the shards. ep2 moves tokens instead: each (token, choice) row of 256 fp32 out and back, "
    "forward and backward (1,024 rows per rank and layer here, 1 MB), plus a host read of the split sizes per "
    "layer; its experts' gradients need no reduction at all (edp = 1). The expert compute per rank is the same on "
    "both sides (each rank runs half the experts on twice the rows, or all of them on its own). Where tokens "
    "outweigh experts (long sequences, small experts) or the all-to-all crosses nodes, the balance shifts; the "
    "planner prices both.",
]
SIDES = {"ep2": dict(data_parallel=2, expert_parallel=2, sharding="full"), "dp2": dict(data_parallel=2, sharding="full")}


class StepClock(pl.Callback):
    """Seconds per step over the steps after `warmup` (a barrier at each end of the window)."""

    def __init__(self, warmup: int):
        self.warmup, self.record = warmup, {}

    def on_train_batch_start(self, trainer, module, batch, batch_idx):
        if trainer.global_step == self.warmup:
            trainer.strategy.barrier()
            self.start = time.perf_counter()

    def on_train_end(self, trainer, module):
        trainer.strategy.barrier()
        self.record["step_seconds"] = (time.perf_counter() - self.start) / (trainer.global_step - self.warmup)


def measure(model: dict, side: str, warmup: int, steps: int) -> dict:
    from lightning_parallel import parity
    from tests.harness import report_rows

    model = dict(model)
    strategy = dict(SIDES[side], **{"expert_plan": model.pop("expert_plan")} if "expert_plan" in model else {})
    spec = dict(model, data="tests.models:token_data",
                data_kwargs=dict(n_train=BATCH * (warmup + steps), n_val=BATCH, seq_len=SEQ_LEN, vocab=VOCAB),
                batch_size=BATCH, max_steps=warmup + steps, devices=2, strategy=strategy, record_params=False,
                trainer=dict(num_sanity_val_steps=0),
                callbacks=[["benchmarks.expert_parallel:StepClock", {"warmup": warmup}]])
    record = parity.run(spec, pythonpath=[str(REPO)], timeout=1800)
    rows = report_rows(record["output"])
    return {"step_seconds": record["step_seconds"],
            "peak_mib": max(p - i for p, i in zip(record["peak_rss"], record["rss_after_imports"])) / MIB,
            "elements_held": max(record["elements_held"]),
            "state_elements": max(r["parameters"] + r["gradients"] + r["optimizer"] for r in rows)}


def compare(name: str, pairs: int, warmup: int, steps: int) -> dict:
    runs = {"ep2": [], "dp2": []}
    for pair in range(pairs):
        for side in ("ep2", "dp2") if pair % 2 == 0 else ("dp2", "ep2"):
            runs[side].append(measure(MODELS[name], side, warmup, steps))
            print(f"{name} pair {pair} {side}: {runs[side][-1]}", flush=True)

    def ratios(key):
        values = [e[key] / d[key] for e, d in zip(runs["ep2"], runs["dp2"])]
        return {"median": statistics.median(values), "min": min(values), "max": max(values)}

    return {"runs": runs, "time": ratios("step_seconds"), "peak": ratios("peak_mib"), "state": ratios("state_elements"),
            **{f"{side}_{key}": statistics.median(r[key] for r in runs[side])
               for side in runs for key in ("step_seconds", "peak_mib", "state_elements")}}


def write_doc(path: Path, results: dict, meta: dict) -> None:
    rows = ["| model | ep2 s/step | dp2 s/step | step time ep2/dp2 (range) | ep2 peak MiB | dp2 peak MiB | "
            "peak ep2/dp2 (range) | state held ep2/dp2 |", "|---|---|---|---|---|---|---|---|"]
    for name, r in results.items():
        rows.append(f"| {name} | {r['ep2_step_seconds']:.3f} | {r['dp2_step_seconds']:.3f} | {r['time']['median']:.3f} "
                    f"({r['time']['min']:.3f}-{r['time']['max']:.3f}) | {r['ep2_peak_mib']:.0f} | {r['dp2_peak_mib']:.0f} "
                    f"| {r['peak']['median']:.3f} ({r['peak']['min']:.3f}-{r['peak']['max']:.3f}) | "
                    f"{r['state']['median']:.3f} |")
    # Other work on the machine widens the pairs' ranges (single runs varied by up to 2x at load 4-6 on 2 cores).
    load = f" (1-minute load average {meta['load'][0]:.1f} before the runs, {meta['load'][1]:.1f} after)" if "load" in meta else ""
    doc = [
        "# Expert parallelism: step time and memory per rank",
        "",
        f"`python benchmarks/expert_parallel.py` ({meta['date']}, commit {meta['commit']}, {meta['cpus']} cores{load}, "
        f"CPU, gloo, torch {meta['torch']}): 2 processes, global batch {BATCH} x {SEQ_LEN} tokens, "
        f"AdamW, fp32, {meta['pairs']} pairs of runs alternating which side goes first, {meta['warmup']} warm-up and "
        f"{meta['steps']} timed steps each. ep2 is `HybridParallel(data_parallel=2, expert_parallel=2, sharding=\"full\")`, "
        "dp2 the same without expert parallelism (experts FSDP2-sharded, gathered whole by every rank for its own "
        "tokens). Ratios are ep2 / dp2, the median of the pairs' (range in brackets). Peak is the fullest rank's "
        "resident peak above its size after imports; state is parameters, gradients and AdamW's moments held.",
        "",
        *rows,
        "",
        "Models: the user MoE GPT is `tests/moe_models.py:moe_gpt` (d_model 256, 4 blocks, 8 experts of 256 -> 1024 -> "
        "256, top-2, vocabulary 512); Qwen3-MoE is `transformers`' `Qwen3MoeForCausalLM` (hidden 256, 4 layers, 8 "
        "experts with moe_intermediate_size 1024, top-2, vocabulary 512, grouped matmul).",
        "",
        *[line for note in NOTES for line in (note, "")],
    ]
    path.write_text("\n".join(doc).rstrip() + "\n")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--pairs", type=int, default=3)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--models", nargs="*", default=list(MODELS), choices=list(MODELS))
    parser.add_argument("--json", default=str(REPO / "benchmarks" / "results" / "expert_parallel.json"))
    parser.add_argument("--doc", default=str(REPO / "docs" / "expert_parallel.md"))
    parser.add_argument("--no-write", action="store_true")
    parser.add_argument("--doc-only", action="store_true")
    args = parser.parse_args()
    if args.doc_only:
        stored = json.loads(Path(args.json).read_text())
        write_doc(Path(args.doc), stored["results"], stored["meta"])
        return
    import torch

    load_before = os.getloadavg()[0]
    results = {name: compare(name, args.pairs, args.warmup, args.steps) for name in args.models}
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True, text=True).stdout
    meta = {"date": datetime.date.today().isoformat(), "commit": commit.strip(), "cpus": os.cpu_count(),
            "torch": torch.__version__, "pairs": args.pairs, "warmup": args.warmup, "steps": args.steps,
            "load": [load_before, os.getloadavg()[0]]}
    for name, r in results.items():
        print(f"{name}: time ep2/dp2 {r['time']}, peak {r['peak']}, state {r['state']}")
    if not args.no_write:
        Path(args.json).write_text(json.dumps({"meta": meta, "results": results}, indent=1))
        write_doc(Path(args.doc), results, meta)


if __name__ == "__main__":
    main()
