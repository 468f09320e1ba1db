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
        reductions = sum(n for op, n in counts.items() if any(r in str(op) for r in REDUCTIONS))
        self.record["reductions_per_backward"].append(reductions)


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
    """Injects the fault $LP_TEST_FAULT ("kill", "raise" or "kill_in_save") on rank
    $LP_TEST_FAULT_RANK at optimizer step $LP_TEST_FAULT_STEP: "kill" and "raise" strike inside
    the step's forward (mid-schedule under pipeline parallelism); "kill_in_save" strikes while
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
