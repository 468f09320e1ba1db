"""Throughput: samples/s, tokens/s, peak memory and model FLOPs utilization, for the progress
bar and the loggers.

Every `log_every_n_steps` optimizer steps (default: the Trainer's own, so the loggers write
each value) it logs through `pl_module.log`, over the steps since the previous log:
- `throughput/samples_per_sec` (on the progress bar): samples of the global batch, i.e. each
  rank's batch times the data-parallel degree (`strategy.layout.dp` under HybridParallel, the
  world size under other strategies), per second;
- `throughput/tokens_per_sec`: the same for tokens, when the batch's first tensor is a 2-D
  integer tensor (token ids): its numel per sample;
- `throughput/peak_memory_gib`: the largest peak over the ranks, of memory allocated on the
  GPU (`torch.cuda.max_memory_allocated`) or of resident memory on CPU (VmHWM);
- `throughput/mfu`: model FLOPs utilization, where a peak is known (the GPU's, from Lightning's
  table of devices and precisions, or `peak_flops`) and tokens are: FLOPs per token (6 x
  parameters, the usual estimate for a dense model's forward and backward; torchtitan refines
  it with attention's share; or `flops_per_token`) x tokens/s / (peak x world size);
- `throughput/pipeline_bubble`: the measured bubble, once a PipelineTimeline callback has one.

Cost: on the steps in between it reads only batch shapes, on the host. A logging step waits
for the device (`torch.cuda.synchronize`, on GPU) so the time covers the work, and does one
all-reduce of the peak memory over all ranks; so do the start and end of a validation inside
training, whose time is left out.
"""

from __future__ import annotations

import sys
import time
from typing import Any

import lightning.pytorch as pl
import torch
import torch.distributed as dist
from lightning.fabric.utilities.throughput import get_available_flops

GIB = 1024**3


def first_tensor(batch: Any) -> torch.Tensor | None:
    """The first tensor of a batch made of tensors, lists, tuples and dicts."""
    if isinstance(batch, torch.Tensor):
        return batch
    items = batch.values() if isinstance(batch, dict) else batch if isinstance(batch, (list, tuple)) else ()
    for item in items:
        found = first_tensor(item)
        if found is not None:
            return found
    return None


def batch_counts(batch: Any) -> tuple[int, int | None]:
    """(samples, tokens) of one rank's batch; tokens None unless the first tensor holds token ids."""
    tensor = first_tensor(batch)
    if tensor is None or tensor.dim() == 0:
        return 0, None
    token_ids = tensor.dim() == 2 and not tensor.is_floating_point() and not tensor.is_complex() and tensor.dtype != torch.bool
    return tensor.shape[0], tensor.numel() if token_ids else None


def data_parallel_degree(strategy) -> int:
    """How many distinct batches one step reads: the dp degree, or the world size."""
    from lightning_parallel.strategy import HybridParallel

    if isinstance(strategy, HybridParallel):
        return strategy.layout.dp
    return strategy.world_size


def resident_peak_bytes() -> int:
    """This process's peak resident memory (VmHWM)."""
    try:
        with open("/proc/self/status") as status:
            for line in status:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    import resource

    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if sys.platform == "darwin" else peak * 1024  # bytes on macOS, KiB elsewhere


def compute_dtype(precision: str) -> torch.dtype:
    if "bf16" in precision:
        return torch.bfloat16
    if precision.startswith("16"):
        return torch.float16
    if precision.startswith("64"):
        return torch.float64
    return torch.float32


class Throughput(pl.Callback):
    """Logs throughput, peak memory and MFU every `log_every_n_steps` optimizer steps (see the
    module's docstring). `record` keeps what each logging step logged (`record["throughput"]`)."""

    def __init__(self, log_every_n_steps: int | None = None, prog_bar: bool = True,
                 flops_per_token: float | None = None, peak_flops: float | None = None):
        super().__init__()
        if log_every_n_steps is not None and log_every_n_steps < 1:
            raise ValueError(f"log_every_n_steps must be >= 1, got {log_every_n_steps}.")
        self.log_every_n_steps = log_every_n_steps
        self.prog_bar = prog_bar
        self.flops_per_token = flops_per_token
        self.peak_flops = peak_flops
        self.record: dict[str, Any] = {"throughput": []}
        self._window_start: float | None = None

    def on_train_start(self, trainer, pl_module) -> None:
        self._every = self.log_every_n_steps or trainer.log_every_n_steps or 50  # the Trainer's own default
        self._on = trainer.strategy.root_device
        self._dp = data_parallel_degree(trainer.strategy)
        self._world = trainer.world_size
        # Parameters of other stages sit on the meta device and sharded ones are DTensors: numel counts them whole.
        self._flops_per_token = self.flops_per_token or 6 * sum(p.numel() for p in pl_module.parameters())
        self._peak = self.peak_flops
        if self._peak is None and self._on.type == "cuda":
            self._peak = get_available_flops(self._on, compute_dtype(str(trainer.precision)))
        self._last_global_step = trainer.global_step
        self._open_window()

    def _open_window(self) -> None:
        self._window_start = None
        self._paused = 0.0
        self._samples = 0
        self._tokens = 0  # None once a batch shows no token ids

    def _now(self) -> float:
        """Host time once the device has caught up with the work queued so far."""
        if self._on.type == "cuda":
            torch.cuda.synchronize(self._on)
        return time.perf_counter()

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if self._window_start is None:
            self._window_start = self._now()
        samples, tokens = batch_counts(batch)
        self._samples += samples * self._dp
        self._tokens = None if tokens is None or self._tokens is None else self._tokens + tokens * self._dp

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        stepped = trainer.global_step != self._last_global_step  # not a step that only accumulates
        self._last_global_step = trainer.global_step
        if stepped and trainer.global_step % self._every == 0 and self._window_start is not None:
            self._log(trainer, pl_module)

    def on_train_end(self, trainer, pl_module) -> None:
        self._window_start = None

    def on_validation_start(self, trainer, pl_module) -> None:
        if not trainer.sanity_checking and self._window_start is not None:
            self._validation_start = self._now()

    def on_validation_end(self, trainer, pl_module) -> None:
        if not trainer.sanity_checking and self._window_start is not None:
            self._paused += self._now() - self._validation_start

    def _log(self, trainer, pl_module) -> None:
        seconds = self._now() - self._window_start - self._paused
        values = {"throughput/samples_per_sec": self._samples / seconds,
                  "throughput/peak_memory_gib": self._peak_memory_over_ranks() / GIB}
        if self._tokens is not None:
            tokens_per_sec = self._tokens / seconds
            values["throughput/tokens_per_sec"] = tokens_per_sec
            if self._peak:
                values["throughput/mfu"] = self._flops_per_token * tokens_per_sec / (self._peak * self._world)
        bubble = self._pipeline_bubble(trainer)
        if bubble is not None:
            values["throughput/pipeline_bubble"] = bubble
        for name, value in values.items():
            pl_module.log(name, value, prog_bar=self.prog_bar and name == "throughput/samples_per_sec",
                          on_step=True, on_epoch=False)
        counts = {"samples": self._samples, "tokens": self._tokens, "seconds": seconds}
        self.record["throughput"].append({"step": trainer.global_step, **values, **counts})
        self._open_window()
        self._window_start = time.perf_counter()  # the device caught up in _now() above

    def _peak_memory_over_ranks(self) -> float:
        if self._on.type == "cuda":
            local = torch.cuda.max_memory_allocated(self._on)
        else:
            local = resident_peak_bytes()
        if not (dist.is_available() and dist.is_initialized()):
            return float(local)
        peak = torch.tensor([float(local)], device=self._on, dtype=torch.float64)
        dist.all_reduce(peak, op=dist.ReduceOp.MAX)
        return peak.item()

    @staticmethod
    def _pipeline_bubble(trainer) -> float | None:
        from lightning_parallel.timeline import PipelineTimeline

        return next((c.bubble_fraction for c in trainer.callbacks
                     if isinstance(c, PipelineTimeline) and c.bubble_fraction is not None), None)

