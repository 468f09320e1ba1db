"""Parity test bed: the same module, seed and data on one process and on a parallel layout.

`run(spec)` trains in fresh processes started the way users start them (`python -m
lightning_parallel.parity SPEC OUT` with Lightning's own launcher for devices > 1) and returns
what rank 0 recorded: every step's logged training loss, the final validation loss, the final
parameters gathered to full tensors, and the parameter elements each rank held.
`assert_parity(reference, parallel)` compares two such records.

A spec is a plain dict (JSON):
    model, model_kwargs   "package.module:factory" returning a LightningModule, and its kwargs
    data, data_kwargs     "package.module:factory" returning (train_dataset, val_dataset)
    batch_size            global training batch size (split over the data-parallel ranks)
    val_batch_size        global validation batch size
    max_steps, seed       optimizer steps to train; seed for the module's initialization
    devices               number of processes
    strategy              None (one process, plain Lightning), a strategy name such as "ddp",
                          or a dict of HybridParallel arguments; a dict with "class" (an import
                          path) builds that strategy class instead
    trainer               extra Trainer arguments (accumulate_grad_batches, gradient_clip_val, ...)
    callbacks             extra callbacks by import path, or [import path, kwargs]; a callback's
                          `record` dict joins the record
    checkpoint            ModelCheckpoint arguments (dirpath, every_n_train_steps, save_top_k, ...)
    loader                "plain" (default: torch's DataLoader) or "stateful" (torchdata's
                          StatefulDataLoader, whose position Lightning saves in checkpoints)
    save_to, resume_from  a checkpoint path to write with trainer.save_checkpoint after fit, and
                          one to resume fit from (ckpt_path)
    evaluate              extra stages to run after fit: "test" (records test_loss), "predict"
                          (records rank 0's predictions)
    build                 "init" (default: the module built as it is), "empty" (under
                          `trainer.init_module(empty_init=True)`)
    record_params         False to leave the final parameters out of the record (large models)

Every rank records its resident memory after imports, its peak by the start of training (setup
and sanity validation) and its peak over the run (`rss_after_imports`, `setup_peak_rss`,
`peak_rss`, in bytes).

The model must log its training loss as "train_loss" and its validation loss as "val_loss".
The one-process reference replays the order in which Lightning's distributed sampler deals
samples (shuffled with the global seed), so the k-th global batch is the same in both runs.
"""

from __future__ import annotations

import contextlib
import importlib
import json
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any, Callable

import torch

LOSS_RTOL = 1e-5
PARAM_ATOL = 1e-4


def run(spec: dict[str, Any], pythonpath: list[str] = (), timeout: float = 600.0,
        start: Callable[..., subprocess.CompletedProcess] | None = None) -> dict[str, Any]:
    """Trains as `spec` says in new processes; returns rank 0's record. `start` replaces
    `run_processes` (same arguments and result): the tests fork their ranks from a server."""
    with tempfile.TemporaryDirectory(prefix="lp-parity-") as tmp:
        out_file = Path(tmp, "record.pt")
        proc = (start or run_processes)(spec, out_file, pythonpath, timeout)
        if proc.returncode != 0 or not out_file.exists():
            errors = sorted({line for line in proc.stderr.splitlines() if re.search(r"^(\[rank\d+\]: )?[\w.]+(Error|Exception)\b", line)})
            raise RuntimeError(
                f"parity run failed (exit {proc.returncode}) for spec {spec}\n--- errors ---\n" + "\n".join(errors[:20])
                + f"\n--- stdout ---\n{proc.stdout[-4000:]}\n--- stderr ---\n{proc.stderr[-8000:]}"
            )
        record = torch.load(out_file, weights_only=False)
        record["output"] = proc.stdout + proc.stderr
        return record


def run_processes(spec: dict[str, Any], out_file: Path, pythonpath: list[str] = (),
                  timeout: float = 600.0) -> subprocess.CompletedProcess:
    """Starts the worker for `spec` as users start training and waits for it, failed or not."""
    cmd = [sys.executable, "-m", "lightning_parallel.parity", str(write_spec(spec, out_file)), str(out_file)]
    return subprocess.run(cmd, env=worker_env(pythonpath), cwd=out_file.parent, capture_output=True, text=True,
                          timeout=timeout)


def write_spec(spec: dict[str, Any], out_file: Path) -> Path:
    spec_file = out_file.with_name(out_file.name + ".spec.json")
    spec_file.write_text(json.dumps(spec))
    return spec_file


def worker_env(pythonpath: list[str] = ()) -> dict[str, str]:
    """This process's environment with `pythonpath` ahead on PYTHONPATH: the worker's."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([*pythonpath, env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    return env


def assert_parity(reference: dict, parallel: dict, loss_rtol: float = LOSS_RTOL, param_atol: float = PARAM_ATOL) -> dict:
    """Raises AssertionError unless every step's loss, the validation loss and every final
    parameter agree; returns the largest gaps seen."""
    loss_gap = assert_losses_close(reference["losses"], parallel["losses"], loss_rtol)
    val_gap = abs(parallel["val_loss"] - reference["val_loss"]) / abs(reference["val_loss"])
    assert val_gap <= loss_rtol, f"validation loss {parallel['val_loss']} vs {reference['val_loss']}"

    ref_params, par_params = reference["params"], parallel["params"]
    assert ref_params.keys() == par_params.keys(), f"parameter names differ: {ref_params.keys() ^ par_params.keys()}"
    param_gap = 0.0
    for name, ref in ref_params.items():
        par = par_params[name]
        assert par.shape == ref.shape, f"{name}: shape {tuple(par.shape)} vs {tuple(ref.shape)}"
        gap = (par.float() - ref.float()).abs().max().item()
        assert gap <= param_atol, f"parameter {name} differs by {gap:.3g} (> {param_atol})"
        param_gap = max(param_gap, gap)
    return {"loss_rtol": loss_gap, "val_rtol": val_gap, "param_atol": param_gap}


def assert_losses_close(reference: list[float], parallel: list[float], loss_rtol: float = LOSS_RTOL) -> float:
    """Raises AssertionError unless both runs logged as many steps and every step's loss agrees;
    returns the largest relative gap."""
    ref_losses, par_losses = torch.tensor(reference), torch.tensor(parallel)
    assert len(ref_losses) == len(par_losses) > 0, f"step counts differ: {len(ref_losses)} vs {len(par_losses)}"
    loss_gap = ((par_losses - ref_losses).abs() / ref_losses.abs()).max().item()
    assert loss_gap <= loss_rtol, f"training losses differ by {loss_gap:.3g} relative:\n{ref_losses}\n{par_losses}"
    return loss_gap


# ---------------------------------------------------------------------------- the worker


def _load(path: str):
    module_name, attr = path.split(":")
    return getattr(importlib.import_module(module_name), attr)


def _data_parallel_degree(spec: dict) -> int:
    strategy = spec.get("strategy")
    if strategy is None:
        return 1
    if isinstance(strategy, str):
        return spec["devices"]
    if "class" in strategy:  # Lightning's ModelParallelStrategy
        return strategy.get("data_parallel_size", spec["devices"])
    from lightning_parallel.layout import Layout

    return Layout.resolve(
        spec["devices"],
        strategy.get("data_parallel", "auto"),
        strategy.get("tensor_parallel", 1),
        strategy.get("pipeline_parallel", 1),
    ).dp


def _loaders(spec: dict, train_ds, val_ds):
    from torch.utils.data import DataLoader, DistributedSampler

    if spec.get("loader", "plain") == "stateful":
        from torchdata.stateful_dataloader import StatefulDataLoader

        DataLoader = StatefulDataLoader  # noqa: N806 (the same arguments; saves its position)
    dp = _data_parallel_degree(spec)
    batch, val_batch = spec["batch_size"], spec.get("val_batch_size", spec["batch_size"])
    for name, size, n in (("batch_size", batch, len(train_ds)), ("val_batch_size", val_batch, len(val_ds))):
        if size % dp or n % size:
            raise ValueError(f"{name}={size} must divide over dp={dp} and divide the dataset size {n}")
    if spec.get("strategy") is None:
        # Lightning's distributed sampler with one replica deals the same order as with dp replicas.
        seed = int(os.environ.get("PL_GLOBAL_SEED", 0))
        sampler = DistributedSampler(train_ds, num_replicas=1, rank=0, shuffle=True, seed=seed)
        train = DataLoader(train_ds, batch_size=batch, sampler=sampler)
    else:
        train = DataLoader(train_ds, batch_size=batch // dp, shuffle=True)
    return train, DataLoader(val_ds, batch_size=val_batch // dp, shuffle=False)


def _elements_held(module: torch.nn.Module) -> int:
    from lightning_parallel.report import local_elements

    return sum(local_elements(p) for p in module.parameters())


def _per_rank(value: Any) -> list[Any]:
    """Every rank's `value`, in rank order (collective when distributed)."""
    import torch.distributed as dist

    if not dist.is_initialized():
        return [value]
    values: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(values, value)
    return values


def _numel(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def _resident_bytes() -> int:
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _worker(spec_file: str, out_file: str) -> None:
    import lightning.pytorch as pl
    import torch.distributed as dist
    from lightning.pytorch.utilities.model_summary import ModelSummary

    import lightning_parallel
    from lightning_parallel import checkpoint
    from lightning_parallel.report import local_elements
    from lightning_parallel.throughput import resident_peak_bytes

    rss_after_imports = _resident_bytes()
    spec = json.loads(Path(spec_file).read_text())
    pl.seed_everything(spec.get("seed", 0), verbose=False)

    record: dict[str, Any] = {"losses": []}

    class Recorder(pl.Callback):
        def on_train_start(self, trainer, module):
            record["setup_peak_rss"] = _per_rank(resident_peak_bytes())  # setup and sanity validation
            record["summary_total_params"] = ModelSummary(module).total_parameters
            record["elements_held"] = _per_rank(_elements_held(module))

        def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx):
            record["losses"].append(float(trainer.callback_metrics["train_loss"]))

        def on_train_end(self, trainer, module):
            held = sum(
                local_elements(v)
                for opt in trainer.optimizers for state in opt.state.values() for v in state.values()
                if isinstance(v, torch.Tensor) and v.dim() > 0
            )
            record["optimizer_elements"] = _per_rank(held)

    probes = [_load(c)() if isinstance(c, str) else _load(c[0])(**c[1]) for c in spec.get("callbacks", [])]
    if spec.get("checkpoint"):
        probes.append(pl.callbacks.ModelCheckpoint(**spec["checkpoint"]))
    strategy = spec.get("strategy")
    if isinstance(strategy, dict) and "class" in strategy:
        strategy = _load(strategy["class"])(**{k: v for k, v in strategy.items() if k != "class"})
    elif isinstance(strategy, dict):
        strategy = lightning_parallel.HybridParallel(**{"timeout": 120, **strategy})
    elif strategy is None:
        strategy = "auto"
    trainer_args = dict(
        accelerator="cpu",
        devices=spec.get("devices", 1),
        strategy=strategy,
        max_steps=spec["max_steps"],
        logger=False,
        enable_checkpointing=bool(spec.get("checkpoint")),
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    trainer = pl.Trainer(**{**trainer_args, **spec.get("trainer", {})}, callbacks=[Recorder(), *probes])
    with trainer.init_module(empty_init=True) if spec.get("build") == "empty" else contextlib.nullcontext():
        model = _load(spec["model"])(**spec.get("model_kwargs", {}))
    train_ds, val_ds = _load(spec["data"])(**spec.get("data_kwargs", {}))
    train_loader, val_loader = _loaders(spec, train_ds, val_ds)
    trainer.fit(model, train_loader, val_loader, ckpt_path=spec.get("resume_from"))
    if spec.get("save_to"):
        trainer.save_checkpoint(spec["save_to"])
    record["val_metrics"] = trainer.validate(model, val_loader, verbose=False)[0]
    record["val_loss"] = record["val_metrics"]["val_loss"]
    if "test" in spec.get("evaluate", ()):
        record["test_loss"] = trainer.test(model, val_loader, verbose=False)[0]["test_loss"]
    if "predict" in spec.get("evaluate", ()):
        record["predictions"] = torch.cat(trainer.predict(model, val_loader))
    for probe in probes:
        record.update(getattr(probe, "record", {}))
    record["rss_after_imports"] = _per_rank(rss_after_imports)
    record["peak_rss"] = _per_rank(resident_peak_bytes())
    if not spec.get("record_params", True):
        params = {}
    elif isinstance(trainer.strategy, lightning_parallel.HybridParallel):
        params = trainer.strategy.full_state_dict()
    elif _elements_held(model) != _numel(model):
        params = checkpoint.full_model_state(model)
    else:
        params = {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}
    record["params"] = {k: v.float() for k, v in params.items()}
    if trainer.is_global_zero:
        torch.save(record, out_file)
    if dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


if __name__ == "__main__":
    _worker(sys.argv[1], sys.argv[2])
    # The run is over, its record written and the process group gone. Leave without the
    # interpreter's teardown: there, in a few FSDP2/DCP runs out of a hundred, a C++ thread's
    # destructor aborts a process whose run succeeded ("terminate called without an active
    # exception", exit -6), even after the closing barrier.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)
