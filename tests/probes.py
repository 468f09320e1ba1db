"""Callbacks that look inside a parallel run; parity specs name them under "callbacks"."""

import lightning.pytorch as pl
from torch.distributed.tensor.debug import CommDebugMode

REDUCTIONS = ("allreduce", "reduce_scatter")


class GradSyncProbe(pl.Callback):
    """Counts the gradient reductions each backward pass issues (one entry per batch)."""

    def __init__(self):
        self.record = {"reductions_per_backward": []}
        self._mode = None

    def on_before_backward(self, trainer, module, loss):
        self._mode = CommDebugMode()
        self._mode.__enter__()

    def on_after_backward(self, trainer, module):
        self._mode.__exit__(None, None, None)
        counts = self._mode.get_comm_counts()
        reductions = {r: sum(n for op, n in counts.items() if r in str(op)) for r in REDUCTIONS}
        self.record["reductions_per_backward"].append(sum(reductions.values()))
        self.record.setdefault("reductions_by_kind", []).append(reductions)


class CheckpointEveryTwoSteps(pl.callbacks.ModelCheckpoint):
    """Saves every two optimizer steps into $LP_TEST_CKPT_DIR."""

    def __init__(self):
        import os

        super().__init__(dirpath=os.environ["LP_TEST_CKPT_DIR"], every_n_train_steps=2, save_top_k=-1)


class LearningRates(pl.Callback):
    """Records the first parameter group's learning rate at every training step."""

    def __init__(self):
        self.record = {"learning_rates": []}

    def on_train_batch_start(self, trainer, module, batch, batch_idx):
        self.record["learning_rates"].append(trainer.optimizers[0].param_groups[0]["lr"])


class Fault(pl.Callback):
    """Injects the fault $LP_TEST_FAULT ("kill", "raise", "hang" or "kill_in_save") on rank
    $LP_TEST_FAULT_RANK at optimizer step $LP_TEST_FAULT_STEP: "kill", "raise" and "hang" strike
    inside the step's forward (mid-schedule under pipeline parallelism); "kill_in_save" strikes while
    that step's checkpoint is being written. Every rank writes its pid to $LP_TEST_FAULT_DIR/pids,
    and the striking rank the time of the fault to $LP_TEST_FAULT_DIR/fault_time."""

    def __init__(self):
        import os

        self.kind = os.environ["LP_TEST_FAULT"]
        self.rank = int(os.environ["LP_TEST_FAULT_RANK"])
        self.step = int(os.environ["LP_TEST_FAULT_STEP"])
        self.dir = os.environ["LP_TEST_FAULT_DIR"]
        self.armed = False

    def on_train_start(self, trainer, module):
        import os

        with open(f"{self.dir}/pids", "a") as pids:
            pids.write(f"{os.getpid()}\n")
        if trainer.global_rank != self.rank:
            return
        if self.kind == "kill_in_save":
            self._strike_in_save()
        for leaf in (m for m in module.modules() if not list(m.children())):
            leaf.register_forward_pre_hook(lambda *_: self._strike() if self.armed else None)

    def on_train_batch_start(self, trainer, module, batch, batch_idx):
        self.armed = self.kind != "kill_in_save" and trainer.global_step == self.step

    def on_validation_start(self, trainer, module):
        self.armed = False

    def _strike(self):
        import os
        import signal
        import time

        with open(f"{self.dir}/fault_time", "w") as out:
            out.write(str(time.time()))
        if self.kind == "raise":
            raise RuntimeError("injected fault")
        if self.kind == "hang":
            time.sleep(3600)
        os.kill(os.getpid(), signal.SIGKILL)

    def _strike_in_save(self):
        """Dies after writing its first shard file of the save at the chosen step."""
        from torch.distributed.checkpoint import FileSystemWriter

        write_data, fault = FileSystemWriter.write_data, self

        def write_then_die(writer, plan, planner):
            written = write_data(writer, plan, planner)
            if f"step={fault.step}" in str(writer.path):
                written.wait()
                fault._strike()
            return written

        FileSystemWriter.write_data = write_then_die


class KeepBestCheckpoint(pl.callbacks.ModelCheckpoint):
    """Keeps only the checkpoint with the lowest training loss, checked every two steps."""

    def __init__(self):
        import os

        super().__init__(dirpath=os.environ["LP_TEST_CKPT_DIR"], every_n_train_steps=2, save_top_k=1,
                         monitor="train_loss", mode="min")


class CheckpointWritten(pl.Callback):
    """Records the path of the default ModelCheckpoint's latest save and whether it exists."""

    def __init__(self):
        self.record = {}

    def on_train_end(self, trainer, module):
        import os

        path = trainer.checkpoint_callback.best_model_path
        self.record["checkpoint"] = (os.path.basename(path), os.path.exists(path))


class InitRecord(pl.Callback):
    """At the start of training, before any step: every rank's mesh coordinate and, per
    tensor, the sum of its local values and whether it is split over tp ("shard") or not; and
    the whole model gathered to full tensors."""

    def __init__(self):
        self.record = {}

    def on_train_start(self, trainer, module):
        import torch
        import torch.distributed as dist
        from torch.distributed.tensor import DTensor, Shard

        def local(name, t):
            on_tp = isinstance(t, DTensor) and "tp" in (t.device_mesh.mesh_dim_names or ())
            split = on_tp and isinstance(t.placements[t.device_mesh.mesh_dim_names.index("tp")], Shard)
            value = t.to_local() if isinstance(t, DTensor) else t
            return float(value.double().sum()), "shard" if split else "replicate"

        if not dist.is_initialized():  # one process
            self.record["init_full"] = {k: v.detach().float().clone() for k, v in module.state_dict().items()}
            return
        mine = {name: local(name, t) for name, t in module.state_dict().items() if not t.is_meta}
        ranks = [None] * dist.get_world_size()
        dist.all_gather_object(ranks, (trainer.strategy.device_mesh.get_coordinate(), mine))
        self.record["init_ranks"] = ranks
        self.record["init_full"] = {k: v.float() for k, v in trainer.strategy.full_state_dict().items()}


class HostSyncProbe(pl.Callback):
    """Counts, on every rank, the reads of tensor values on the host (`.item()`, `bool(t)`, ...)
    and the pickled object collectives our package makes during training steps after the first
    (the first agrees on what the step logs). Records `host_syncs` per rank:
    {"file:function:what": count}."""

    READS = ("item", "tolist", "cpu", "numpy", "__bool__", "__float__", "__int__")
    OBJECT_COLLECTIVES = ("broadcast_object_list", "all_gather_object", "gather_object", "scatter_object_list")

    def __init__(self):
        self.record = {}
        self.counts: dict[str, int] = {}
        self._saved: list = []

    def _counting(self, owner, name):
        import sys

        original = getattr(owner, name)
        counts = self.counts

        def wrapper(*args, **kwargs):
            code = sys._getframe(1).f_code
            if "/lightning_parallel/" in code.co_filename and not code.co_filename.endswith("parity.py"):
                site = f"{code.co_filename.rsplit('/', 1)[-1]}:{code.co_name}:{name}"
                counts[site] = counts.get(site, 0) + 1
            return original(*args, **kwargs)

        self._saved.append((owner, name, original))
        setattr(owner, name, wrapper)

    def on_train_batch_start(self, trainer, module, batch, batch_idx):
        import torch
        import torch.distributed as dist

        if trainer.global_step >= 1:
            for name in self.READS:
                self._counting(torch.Tensor, name)
            for name in self.OBJECT_COLLECTIVES:
                self._counting(dist, name)

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx):
        for owner, name, original in reversed(self._saved):
            setattr(owner, name, original)
        self._saved = []

    def on_train_end(self, trainer, module):
        import torch.distributed as dist

        per_rank = [None] * dist.get_world_size()
        dist.all_gather_object(per_rank, self.counts)
        self.record["host_syncs"] = per_rank


class CollectiveBytesProbe(pl.Callback):
    """Bytes this rank hands to each kind of collective during the training steps after the
    first, and their dtypes: records `collective_bytes` {op: bytes}, `collective_dtypes`
    {op: [dtype names]} and `collective_bytes_by_dtype` {op: {dtype: bytes}} (rank 0)."""

    OPS = {"all_gather_single": "input_tensor", "all_gather_into_tensor": "input_tensor",
           "reduce_scatter_single": "input", "reduce_scatter_tensor": "input", "all_reduce": "tensor"}

    def __init__(self):
        self.record = {"collective_bytes": {}, "collective_dtypes": {}, "collective_bytes_by_dtype": {}}
        self._saved: list = []

    def _counting(self, name, argument):
        import inspect

        import torch.distributed as dist

        original = getattr(dist, name)
        signature = inspect.signature(original)
        sent, dtypes = self.record["collective_bytes"], self.record["collective_dtypes"]
        by_dtype = self.record["collective_bytes_by_dtype"]

        def wrapper(*args, **kwargs):
            tensor = signature.bind(*args, **kwargs).arguments[argument]
            dtype = str(tensor.dtype).removeprefix("torch.")
            sent[name] = sent.get(name, 0) + tensor.numel() * tensor.element_size()
            by_dtype.setdefault(name, {}).setdefault(dtype, 0)
            by_dtype[name][dtype] += tensor.numel() * tensor.element_size()
            dtypes.setdefault(name, set()).add(dtype)
            return original(*args, **kwargs)

        self._saved.append((name, original))
        setattr(dist, name, wrapper)

    def on_train_batch_start(self, trainer, module, batch, batch_idx):
        if trainer.global_step >= 1:
            for name, argument in self.OPS.items():
                self._counting(name, argument)

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx):
        import torch.distributed as dist

        for name, original in reversed(self._saved):
            setattr(dist, name, original)
        self._saved = []

    def on_train_end(self, trainer, module):
        self.record["collective_dtypes"] = {k: sorted(v) for k, v in self.record["collective_dtypes"].items()}
        self.record["param_dtypes"] = sorted({str(p.dtype).removeprefix("torch.") for p in module.parameters()})
        self.record["optimizer_dtypes"] = sorted({str(v.dtype).removeprefix("torch.") for opt in trainer.optimizers
                                                  for state in opt.state.values() for v in state.values()
                                                  if hasattr(v, "dtype") and v.dim() > 0})


class SlowCheckpointWrites(pl.Callback):
    """Holds up every checkpoint write by `seconds` (in the writing thread, so a background save
    stays in flight); records the steps that began, and ended, with a save in flight, and the
    most writes this rank had under way at once."""

    def __init__(self, seconds: float = 1.0):
        self.seconds = seconds
        self.record = {"began_in_flight": [], "ended_in_flight": [], "most_writes_at_once": 0}

    def setup(self, trainer, module, stage):
        import threading
        import time

        from torch.distributed.checkpoint import FileSystemWriter

        write_data, probe, lock = FileSystemWriter.write_data, self, threading.Lock()
        under_way = [0]

        def slow_write(writer, plan, planner):
            with lock:
                under_way[0] += 1
                probe.record["most_writes_at_once"] = max(probe.record["most_writes_at_once"], under_way[0])
            time.sleep(probe.seconds)
            try:
                return write_data(writer, plan, planner)
            finally:
                with lock:
                    under_way[0] -= 1

        FileSystemWriter.write_data = slow_write

    def on_train_batch_start(self, trainer, module, batch, batch_idx):
        if trainer.strategy.save_in_flight:
            self.record["began_in_flight"].append(trainer.global_step + 1)

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx):
        if trainer.strategy.save_in_flight:
            self.record["ended_in_flight"].append(trainer.global_step)


class KillDuringBackgroundSave(pl.Callback):
    """Holds up the write of the checkpoint saved at `step` and kills every rank (SIGKILL) at the
    start of the next step, while that write is still in flight."""

    def __init__(self, step: int):
        self.step = step

    def setup(self, trainer, module, stage):
        import time

        from torch.distributed.checkpoint import FileSystemWriter

        write_data, step = FileSystemWriter.write_data, self.step

        def held_up_write(writer, plan, planner):
            if f"step={step}." in str(writer.path):
                time.sleep(120)
            return write_data(writer, plan, planner)

        FileSystemWriter.write_data = held_up_write

    def on_train_batch_start(self, trainer, module, batch, batch_idx):
        import os
        import signal

        if trainer.global_step == self.step and trainer.strategy.save_in_flight:
            os.kill(os.getpid(), signal.SIGKILL)


class TensorOnEachRank(pl.Callback):
    """Records, at the start and the end of training, each rank's local values (its shard) of the
    parameter $LP_TEST_TENSOR, or None where that rank does not hold it (a pipeline stage)."""

    def __init__(self):
        self.record = {"on_each_rank": {}}

    def _gather(self, module, when):
        import os

        import torch.distributed as dist
        from torch.distributed.tensor import DTensor

        tensor = module.get_parameter(os.environ["LP_TEST_TENSOR"])
        local = None if tensor.is_meta else (tensor.to_local() if isinstance(tensor, DTensor) else tensor)
        values = [None] * dist.get_world_size()
        dist.all_gather_object(values, None if local is None else local.detach().cpu().clone())
        self.record["on_each_rank"][when] = values

    def on_train_start(self, trainer, module):
        self._gather(module, "start")

    def on_train_end(self, trainer, module):
        self._gather(module, "end")


class ReductionsPerBackward(pl.Callback):
    """The gradient elements handed to reducing collectives (all_reduce, reduce_scatter_single)
    during each backward the strategy runs, `manual_backward` included: records
    `reduced_per_backward`, one count per backward (rank 0)."""

    ARGUMENT = {"all_reduce": "tensor", "reduce_scatter_single": "input"}

    def __init__(self):
        self.record = {"reduced_per_backward": []}

    def setup(self, trainer, module, stage):
        import inspect

        import torch.distributed as dist

        strategy, counts = trainer.strategy, self.record["reduced_per_backward"]
        backward, originals = strategy.backward, {name: getattr(dist, name) for name in self.ARGUMENT}

        def counting(name, sent):
            signature = inspect.signature(originals[name])

            def wrapper(*args, **kwargs):
                sent[0] += signature.bind(*args, **kwargs).arguments[self.ARGUMENT[name]].numel()
                return originals[name](*args, **kwargs)

            return wrapper

        def counting_backward(*args, **kwargs):
            sent = [0]
            for name in originals:
                setattr(dist, name, counting(name, sent))
            try:
                return backward(*args, **kwargs)
            finally:
                for name, original in originals.items():
                    setattr(dist, name, original)
                counts.append(sent[0])

        strategy.backward = counting_backward


class StartProbe(pl.Callback):
    """How each rank's process was set up: the cluster environment Lightning chose, the rank it
    gives the process, the threads it trains with, the rank Lightning's and torchmetrics'
    rank-zero filters hold, and the launch variables in its environment."""

    def setup(self, trainer, module, stage):
        import os

        import torch
        from lightning.fabric.utilities.rank_zero import rank_zero_only
        from torchmetrics.utilities import prints

        from lightning_parallel.parity import _per_rank

        strategy = trainer.strategy
        names = ("MASTER_ADDR", "NODE_RANK", "LOCAL_RANK", "WORLD_SIZE", "RANK", "OMP_NUM_THREADS", "PL_GLOBAL_SEED")
        self.record = {"start": _per_rank(dict(
            environment=type(strategy.cluster_environment).__name__, global_rank=strategy.global_rank,
            local_rank=strategy.local_rank, node_rank=strategy.node_rank, world_size=strategy.world_size,
            num_processes=strategy.num_processes, threads=torch.get_num_threads(),
            rank_zero=(rank_zero_only.rank, prints.rank_zero_only.rank),
            env={name: os.environ.get(name) for name in names}))}
