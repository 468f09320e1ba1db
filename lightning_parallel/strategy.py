"""HybridParallel: Lightning's hooks. The parallel work itself lives in layout.py,
data_parallel.py, gradients.py and checkpoint.py."""

from __future__ import annotations

import os
import socket
import warnings
from collections.abc import Generator, Mapping
from contextlib import contextmanager, nullcontext
from datetime import timedelta
from typing import Any, Callable, Optional, Union

import torch
import torch.distributed as dist
from lightning.fabric.utilities.distributed import (
    _distributed_is_initialized,
    _init_dist_connection,
    _sync_ddp_if_available,
)
from lightning.fabric.utilities.distributed import _all_gather_ddp_if_available
from lightning.fabric.utilities.seed import reset_seed
from lightning.fabric.utilities.types import ReduceOp
from lightning.pytorch.core.optimizer import LightningOptimizer
from lightning.pytorch.strategies.launchers.subprocess_script import _SubprocessScriptLauncher
from lightning.pytorch.strategies.parallel import ParallelStrategy
from lightning.pytorch.trainer.states import TrainerFn, TrainerStatus
from lightning.pytorch.utilities.rank_zero import rank_zero_info, rank_zero_only, rank_zero_warn
from lightning_utilities.core.rank_zero import rank_zero_only as utils_rank_zero_only
from torch import Tensor
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor import DTensor
from torch.distributed.tensor.parallel import loss_parallel
from torch.nn.parallel import DistributedDataParallel
from torch.optim import Optimizer

from lightning_parallel import auto_layout, checkpoint, data_position, export, materialize, report, weights
from lightning_parallel.auto_layout import check_auto_layout
from lightning_parallel.activation_checkpointing import AC_CHOICES, check_activation_checkpointing
from lightning_parallel.compiling import check_compile
from lightning_parallel.expert_parallel import check_expert_plan
from lightning_parallel.preemption import defer_slurm_requeue
from lightning_parallel.data_parallel import reshard, set_gradient_sync, unused_parameters_explained
from lightning_parallel.gradients import clip_grad_norm_
from lightning_parallel.manual_optimization import check_manual_optimization
from lightning_parallel.parallelize import parallelize
from lightning_parallel.pipeline import PipelineRunner, check_schedule
from lightning_parallel.pipeline.split import drop_other_stages_params
from lightning_parallel.layout import (
    Layout,
    LayoutError,
    check_backend,
    check_degree,
    check_shard_degree,
    check_sharding,
    check_type,
    default_backend,
    tensor_groups_across_nodes,
)

SUPPORTED_PRECISION = ("32-true", "bf16-mixed", "bf16-true", "16-true")
REDUCE_DTYPES = (None, "float32", "bfloat16")


class HybridParallel(ParallelStrategy):
    """Data, tensor and pipeline parallelism for an unmodified LightningModule.

    Args:
        data_parallel: data-parallel degree, or "auto" for world size / (tensor x pipeline).
        tensor_parallel: tensor-parallel degree (innermost mesh dim; keep it within a node).
        pipeline_parallel: pipeline-parallel degree (outermost mesh dim).
        expert_parallel: the data-parallel ranks each mixture-of-experts layer's experts are
            sharded over (a divisor of the data-parallel degree); tokens travel to their
            experts' ranks and back with all-to-alls.
        expert_plan: which modules are experts modules: "auto" (the model's declared
            `base_model_ep_plan`, Hugging Face MoE models) or a list of module-name globs.
        sharding: "none" replicates parameters and all-reduces gradients (DDP); "full" shards
            parameters, gradients and optimizer state over the data-parallel ranks (FSDP2);
            "hybrid" shards them within groups of `data_parallel_shard` ranks and replicates
            across the groups (HSDP: all-gathers stay inside a node).
        data_parallel_shard: under sharding="hybrid", the ranks of one shard group; "auto" is
            the processes of a node (as far as they divide the data-parallel degree).
        reduce_dtype: the dtype data parallelism reduces gradients in: "float32" or "bfloat16"
            (half the traffic). Default: float32 under precision="bf16-mixed" (whose
            parameters are gathered and computed in bf16, with fp32 master weights and
            optimizer state), the parameters' dtype otherwise.
        activation_checkpointing: "none"; "full" (each trunk block keeps only its input and
            recomputes the rest in the backward); "selective" (keeps matmul outputs, recomputes
            the cheap ops around them).
        compile: compile each trunk block with torch.compile.
        tensor_plan: "auto" (the model's declared plan, else an inferred one), a dict of
            module-name globs to style names, or a callable (module, tp_mesh).
        sequence_parallel: run norms and dropouts between tensor-parallel regions on sequence
            shards (needs an explicit plan that says where the sequence is split).
        loss_parallel: keep the logits split over the vocabulary and compute the cross-entropy
            on the shards (the head's style must be "colwise_gather_output").
        micro_batches: micro-batches each data-parallel rank's batch is cut into under
            pipeline parallelism (default 2 x pipeline_parallel).
        schedule: pipeline schedule: "gpipe", "1f1b", "interleaved_1f1b", "looped_bfs",
            "zero_bubble", "zbv" or "dualpipev".
        pipeline_split: "auto" (stages balanced by counted cost) or the names of the modules
            that begin stages 1, 2, ... (e.g. ["blocks.2"]).
        reshard_per_micro_batch: under pipeline parallelism with data parallelism, gather each
            block's parameters and reduce-scatter its gradients for every micro-batch, instead of
            keeping the stage's parameters gathered and its gradients unsharded for the whole
            step: the least memory (about one block's full parameters and gradients at a time)
            for more communication.
        init_from: weights to start from, read into each rank's shards: a Hugging Face model
            directory (safetensors), a one-file Lightning or torch checkpoint, or a HybridParallel
            checkpoint directory (weights only; resume with `fit(ckpt_path=...)` instead).
        layout: "given" (the degrees and options above) or "auto": the planner chooses the
            degrees, sharding, schedule, micro-batches and activation checkpointing for this
            model, batch and world (lightning_parallel/planner.py), leaving those arguments unset.
        machine: the planner's hardware preset for layout="auto" ("8xh100", "8xa100", "cpu");
            default: by device.
        async_save: write checkpoints saved during training in the background: each rank's
            shards are copied to CPU memory and the step goes on while a thread writes them (at
            most one save in flight; the last one finishes before fit returns).
        backend: process-group backend; default gloo on CPU, nccl on CUDA.
        timeout: seconds a collective may wait before the run fails (instead of hanging).
    """

    strategy_name = "hybrid"

    def __init__(
        self,
        data_parallel: Union[int, str] = "auto",
        tensor_parallel: int = 1,
        pipeline_parallel: int = 1,
        expert_parallel: int = 1,
        expert_plan: Union[str, list] = "auto",
        sharding: str = "none",
        data_parallel_shard: Union[int, str] = "auto",
        reduce_dtype: Optional[str] = None,
        activation_checkpointing: str = "none",
        compile: bool = False,
        tensor_plan: Union[str, dict, Callable] = "auto",
        sequence_parallel: bool = False,
        loss_parallel: bool = False,
        micro_batches: Optional[int] = None,
        schedule: str = "1f1b",
        pipeline_split: Union[str, list] = "auto",
        reshard_per_micro_batch: bool = False,
        init_from: Optional[str] = None,
        layout: str = "given",
        machine: Optional[str] = None,
        async_save: bool = False,
        backend: Optional[str] = None,
        timeout: Union[float, timedelta] = 1800.0,
        **strategy_kwargs: Any,
    ) -> None:
        super().__init__(**strategy_kwargs)
        # Lightning warns that trainer.init_module cannot work with a strategy that builds models
        # in a sharded context; this one builds both on the meta device, and both work.
        warnings.filterwarnings("ignore", message=r"`trainer.init_module` cannot fully support .* `HybridParallel`")
        check_degree("data_parallel", data_parallel, allow_auto=True)
        check_degree("tensor_parallel", tensor_parallel)
        check_degree("pipeline_parallel", pipeline_parallel)
        check_degree("expert_parallel", expert_parallel)
        check_expert_plan(expert_plan)
        check_sharding(sharding)
        check_shard_degree(sharding, data_parallel_shard)
        if reduce_dtype not in REDUCE_DTYPES:
            raise LayoutError(f"reduce_dtype={reduce_dtype!r} is not one of {sorted(REDUCE_DTYPES, key=str)}: "
                              "'float32' reduces gradients in full precision, 'bfloat16' in half (half the traffic).")
        if activation_checkpointing not in AC_CHOICES:
            raise LayoutError(f"activation_checkpointing={activation_checkpointing!r} is not one of {AC_CHOICES}: 'full' "
                              "recomputes each trunk block's activations in the backward, 'selective' all but matmul outputs.")
        check_type("compile", compile, (bool,), "True or False")
        check_type("sequence_parallel", sequence_parallel, (bool,), "True or False")
        check_type("loss_parallel", loss_parallel, (bool,), "True or False")
        check_type("schedule", schedule, (str,), "a schedule name")
        check_type("reshard_per_micro_batch", reshard_per_micro_batch, (bool,), "True or False")
        check_type("init_from", init_from, (str, os.PathLike, type(None)), "a path, or None")
        check_type("async_save", async_save, (bool,), "True or False")
        check_type("backend", backend, (str, type(None)), "a backend name such as 'gloo' or 'nccl', or None")
        check_type("timeout", timeout, (int, float, timedelta), "a number of seconds")
        check_auto_layout(layout, machine, dict(
            data_parallel=data_parallel, tensor_parallel=tensor_parallel, pipeline_parallel=pipeline_parallel,
            expert_parallel=expert_parallel, sharding=sharding, data_parallel_shard=data_parallel_shard, micro_batches=micro_batches, schedule=schedule,
            activation_checkpointing=activation_checkpointing))
        micro_batches = 2 * pipeline_parallel if micro_batches is None else micro_batches
        self._schedule_spec = check_schedule(schedule, pipeline_parallel, micro_batches)
        check_compile(compile, self._schedule_spec if pipeline_parallel > 1 else None)
        check_activation_checkpointing(activation_checkpointing, self._schedule_spec if pipeline_parallel > 1 else None)
        if reshard_per_micro_batch and pipeline_parallel == 1:
            raise LayoutError("reshard_per_micro_batch applies to pipeline stages: set pipeline_parallel > 1, or leave it False.")
        if reshard_per_micro_batch and self._schedule_spec.split_backward:
            raise LayoutError(
                f"reshard_per_micro_batch does not work with schedule={schedule!r}, which computes weight gradients "
                "after the input gradients, when data parallelism has already reduced them: choose gpipe, 1f1b, "
                "interleaved_1f1b or looped_bfs, or leave reshard_per_micro_batch False."
            )
        if expert_parallel > 1 and sequence_parallel:
            raise LayoutError(
                "expert_parallel does not work with sequence_parallel=True: the tensor-parallel ranks of a group would "
                "each dispatch a different sequence shard to experts they hold whole. Use one of them."
            )
        if pipeline_parallel > 1 and callable(tensor_plan):
            raise LayoutError(
                "A callable tensor_plan parallelizes the whole module, but under pipeline_parallel each rank holds "
                "only its stages: give the plan as a dict of module-name globs to styles."
            )
        if pipeline_split != "auto" and (isinstance(pipeline_split, str) or not all(isinstance(n, str) for n in pipeline_split)):
            raise LayoutError(f"pipeline_split must be 'auto' or a list of layer names, got {pipeline_split!r}.")
        self.data_parallel = data_parallel
        self.tensor_parallel = tensor_parallel
        self.pipeline_parallel = pipeline_parallel
        self.expert_parallel = expert_parallel
        self.expert_plan = expert_plan if expert_plan == "auto" else list(expert_plan)
        self.sharding = sharding
        self.data_parallel_shard = data_parallel_shard
        self.reduce_dtype = reduce_dtype
        self.activation_checkpointing = activation_checkpointing
        self.compile = compile
        self.tensor_plan = dict(tensor_plan) if isinstance(tensor_plan, Mapping) else tensor_plan
        self.sequence_parallel = sequence_parallel
        self.loss_parallel = loss_parallel
        self.micro_batches = micro_batches
        self.schedule = schedule
        self.pipeline_split = pipeline_split if pipeline_split == "auto" else list(pipeline_split)
        self.reshard_per_micro_batch = reshard_per_micro_batch
        self.init_from = None if init_from is None else str(init_from)
        self.async_save = async_save
        self.layout_mode = layout  # "auto": chosen in setup (self._auto_chosen says whether it was)
        self.machine = machine
        self._auto_chosen = False
        self.backend = backend
        self.timeout = timeout if isinstance(timeout, timedelta) else timedelta(seconds=float(timeout))
        self._saver = checkpoint.Saver(self.timeout)
        self._saved_data_parallel: Optional[int] = None  # of the checkpoint fit resumed from
        self._warned_lost_position = False
        self.num_nodes = 1
        self._layout: Optional[Layout] = None
        self._device_mesh: Optional[DeviceMesh] = None
        self._dp_mesh: Optional[DeviceMesh] = None
        self._expert_mesh: Optional[DeviceMesh] = None  # under expert_parallel > 1
        self._runner: Optional[torch.nn.Module] = None  # the module every step enters through
        self._pipeline: Optional[PipelineRunner] = None
        self._manual = None  # under manual optimization, averages the replicated parameters' gradients
        self._parallelized_module = None
        self._metric_group = None
        self._failed = False
        self._requeue = None  # SLURM's requeue signal, acted on after a later optimizer step (a callback)
        self._ranks: list[Any] = []  # every rank's (host, node, mesh coordinate)
        self._report_sections: list[str] = []  # tensor plan and pipeline split, for the start-up report
        self._experts_per_layer: list[int] = []  # each experts module's count, for the report

    # ----------------------------------------------------------------- layout and processes

    @property
    def layout(self) -> Layout:
        """The resolved degrees; known once Lightning has told the strategy its devices."""
        if self._layout is None:
            self._layout = Layout.resolve(
                self.num_nodes * self.num_processes, self.data_parallel, self.tensor_parallel, self.pipeline_parallel,
                self.sharding, self.data_parallel_shard, per_node=self.num_processes, expert_parallel=self.expert_parallel,
            )
        return self._layout

    @property
    def device_mesh(self) -> DeviceMesh:
        if self._device_mesh is None:
            raise RuntimeError("The device mesh exists once the processes have started (after setup_environment).")
        return self._device_mesh

    @property
    def dp_mesh(self) -> DeviceMesh:
        """The data-parallel ranks (replicas x shards) as one dim."""
        if self._dp_mesh is None:
            raise RuntimeError("The device mesh exists once the processes have started (after setup_environment).")
        return self._dp_mesh

    @property
    def expert_mesh(self) -> Optional[DeviceMesh]:
        """The experts' (pp, edp_replicate, edp_shard, ep, tp) mesh under expert_parallel > 1, else None."""
        return self._expert_mesh

    @property
    def root_device(self) -> torch.device:
        assert self.parallel_devices is not None
        return self.parallel_devices[self.local_rank]

    @property
    def num_processes(self) -> int:
        return len(self.parallel_devices) if self.parallel_devices is not None else 0

    @property
    def is_distributed(self) -> bool:
        return True

    @property
    def distributed_sampler_kwargs(self) -> dict[str, Any]:
        # Ranks that differ only in their tp or pp coordinate read the same batch.
        return {"num_replicas": self.dp_mesh.size(), "rank": self.dp_mesh.get_local_rank()}

    @property
    def restore_checkpoint_after_setup(self) -> bool:
        return True  # state is loaded into the parallelized model

    def _configure_launcher(self) -> None:
        # Called in every process Lightning or a launcher starts, before any collective:
        # the checks here fail on every rank alike.
        self._check_configuration()
        assert self.cluster_environment is not None
        if not self.cluster_environment.creates_processes_externally:
            self._launcher = _SubprocessScriptLauncher(self.cluster_environment, self.num_processes, self.num_nodes)

    def _check_configuration(self) -> None:
        self._layout = None
        _ = self.layout
        check_backend(self.backend, self.root_device)
        if self.init_from:
            weights.checkpoint_kind(self.init_from)
        precision = getattr(self.precision_plugin, "precision", None)
        if precision not in SUPPORTED_PRECISION:
            why = " (16-mixed needs a gradient scaler that knows sharded gradients)" if precision == "16-mixed" else ""
            raise LayoutError(
                f"HybridParallel does not support precision={precision!r}{why}: choose one of {SUPPORTED_PRECISION}."
            )
        module = self.lightning_module  # known once fit or validate has begun (not at Trainer(...))
        if module is not None and module.trainer.state.fn == TrainerFn.FITTING:
            check_manual_optimization(module, self.layout.pp, self.layout_mode)

    def set_world_ranks(self) -> None:
        if self.cluster_environment is not None:
            self.cluster_environment.set_global_rank(self.node_rank * self.num_processes + self.local_rank)
            self.cluster_environment.set_world_size(self.num_nodes * self.num_processes)
        rank_zero_only.rank = utils_rank_zero_only.rank = self.global_rank

    def setup_environment(self) -> None:
        super().setup_environment()
        reset_seed()
        # Processes on one node share its cores: more intra-op threads than a fair share only
        # makes them preempt each other (Lightning's launcher leaves its children at the default).
        fair_share = max(1, (os.cpu_count() or 1) // max(1, self.num_processes))
        torch.set_num_threads(min(torch.get_num_threads(), fair_share))
        self.set_world_ranks()
        self._check_configuration()
        backend = self.backend or default_backend(self.root_device)
        device_id = self.root_device if self.root_device.type == "cuda" else None
        _init_dist_connection(self.cluster_environment, backend, timeout=self.timeout, device_id=device_id)
        self._build_mesh()

    def _build_mesh(self) -> None:
        self._device_mesh, self._dp_mesh = self.layout.build_mesh(self.root_device.type)
        if self.layout.ep > 1:
            self._expert_mesh = self.layout.build_expert_mesh(self.root_device.type)
        self._ranks = self._gather_ranks()
        self._warn_if_tensor_groups_span_nodes([node for _, node, _ in self._ranks])
        assert self.lightning_module is not None
        self.lightning_module._device_mesh = self._device_mesh  # as ModelParallelStrategy does

    def _choose_layout(self, trainer) -> None:
        """layout="auto": rank 0 plans, every rank takes its choice, the mesh is built again."""
        step, batch = self._probe(trainer)
        chosen, table = None, ""
        if self.is_global_zero:
            precision = getattr(self.precision_plugin, "precision", "32-true")
            chosen, table = auto_layout.choose(self.lightning_module, step, batch, self.world_size, self.num_processes,
                                               self.root_device, self.machine, precision, self.tensor_plan,
                                               self.expert_plan)
        chosen, table = self.broadcast((chosen, table))
        if chosen is None:
            raise LayoutError(f"layout='auto' found no layout of {self.world_size} devices that fits:\n{table}")
        auto_layout.applied(self, chosen)
        self._schedule_spec = check_schedule(self.schedule, self.pipeline_parallel, self.micro_batches)
        self._layout, self._auto_chosen = None, True
        rank_zero_info(f"layout='auto' chose {chosen}: HybridParallel(**{chosen.arguments()}). The planner's first "
                       f"layouts:\n{table}")
        self._build_mesh()

    def _gather_ranks(self) -> list[tuple[str, int, list[int]]]:
        """Every rank's (host name, node rank, mesh coordinate), on every rank."""
        ranks: list[Any] = [None] * self.world_size
        dist.all_gather_object(ranks, (socket.gethostname(), self.node_rank, self.device_mesh.get_coordinate()))
        return ranks

    def _warn_if_tensor_groups_span_nodes(self, node_of_rank: list[int]) -> None:
        groups = tensor_groups_across_nodes(self.layout, node_of_rank)
        if not groups:
            return
        per_node = self.num_processes
        rank_zero_warn(
            f"tensor_parallel={self.layout.tp} with {per_node} processes per node puts {len(groups)} tensor-parallel "
            f"group(s) across nodes (ranks {groups[0]} first). Tensor parallelism communicates the most, in every "
            f"layer, and should stay on a node's fast links: make tensor_parallel at most the devices per node "
            f"({per_node}) and a divisor of it, and span nodes with data or pipeline parallelism."
        )

    # ----------------------------------------------------------------- model

    def setup(self, trainer) -> None:
        assert self.accelerator is not None and self.lightning_module is not None
        self.accelerator.setup(trainer)
        module = self.lightning_module
        if self.layout_mode == "auto" and not self._auto_chosen:
            self._choose_layout(trainer)
        reporting = self._parallelized_module is not module  # the first setup of this module
        if reporting:
            module = self.precision_plugin.convert_module(module)
            if materialize.is_empty(module):
                materialize.move_real_tensors(module, self.root_device)  # the rest is allocated once sharded
            else:
                self.model_to_device()
            done = parallelize(self, module, trainer)
            self._runner, self._pipeline, self._manual = done.runner, done.pipeline, done.manual
            self._report_sections, self._experts_per_layer = done.report, done.experts_per_layer
            self._parallelized_module = module
        self.model = self._runner if self._runner is not None else module
        self._set_metric_groups()
        self.barrier()
        fitting = trainer.state.fn == TrainerFn.FITTING
        if fitting:
            self._reset_optimizers_and_schedulers()
            self.setup_optimizers(trainer)
            if self._pipeline is not None:
                drop_other_stages_params(self.optimizers)
        if reporting:
            held = report.gather_held(report.held_by(module, self.optimizers, fitting), self.root_device)
            rank_zero_info(report.startup_report(self.layout, self._ranks, held, self._report_sections,
                                                 self._experts_per_layer))
        self.setup_precision_plugin()
        self._requeue = defer_slurm_requeue(trainer, self.cluster_environment, self.root_device)
        # Lightning clips with torch's clip_grad_norm_, which knows nothing of the mesh.
        self.precision_plugin.clip_grad_by_norm = self._clip_grad_by_norm

    @contextmanager
    def tensor_init_context(self, empty_init: Optional[bool] = None) -> Generator[None, None, None]:
        """`trainer.init_module(empty_init=True)` builds on the meta device: each rank allocates
        only its share once the model is split and sharded (see materialize.py)."""
        with materialize.empty_init() if empty_init else nullcontext(), self.precision_plugin.tensor_init_context():
            yield

    @contextmanager
    def model_sharded_context(self) -> Generator[None, None, None]:
        """`configure_model` builds on the meta device too."""
        with materialize.empty_init():
            yield

    def model_to_device(self) -> None:
        assert self.lightning_module is not None
        self.lightning_module.to(self.root_device)

    def _probe(self, trainer):
        """A batch and the step that will consume it, to trace and profile the model with."""
        step, loop = {
            TrainerFn.FITTING: ("training_step", trainer.fit_loop),
            TrainerFn.VALIDATING: ("validation_step", trainer.validate_loop),
            TrainerFn.TESTING: ("test_step", trainer.test_loop),
            TrainerFn.PREDICTING: ("predict_step", trainer.predict_loop),
        }[trainer.state.fn]
        loader = loop._data_source.dataloader()
        if isinstance(loader, (list, tuple)):
            loader = loader[0]
        return step, self.batch_to_device(next(iter(loader)))

    def _set_metric_groups(self) -> None:
        """torchmetrics sync over the data-parallel group, where each sample is counted once.
        Under pipeline parallelism only the last stage updates metrics; the group then spans the
        stages too, so every rank (rank 0 included) computes the value from the last stage's states."""
        try:
            from torchmetrics import Metric
        except ImportError:
            return
        if self._metric_group is None:
            dims = ("pp", "dp_replicate", "dp_shard")
            mesh = self.device_mesh[dims]._flatten("pp_dp") if self.layout.pp > 1 else self.dp_mesh
            self._metric_group = mesh.get_group()
        group = self._metric_group
        for sub in self.lightning_module.modules():
            if isinstance(sub, Metric):
                sub.process_group = group

    def _clip_grad_by_norm(self, optimizer: Optimizer, clip_val: Union[int, float]) -> None:
        parameters = [p for group in optimizer.param_groups for p in group["params"]]
        counted = self._pipeline.tied.counted_once(parameters) if self._pipeline is not None else None
        clip_grad_norm_(parameters, clip_val, pp_group=self.device_mesh["pp"].get_group(), device=self.root_device,
                        counted=counted)

    @contextmanager
    def _loss_context(self) -> Generator[None, None, None]:
        """Under loss_parallel the logits are vocabulary shards; cross-entropy (forward and
        backward) must run inside DTensor's loss_parallel context to see them as one."""
        if self.loss_parallel and self.layout.tp > 1:
            with loss_parallel():
                yield
        else:
            yield

    def training_step(self, *args: Any, **kwargs: Any):
        if self._pipeline is not None:
            batch, batch_idx = (*args, *kwargs.values())[:2]
            with self.precision_plugin.train_step_context(), self._loss_context():
                return self._pipeline.train_step(batch, batch_idx, self.lightning_module.trainer.accumulate_grad_batches)
        with self._loss_context(), unused_parameters_explained(self.model):
            return super().training_step(*args, **kwargs)

    def validation_step(self, *args: Any, **kwargs: Any):
        return self._eval_step("validation_step", super().validation_step, self.precision_plugin.val_step_context, args, kwargs)

    def test_step(self, *args: Any, **kwargs: Any):
        return self._eval_step("test_step", super().test_step, self.precision_plugin.test_step_context, args, kwargs)

    def predict_step(self, *args: Any, **kwargs: Any):
        return self._eval_step("predict_step", super().predict_step, self.precision_plugin.predict_step_context, args, kwargs)

    def _eval_step(self, name, default_step, precision_context, args, kwargs):
        if self._pipeline is None:
            with self._loss_context():
                return default_step(*args, **kwargs)
        with precision_context(), self._loss_context():
            return self._pipeline.eval_step(name, *args, *kwargs.values())

    def backward(self, closure_loss: Tensor, optimizer, *args: Any, **kwargs: Any) -> Tensor:
        if self._pipeline is not None:
            # The schedule ran every micro-batch's backward inside training_step; Lightning's
            # hooks around backward still run.
            self.pre_backward(closure_loss)
            closure_loss = self.precision_plugin.pre_backward(closure_loss, self.lightning_module)
            self._pipeline.restore_gradients()
            closure_loss = self.precision_plugin.post_backward(closure_loss, self.lightning_module)
            self.post_backward(closure_loss)
            return closure_loss
        with self._loss_context():
            return super().backward(closure_loss, optimizer, *args, **kwargs)

    def optimizer_step(self, optimizer: Optimizer, closure: Callable[[], Any], model=None, **kwargs: Any) -> Any:
        if self._manual is not None:
            self._manual.check_averaged(self.lightning_module)
        if self._pipeline is None:
            return super().optimizer_step(optimizer, closure, model, **kwargs)

        def closure_then_sum_tied():
            # The step's gradients are complete (accumulation included) and not yet clipped.
            result = closure()
            self._pipeline.tied.sum_gradients()
            return result

        return super().optimizer_step(optimizer, closure_then_sum_tied, model, **kwargs)

    def pre_backward(self, closure_loss: Tensor) -> None:
        if self._manual is not None:
            self._manual.set_aside()

    def post_backward(self, closure_loss: Tensor) -> None:
        if self._manual is not None:
            self._manual.average()

    @contextmanager
    def block_backward_sync(self) -> Generator[None, None, None]:
        """While Lightning accumulates gradients over micro-steps: replicated gradients are not
        reduced until the last; sharded ones are reduce-scattered each micro-step (so they stay
        sharded), and under hybrid sharding all-reduced across replicas only at the last."""
        if isinstance(self.model, DistributedDataParallel):
            with self.model.no_sync():
                yield
            return
        set_gradient_sync(self.model, False, keep_sharded=self.layout.dp_shard > 1)
        try:
            yield
        finally:
            set_gradient_sync(self.model, True, keep_sharded=self.layout.dp_shard > 1)

    def on_validation_end(self) -> None:
        # FSDP2 leaves the root's parameters gathered after a forward, expecting a backward;
        # after evaluation none comes, so shard them again to give the memory back.
        if self.model is not None:
            reshard(self.model)

    on_test_end = on_predict_end = on_validation_end

    # ----------------------------------------------------------------- collectives

    def barrier(self, name: Optional[str] = None) -> None:
        if _distributed_is_initialized():
            if dist.get_backend() == "nccl":
                dist.barrier(device_ids=[self.root_device.index])
            else:
                dist.barrier()

    def broadcast(self, obj, src: int = 0):
        if not _distributed_is_initialized():
            return obj
        objects = [obj]
        dist.broadcast_object_list(objects, src, device=self.root_device)
        return objects[0]

    def reduce(self, tensor: Union[Tensor, Any], group: Optional[Any] = None, reduce_op="mean"):
        """Reduces over the data-parallel group by default: that is what `self.log(sync_dist=True)`
        means (tensor and pipeline peers hold the same samples and must not be counted twice)."""
        if not isinstance(tensor, Tensor):
            return tensor
        if isinstance(tensor, DTensor):  # e.g. a loss computed under loss_parallel
            tensor = tensor.full_tensor()
        return _sync_ddp_if_available(tensor, group if group is not None else self._dp_group(), reduce_op=reduce_op)

    def all_gather(self, tensor: Tensor, group: Optional[Any] = None, sync_grads: bool = False) -> Tensor:
        return _all_gather_ddp_if_available(tensor, group=group if group is not None else self._dp_group(), sync_grads=sync_grads)

    def reduce_boolean_decision(self, decision: bool, all: bool = True) -> bool:
        decision_tensor = torch.tensor(int(decision), device=self.root_device)
        votes = _sync_ddp_if_available(decision_tensor, dist.group.WORLD, reduce_op=ReduceOp.SUM)
        return bool(votes == self.world_size) if all else bool(votes)

    def _dp_group(self):
        return self._dp_mesh.get_group() if self._dp_mesh is not None else None

    # ----------------------------------------------------------------- checkpoints

    @property
    def lightning_restore_optimizer(self) -> bool:
        return False  # a sharded checkpoint's optimizer state is loaded in load_checkpoint

    def lightning_module_state_dict(self) -> dict[str, Any]:
        return checkpoint.sharded_model_state(self.lightning_module)

    def full_state_dict(self) -> dict[str, Any]:
        """The whole model's parameters and buffers as full CPU tensors, under the model's own
        names, on every rank, whatever the layout. Every rank must call it."""
        return checkpoint.full_model_state(self.lightning_module, self.device_mesh["pp"].get_group())

    def optimizer_state(self, optimizer: Optimizer) -> dict[str, Any]:
        if isinstance(optimizer, LightningOptimizer):
            optimizer = optimizer._optimizer
        return checkpoint.sharded_optimizer_state(self.lightning_module, optimizer)

    def save_checkpoint(self, checkpoint_dict: dict[str, Any], filepath, storage_options=None) -> None:
        if storage_options is not None:
            raise TypeError("HybridParallel writes sharded checkpoints with torch.distributed.checkpoint; storage_options are not used.")
        trainer = self.lightning_module.trainer
        fitting = trainer.state.fn == TrainerFn.FITTING and trainer.state.status == TrainerStatus.RUNNING
        if fitting and not self._warned_lost_position and (why := data_position.lost_position_warning(trainer)):
            rank_zero_warn(why)
            self._warned_lost_position = True
        checkpoint_dict["hugging_face"] = export.hf_record(self.lightning_module)  # for `consolidate --format hf`
        checkpoint_dict[export.TIED_KEY] = checkpoint.tied_aliases(self.lightning_module)  # held once; consolidate restores
        checkpoint_dict["data_parallel"] = self.layout.dp
        # A preempted job is requeued (and killed) right after its save: that one is written now.
        background = self.async_save and fitting and not (self._requeue is not None and self._requeue.requeuing)
        self._saver.save(checkpoint_dict, self.broadcast(str(filepath)), self.is_global_zero, background)

    @property
    def save_in_flight(self) -> bool:
        """Whether a checkpoint is being written in the background (async_save)."""
        return self._saver.in_flight

    def remove_checkpoint(self, filepath) -> None:
        # Waits for the save in flight: until the new checkpoint is in place, the old one stays.
        self._saver.remove(filepath, self.is_global_zero)

    def load_checkpoint(self, checkpoint_path, weights_only: Optional[bool] = None) -> dict[str, Any]:
        path = self.broadcast(str(checkpoint_path))
        checkpoint.check_complete(path)
        if checkpoint.is_sharded_checkpoint(path):
            loaded = checkpoint.load_sharded(path, self.lightning_module, self.optimizers, weights_only)
            self._saved_data_parallel = loaded.get("data_parallel")
            return loaded
        loaded = super().load_checkpoint(path, weights_only=weights_only)  # an ordinary one-file checkpoint
        if self.optimizers and loaded.get("optimizer_states"):
            raise LayoutError(
                f"{path} is a one-file checkpoint: HybridParallel resumes training from its own sharded checkpoint "
                "directories only. To start from its weights, load them with MyModule.load_from_checkpoint(...) and "
                "call fit without ckpt_path."
            )
        return loaded

    def load_model_state_dict(self, checkpoint_dict: Mapping[str, Any], strict: bool = True) -> None:
        if not checkpoint_dict.get(checkpoint.SHARDED):
            checkpoint.load_full_model_state(self.lightning_module, dict(checkpoint_dict["state_dict"]), strict=strict)

    def process_dataloader(self, dataloader: object) -> object:
        stage = self.lightning_module.trainer.state.stage
        return data_position.keep_global_position(dataloader, stage, self._saved_data_parallel, self.layout.dp)

    def on_train_batch_start(self, batch: Any, batch_idx: int) -> None:
        self._saver.poll(self.is_global_zero)

    def on_exception(self, exception: BaseException) -> None:
        self._failed = True

    def teardown(self) -> None:
        # A barrier before the process group goes away avoids a rare abort at exit on gloo.
        # After an exception the other ranks may be waiting in another collective: leave
        # without one, so that they fail on the lost connection (or the timeout) and exit too.
        if not self._failed:
            self._saver.wait(self.is_global_zero)
            self.barrier()
        self._saved_data_parallel = None  # a later fit starts afresh unless it resumes too
        module = self.lightning_module
        if module is None or not any(t.is_meta for t in [*module.parameters(), *module.buffers()]):
            super().teardown()
            return
        # Other stages' parameters sit on the meta device and cannot move to the CPU.
        assert self.cluster_environment is not None and self.accelerator is not None
        self.cluster_environment.teardown()
        self.precision_plugin.teardown()
        self.accelerator.teardown()
        self.checkpoint_io.teardown()

    @classmethod
    def register_strategies(cls, strategy_registry) -> None:
        strategy_registry.register(cls.strategy_name, cls, description="Data x tensor x pipeline parallelism")
