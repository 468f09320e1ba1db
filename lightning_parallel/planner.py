"""Which layout to run: every valid layout for a world size, with the memory each rank will hold
and the step time, predicted from the model built on the meta device (no weights needed).

A layout here is the degrees (pp, dp, tp, and ep for a model with experts), the sharding, the pipeline schedule and micro-batches,
and activation checkpointing. For each, the planner applies the project's own decisions without
running anything: the pipeline cut (`cut_stages`, the split a run would make), the tensor plan
(`resolve_plan`) and the sharding rules of FSDP2 (dim 0 in chunks), so that the elements it
predicts per rank are the ones a run holds. Activations are measured on meta: the bytes autograd
saves for one micro-batch of each stage, with and without checkpointing, kept in flight as the
schedule does. Step time adds compute (counted FLOPs and bytes per op, as the pipeline balancer
counts them), the pipeline bubble, tensor-parallel all-reduces, pipeline sends and data-parallel
gradient traffic, less the overlap each allows; under expert parallelism, each rank holds 1/ep of
the experts (sharded further over the edp ranks as FSDP2 does) and pays the dispatch's
all-to-alls.
"""

from __future__ import annotations

import copy
import logging
import math
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Iterator, Optional

import torch
from torch import nn
from torch.distributed.tensor import Shard
from torch.overrides import TorchFunctionMode

from lightning_parallel.data_parallel import data_parallel_units
from lightning_parallel.expert_parallel import find_experts
from lightning_parallel.layout import Layout, LayoutError
from lightning_parallel.pipeline import cut_stages
from lightning_parallel.pipeline.cost import CPU, Hardware, OpCost
from lightning_parallel.pipeline.runner import capture_call, split_batch
from lightning_parallel.pipeline.schedules import SCHEDULES, stages_of_rank
from lightning_parallel.report import optimizer_states
from lightning_parallel.tensor_parallel import resolve_plan
from lightning_parallel.tensor_parallel.styles import canonical, parameter_placement
from lightning_parallel.throughput import first_tensor

GiB = 1024**3


@dataclass(frozen=True)
class Machine:
    """What the planner needs to know of the hardware, per device (a GPU, or a CPU process)."""

    name: str
    devices_per_node: int
    memory_bytes: float
    flops_per_s: float  # sustained, in the training dtype
    memory_bytes_per_s: float
    seconds_per_op: float  # launch and dispatch overhead per op
    intra_node_bytes_per_s: float  # one device's share of a collective inside a node
    inter_node_bytes_per_s: float  # and across nodes
    collective_seconds: float  # fixed cost of one collective
    peak_flops_per_s: Optional[float] = None  # datasheet, for model FLOPs utilization
    cores_per_node: Optional[int] = None  # CPU processes share a node's cores: rates per core
    overlap: float = 1.0  # how much of the data-parallel traffic compute can hide (GPUs: streams)

    def hardware(self, devices_in_use: int = 1) -> Hardware:
        """Per device, when `devices_in_use` of a node's devices run (they share its cores on CPU)."""
        share = 1.0 if self.cores_per_node is None else min(1.0, self.cores_per_node / devices_in_use)
        return Hardware(self.name, self.flops_per_s * share, self.memory_bytes_per_s * share, self.seconds_per_op / share)


MACHINES = {
    # 8 H100 SXM per node: NVLink 4 (~450 GB/s per GPU per direction), 8 x 400 Gb/s InfiniBand.
    # Sustained bf16 matmul throughput, not the 989 TFLOP/s datasheet peak.
    "8xh100": Machine("8xH100 (NVLink, InfiniBand)", 8, 80e9, 6.0e14, 2.6e12, 4e-6, 3.6e11, 4.5e10, 2e-5, 9.89e14),
    "8xa100": Machine("8xA100 80GB (NVLink, InfiniBand)", 8, 80e9, 2.2e14, 1.6e12, 4e-6, 2.4e11, 2.2e10, 2e-5, 3.12e14),
    # This project's 2-core CPU machines, one process per device, gloo on loopback: measured by
    # benchmarks/calibrate_planner.py (per process, with the cores shared between the processes).
    # Collectives here cost milliseconds: gloo on loopback, processes on oversubscribed cores;
    # nothing overlaps (gloo runs the collective on the cores the compute needs).
    "cpu": Machine("CPU (2 cores, gloo)", 8, 3 * GiB, 1.0e11, 3.0e10, 5e-6, 1.0e9, 1.0e9, 5e-3,
                   cores_per_node=2, overlap=0.0),
}

DTYPE_BYTES = {"32-true": 4, "bf16-mixed": 4, "bf16-true": 2, "16-true": 2}


@dataclass(frozen=True)
class Option:
    """One layout to predict."""

    pp: int = 1
    dp: int = 1
    tp: int = 1
    sharding: str = "none"
    dp_shard: int = 1  # ranks per shard group (dp under "full", 1 under "none")
    schedule: str = "1f1b"
    micro_batches: int = 1
    activation_checkpointing: str = "none"
    ep: int = 1  # expert parallelism, within dp

    @property
    def layout(self) -> Layout:
        return Layout(pp=self.pp, dp=self.dp, tp=self.tp, dp_shard=self.dp_shard, ep=self.ep)

    @property
    def schedule_spec(self):
        """The schedule a run takes; one stage runs as 1F1B."""
        return SCHEDULES[self.schedule if self.pp > 1 else "1f1b"]

    @property
    def micro_batch_count(self) -> int:
        """Micro-batches per step; one without a pipeline."""
        return self.micro_batches if self.pp > 1 else 1

    def arguments(self) -> dict[str, Any]:
        """HybridParallel's arguments for this option."""
        args: dict[str, Any] = {"data_parallel": self.dp, "tensor_parallel": self.tp,
                                "pipeline_parallel": self.pp, "sharding": self.sharding}
        if self.sharding == "hybrid":
            args["data_parallel_shard"] = self.dp_shard
        if self.ep > 1:
            args["expert_parallel"] = self.ep
        if self.pp > 1:
            args.update(schedule=self.schedule, micro_batches=self.micro_batches)
        if self.activation_checkpointing != "none":
            args["activation_checkpointing"] = self.activation_checkpointing
        return args

    def __str__(self) -> str:
        text = str(self.layout) + f" {self.sharding}"
        if self.pp > 1:
            text += f" {self.schedule} M={self.micro_batches}"
        if self.activation_checkpointing != "none":
            text += f" AC={self.activation_checkpointing}"
        return text


@dataclass
class Memory:
    """Per rank, the most any rank of the layout holds."""

    params: int  # elements
    grads: int
    optimizer: int
    param_bytes: float
    grad_bytes: float
    optimizer_bytes: float
    activation_bytes: float
    working_bytes: float  # gathered parameters and gradients of the units in use

    @property
    def total_bytes(self) -> float:
        return (self.param_bytes + self.grad_bytes + self.optimizer_bytes + self.activation_bytes
                + self.working_bytes)


@dataclass
class StepTime:
    compute: float
    bubble: float
    tensor_parallel: float
    pipeline_sends: float
    data_parallel: float  # exposed (not overlapped) gradient and parameter traffic
    expert_dispatch: float = 0.0  # the all-to-alls of expert parallelism

    @property
    def total(self) -> float:
        return (self.compute + self.bubble + self.tensor_parallel + self.pipeline_sends + self.data_parallel
                + self.expert_dispatch)


@dataclass
class Prediction:
    option: Option
    memory: Memory
    time: StepTime
    refused: Optional[str] = None  # why it does not fit or cannot run
    global_batch: int = 0

    @property
    def fits(self) -> bool:
        return self.refused is None

    @property
    def seconds_per_sample(self) -> float:
        return self.time.total / self.global_batch if self.global_batch else math.inf


@dataclass
class _Model:
    """What the planner measured of the model once, for all options."""

    module: nn.Module
    batch: Any
    global_batch: int
    precision: str
    step: str
    optimizer_states: int
    tensor_plan: Any
    experts: dict[str, int]  # experts module name -> its number of experts
    cache: dict = field(default_factory=dict)  # stage cuts, saved bytes, seconds, tensor sizes
    plans: dict = field(default_factory=dict)  # tp -> resolved tensor plan


# ----------------------------------------------------------------- public entry points


def build_on_meta(factory, **kwargs) -> nn.Module:
    """The LightningModule `factory(**kwargs)` builds, with every tensor on the meta device."""
    with torch.device("meta"):
        module = factory(**kwargs)
    configure = getattr(module, "configure_model", None)
    if callable(configure):
        with torch.device("meta"):
            configure()
    return module


def meta_copy(module: nn.Module) -> nn.Module:
    """A copy of `module` with every parameter and buffer on the meta device (nothing allocated),
    detached from its trainer and device mesh."""
    memo: dict[int, Any] = {}
    for tensor in [*module.parameters(), *module.buffers()]:
        empty = torch.empty_like(tensor, device="meta")
        memo[id(tensor)] = nn.Parameter(empty, tensor.requires_grad) if isinstance(tensor, nn.Parameter) else empty
    for name in ("_trainer", "_device_mesh", "_fabric"):
        if getattr(module, name, None) is not None:
            memo[id(getattr(module, name))] = None
    return copy.deepcopy(module, memo)


def predict(module: nn.Module, batch, option: Option, machine: Machine, precision: str = "32-true",
            tensor_plan="auto", step: str = "training_step", _model: Optional[_Model] = None,
            expert_plan="auto") -> Prediction:
    """Memory per rank and step time of `module` trained on the global `batch` under `option`."""
    model = _model or _measure_model(module, batch, precision, step, tensor_plan, expert_plan)
    try:
        _check_option(option, model)
        memory = _memory(model, option, machine)
        time = _step_time(model, option, machine)
    except LayoutError as error:
        empty = Memory(0, 0, 0, 0.0, 0.0, 0.0, 0.0, 0.0)
        return Prediction(option, empty, StepTime(math.inf, 0, 0, 0, 0), str(error), model.global_batch)
    refused = None
    if memory.total_bytes > machine.memory_bytes:
        refused = (f"needs {memory.total_bytes / GiB:.1f} GiB per device, the device has "
                   f"{machine.memory_bytes / GiB:.1f} GiB")
    return Prediction(option, memory, time, refused, model.global_batch)


def plan(module: nn.Module, batch, world_size: int, machine: Machine, precision: str = "32-true",
         tensor_plan="auto", step: str = "training_step",
         activation_checkpointing=("none", "full"), schedules=("1f1b", "interleaved_1f1b", "zbv"),
         expert_plan="auto") -> list[Prediction]:
    """Every valid layout of `world_size` devices, those that fit first, fastest first; each
    with its predicted memory per rank and step time (the refused ones with their reason)."""
    model = _measure_model(module, batch, precision, step, tensor_plan, expert_plan)
    predictions = [predict(module, batch, option, machine, precision, tensor_plan, step, _model=model)
                   for option in candidate_options(world_size, model.global_batch, machine.devices_per_node,
                                                   activation_checkpointing, schedules,
                                                   experts=list(model.experts.values()))]
    return _ranked(predictions)


def plan_per_rank_batch(module: nn.Module, per_rank_batch, world_size: int, machine: Machine,
                        precision: str = "32-true", tensor_plan="auto", step: str = "training_step",
                        activation_checkpointing=("none", "full"),
                        schedules=("1f1b", "interleaved_1f1b", "zbv"), expert_plan="auto") -> list[Prediction]:
    """As `plan`, for a DataLoader whose batch size is per data-parallel rank (Lightning's
    meaning): each layout trains on that batch times its data-parallel degree, so layouts are
    ranked by seconds per sample."""
    size = batch_size(per_rank_batch)
    models: dict[int, _Model] = {}
    predictions = []
    experts = find_experts(module, expert_plan)
    counts = [module.get_submodule(name).num_experts for name in experts]
    for option in candidate_options(world_size, size * world_size, machine.devices_per_node,
                                    activation_checkpointing, schedules, per_rank_batch=size, experts=counts):
        if option.dp not in models:
            batch = _tiled(per_rank_batch, option.dp)
            models[option.dp] = _measure_model(module, batch, precision, step, tensor_plan, expert_plan)
        model = models[option.dp]
        predictions.append(predict(module, model.batch, option, machine, precision, tensor_plan, step, _model=model))
    return _ranked(predictions)


def _ranked(predictions: list[Prediction]) -> list[Prediction]:
    return sorted(predictions, key=lambda p: (not p.fits, p.seconds_per_sample, p.memory.total_bytes))


def _tiled(batch, times: int):
    """`batch` repeated `times` along its first dim (meta tensors stay meta)."""
    return torch.utils._pytree.tree_map(
        lambda t: t.repeat(times, *[1] * (t.dim() - 1)) if isinstance(t, torch.Tensor) else t, batch)


def candidate_options(world_size: int, global_batch: int, per_node: int, activation_checkpointing=("none",),
                      schedules=("1f1b",), per_rank_batch: Optional[int] = None,
                      experts: list[int] = ()) -> Iterator[Option]:
    """With `per_rank_batch`, every data-parallel rank's batch is that (the global batch grows
    with dp); else `global_batch` is divided over the data-parallel ranks. `experts`: the number
    of experts of each MoE layer (none for a dense model), whose divisors within dp are ep degrees."""
    for pp in _divisors(world_size):
        for tp in _divisors(world_size // pp):
            if tp > per_node or per_node % tp:
                continue  # tensor groups stay inside a node
            dp = world_size // (pp * tp)
            if per_rank_batch is None and global_batch % dp:
                continue
            per_rank = per_rank_batch if per_rank_batch is not None else global_batch // dp
            for sharding, dp_shard in _shardings(dp, per_node // tp):
                for ep in _expert_degrees(dp, dp_shard, sharding, experts):
                    for schedule, micro_batches in _pipelines(pp, per_rank, schedules):
                        for ac in activation_checkpointing:
                            yield Option(pp, dp, tp, sharding, dp_shard, schedule, micro_batches, ac, ep)


def _divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


def _shardings(dp: int, dp_per_node: int) -> list[tuple[str, int]]:
    if dp == 1:
        return [("none", 1)]
    options = [("none", 1), ("full", dp)]
    shard = math.gcd(dp, max(1, dp_per_node))
    if 1 < shard < dp:
        options.append(("hybrid", shard))
    return options


def _expert_degrees(dp: int, dp_shard: int, sharding: str, experts: list[int]) -> list[int]:
    """1, and for a model with experts every ep within dp that divides each layer's experts and,
    under hybrid sharding, nests with the shard groups."""
    if not experts:
        return [1]
    return [ep for ep in _divisors(dp) if all(count % ep == 0 for count in experts)
            and (sharding != "hybrid" or dp_shard % ep == 0 or ep % dp_shard == 0)]


def _pipelines(pp: int, per_rank_batch: int, schedules) -> list[tuple[str, int]]:
    if pp == 1:
        return [("1f1b", 1)]
    found = []
    for name in schedules:
        spec = SCHEDULES[name]
        for m in (pp, 2 * pp, 4 * pp, 8 * pp):
            if m >= max(1, spec.min_microbatches_per_rank) * pp and per_rank_batch % m == 0:
                found.append((name, m))
    return found


# ----------------------------------------------------------------- measuring the model


def _measure_model(module, batch, precision: str, step: str, tensor_plan, expert_plan="auto") -> _Model:
    if precision not in DTYPE_BYTES:
        raise LayoutError(f"precision={precision!r}: the planner knows {sorted(DTYPE_BYTES)}.")
    experts = {name: module.get_submodule(name).num_experts for name in find_experts(module, expert_plan)}
    return _Model(module, batch, batch_size(batch), precision, step, _optimizer_states(module), tensor_plan, experts)


def batch_size(batch) -> int:
    """The samples in a batch: its first tensor's first dim."""
    tensor = first_tensor(batch)
    if tensor is None:
        raise LayoutError("The planner needs a batch holding tensors (their first dim is the batch size).")
    return tensor.shape[0]


def _optimizer_states(module: nn.Module) -> int:
    """Tensors of optimizer state per parameter element (Adam keeps two)."""
    configured = module.configure_optimizers()
    optimizer = configured
    if isinstance(configured, dict):
        optimizer = configured["optimizer"]
    elif isinstance(configured, (list, tuple)):
        optimizer = configured[0][0] if isinstance(configured[0], (list, tuple)) else configured[0]
        optimizer = optimizer["optimizer"] if isinstance(optimizer, dict) else optimizer
    return optimizer_states(optimizer)


def _check_option(option: Option, model: _Model) -> None:
    if model.global_batch % option.dp:
        raise LayoutError(f"the global batch {model.global_batch} does not divide over dp={option.dp}")
    per_rank = model.global_batch // option.dp
    if option.pp > 1 and per_rank % option.micro_batches:
        raise LayoutError(f"each rank's batch of {per_rank} does not divide into {option.micro_batches} micro-batches")


def _cut(model: _Model, option: Option):
    """The pipeline cut of a run with this option (the same call a run makes), cached."""
    spec = option.schedule_spec
    stages = option.pp * spec.stages_per_rank
    key = (stages, option.micro_batch_count, option.dp)
    if key not in model.cache:
        per_rank = _per_rank_batch(model.batch, option.dp)
        # CPU's rates serve for counting only: the cut needs cost ratios between stages.
        model.cache[key] = cut_stages(model.module, model.step, per_rank, option.pp, spec,
                                      option.micro_batch_count, "auto", CPU)
    return model.cache[key]


def _per_rank_batch(batch, dp: int):
    (first, *_) = split_batch(batch, dp)
    return first


def _tensor_plan(model: _Model, tp: int) -> dict[str, str]:
    if tp == 1:
        return {}
    if tp not in model.plans:
        model.plans[tp] = resolve_plan(model.module, model.tensor_plan, tp)[1]
    return model.plans[tp]


# ----------------------------------------------------------------- memory


def _memory(model: _Model, option: Option, machine: Machine) -> Memory:
    cut = _cut(model, option)
    spec = option.schedule_spec
    plan = _tensor_plan(model, option.tp)
    styles = _parameter_styles(model.module, plan)
    expert_params = {f"{name}.{p}" for name in model.experts for p, _ in model.module.get_submodule(name).named_parameters()}
    params_by_rank = []
    for pp_rank in range(option.pp):
        held = cut.held_names(model.module, stages_of_rank(spec, pp_rank, option.pp) if option.pp > 1 else [0])
        params = [(name, p) for name, p in model.module.named_parameters() if name in held]
        params_by_rank.append(sum(_local_elements(p, styles.get(name), option, name in expert_params)
                                  for name, p in params))
    params = max(params_by_rank)
    trainable = params  # frozen parameters are rare in the models planned; counted as trainable
    dtype_bytes = DTYPE_BYTES[model.precision]
    optimizer = model.optimizer_states * trainable
    optimizer_bytes = optimizer * (4 if model.precision == "bf16-mixed" else dtype_bytes)
    activation_bytes, working = _activation_bytes(model, option, cut, spec, plan)
    return Memory(params, trainable, optimizer, params * dtype_bytes, trainable * dtype_bytes, optimizer_bytes,
                  activation_bytes, working)


def _parameter_styles(module: nn.Module, plan: dict[str, str]) -> dict[str, tuple[str, type]]:
    styles = {}
    for name, style in plan.items():
        sub = module.get_submodule(name)
        for pname, _ in sub.named_parameters(recurse=False):
            styles[f"{name}.{pname}".lstrip(".")] = (canonical(style), type(sub), pname)
    return styles


def _tp_shard_dim(style_entry) -> Optional[int]:
    """The dim DTensor's style shards a parameter along, None if replicated."""
    placement = None if style_entry is None else parameter_placement(*style_entry)
    return placement.dim if isinstance(placement, Shard) else None


def _chunk(size: int, parts: int) -> int:
    """The largest piece torch.chunk (DTensor, FSDP2) cuts `size` into."""
    return -(-size // parts)


def _local_elements(param: torch.Tensor, style_entry, option: Option, expert: bool = False) -> int:
    shape = list(param.shape)
    dim = _tp_shard_dim(style_entry)
    if dim is not None and option.tp > 1 and shape:
        shape[dim] = _chunk(shape[dim], option.tp)
    shards = option.dp if option.sharding == "full" else option.dp_shard if option.sharding == "hybrid" else 1
    if expert:  # 1/ep of the experts, sharded over the ranks holding the same ones
        shape[0], shards = shape[0] // option.ep, option.layout.edp_shard
    if shards > 1 and shape:
        shape[0] = _chunk(shape[0], shards)
    return math.prod(shape)


def _in_flight(spec_name: str, micro_batches: int, pp: int) -> float:
    """Micro-batches of its stage's activations the busiest rank (the first) keeps at once,
    counted in whole-stage equivalents (a virtual stage holds 1/v of a rank's layers)."""
    spec = SCHEDULES[spec_name]
    v = spec.stages_per_rank
    if pp == 1:
        return 1.0
    if spec_name in ("gpipe",):
        return float(micro_batches)
    if spec_name == "looped_bfs":
        return float(micro_batches)  # every micro-batch of each of its stages
    if spec_name == "1f1b":
        return float(min(micro_batches, pp))
    # interleaved and zero-bubble families: warm-up of (v - 1) P + 2 (P - 1) + 1 chunks
    chunks = min(v * micro_batches, (v - 1) * pp + 2 * (pp - 1) + 1)
    return chunks / v


def _activation_bytes(model: _Model, option: Option, cut, spec, plan) -> tuple[float, float]:
    """(activations kept per rank, working set) for the busiest stage."""
    per_rank = _per_rank_batch(model.batch, option.dp)
    micro = per_rank if option.pp == 1 else split_batch(per_rank, option.micro_batches)[0]
    saved, largest_block = _saved_bytes(model, micro, option.activation_checkpointing)
    tp_share = _tp_share(model, plan, option.tp)
    stage_fraction = max(_stage_fraction(cut, spec, r, option.pp) for r in range(option.pp))
    kept = saved * tp_share * stage_fraction * _in_flight(option.schedule, option.micro_batches, option.pp)
    working = largest_block * tp_share if option.activation_checkpointing == "full" else 0.0
    return kept, working


def _stage_fraction(cut, spec, pp_rank: int, pp: int) -> float:
    if pp == 1:
        return 1.0
    costs = cut.stage_costs
    return sum(costs[s] for s in stages_of_rank(spec, pp_rank, pp)) / sum(costs)


# Of a transformer block's saved activations, those inside its tensor-parallel regions
# (attention heads, MLP columns) are split over tp; the norms' and residuals' are not.
_IN_TENSOR_PARALLEL_REGIONS = 0.8


def _tp_share(model: _Model, plan: dict[str, str], tp: int) -> float:
    """Roughly, the share of the activations a tensor-parallel rank keeps."""
    if tp == 1:
        return 1.0
    return _IN_TENSOR_PARALLEL_REGIONS / tp + (1 - _IN_TENSOR_PARALLEL_REGIONS)


@contextmanager
def _counting_saved(totals: dict) -> Iterator[None]:
    def pack(tensor):
        totals["bytes"] += tensor.numel() * tensor.element_size()
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        yield


def _saved_bytes(model: _Model, micro_batch, activation_checkpointing: str) -> tuple[float, float]:
    """Bytes autograd keeps from the forward of one micro-batch (the whole model), and the most
    one trunk block keeps (what full checkpointing recomputes at once)."""
    key = ("saved", activation_checkpointing, batch_size(micro_batch))
    cache = model.cache
    if key in cache:
        return cache[key]
    module = copy.deepcopy(model.module)
    entry_name, args, kwargs = capture_call(module, model.step, micro_batch, 0)
    entry = module.get_submodule(entry_name)
    from lightning_parallel.activation_checkpointing import apply_activation_checkpointing, trunk_blocks

    blocks = trunk_blocks(data_parallel_units(entry))
    per_block: list[float] = []
    if blocks:
        for block in blocks:
            block.register_forward_pre_hook(lambda *_: per_block.append(totals["bytes"]))
            block.register_forward_hook(lambda *_: per_block.append(totals["bytes"]))
    if activation_checkpointing != "none":
        said = logging.getLogger("lightning.pytorch.utilities.rank_zero")  # not the run's start-up note
        level, _ = said.level, said.setLevel(logging.WARNING)
        try:
            apply_activation_checkpointing(blocks, activation_checkpointing)
        finally:
            said.setLevel(level)
    totals = {"bytes": 0}
    with _counting_saved(totals), _on_meta():
        entry(*args, **kwargs)
    spans = [after - before for before, after in zip(per_block[::2], per_block[1::2])]
    if activation_checkpointing == "full" and blocks:
        largest = _saved_bytes(model, micro_batch, "none")[1]
    else:
        largest = max(spans, default=0.0)
    cache[key] = (float(totals["bytes"]), float(largest))
    return cache[key]


@contextmanager
def _on_meta() -> Iterator[None]:
    with torch.device("meta"), _FusedKernels(None):
        yield


class _StepCost(OpCost):
    """The pipeline balancer's op pricing, with views (which move no data) at the overhead alone:
    for the time of a whole step, not only the ratio between stages."""

    def _price(self, func, args, kwargs, out) -> float:
        if func.is_view or func.overloadpacket.__name__ == "_unsafe_view":  # a view that aten does not mark
            return self.hardware.seconds_per_op
        return super()._price(func, args, kwargs, out)


class _FusedKernels(TorchFunctionMode):
    """`scaled_dot_product_attention` as fused kernels run it (flash on GPUs, torch's flash kernel
    on CPU): the S x S scores are never stored. On meta, torch would decompose it into math ops
    that store them, which would count neither the time nor the memory a run spends. Priced by its
    FLOPs and its inputs' and output's bytes; keeps q, k, v and the output for the backward.
    Also the grouped matmul of mixture-of-experts layers (`grouped_mm`, Hugging Face's experts),
    whose meta kernel refuses fp32: priced and kept as one matmul of all the rows."""

    def __init__(self, counter: Optional[OpCost]) -> None:
        super().__init__()
        self.counter = counter

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in (getattr(torch.nn.functional, "grouped_mm", None), getattr(torch, "_grouped_mm", None)):
            return self._grouped_mm(*args[:2])
        if func is not torch.nn.functional.scaled_dot_product_attention:
            return func(*args, **kwargs)
        query, key, value = args[:3]
        if self.counter is not None:
            *batch, heads, length, width = query.shape
            causal = kwargs.get("is_causal", False) or kwargs.get("attn_mask") is not None
            flops = 4 * math.prod(batch) * heads * length * key.shape[-2] * width * (0.5 if causal else 1.0)
            nbytes = sum(t.numel() * t.element_size() for t in (query, key, value, query))
            hw = self.counter.hardware
            self.counter.seconds += max(flops / hw.flops_per_s, nbytes / hw.bytes_per_s) + hw.seconds_per_op
        return _AttentionStandIn.apply(query, key, value)  # the mode is off inside its own handler

    def _grouped_mm(self, rows: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        """rows [N, in] times their groups' weights [groups, in, out]."""
        if self.counter is not None:
            hw = self.counter.hardware
            flops = 2 * rows.shape[0] * rows.shape[1] * weights.shape[-1]
            nbytes = (rows.numel() + weights.numel() + rows.shape[0] * weights.shape[-1]) * rows.element_size()
            self.counter.seconds += max(flops / hw.flops_per_s, nbytes / hw.bytes_per_s) + hw.seconds_per_op
        return _GroupedMatmulStandIn.apply(rows, weights)


class _AttentionStandIn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, query, key, value):
        out = query.new_empty((*query.shape[:-1], value.shape[-1]))
        ctx.save_for_backward(query, key, value, out)
        return out

    @staticmethod
    def backward(ctx, grad):
        query, key, value, _ = ctx.saved_tensors
        return torch.zeros_like(query), torch.zeros_like(key), torch.zeros_like(value)


class _GroupedMatmulStandIn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, rows, weights):
        ctx.save_for_backward(rows, weights)
        return rows.new_empty((rows.shape[0], weights.shape[-1]))

    @staticmethod
    def backward(ctx, grad):
        rows, weights = ctx.saved_tensors
        return torch.zeros_like(rows), torch.zeros_like(weights)


# ----------------------------------------------------------------- step time


def _step_time(model: _Model, option: Option, machine: Machine) -> StepTime:
    cut = _cut(model, option)
    spec = option.schedule_spec
    per_rank = _per_rank_batch(model.batch, option.dp)
    micro = per_rank if option.pp == 1 else split_batch(per_rank, option.micro_batches)[0]
    m = option.micro_batch_count
    on_node = min(option.layout.world_size, machine.devices_per_node)
    micro_seconds = _model_seconds(model, micro, machine, on_node)  # forward + backward of the whole model
    recompute = {"none": 0.0, "selective": 0.1, "full": 1 / 3}[option.activation_checkpointing]
    fractions = [_stage_fraction(cut, spec, r, option.pp) for r in range(option.pp)]
    busiest = max(fractions) * micro_seconds * (1 + recompute) / option.tp
    compute = busiest * m
    bubble = _bubble(option, m) * compute
    tp_time = _tensor_parallel_seconds(model, micro, option, machine) * m * max(fractions)
    sends = _send_seconds(model, cut, option, machine, micro) * m if option.pp > 1 else 0.0
    dp_time = _data_parallel_seconds(model, option, machine, compute)
    dispatch = _expert_dispatch_seconds(model, micro, option, machine) * m * max(fractions)
    return StepTime(compute, bubble, tp_time, sends, dp_time, dispatch)


def _model_seconds(model: _Model, micro_batch, machine: Machine, devices_in_use: int) -> float:
    key = ("seconds", machine.name, devices_in_use, batch_size(micro_batch))
    if key not in model.cache:
        module = copy.deepcopy(model.module)
        entry_name, args, kwargs = capture_call(module, model.step, micro_batch, 0)
        counter = _StepCost(machine.hardware(devices_in_use))
        with counter, _FusedKernels(counter):
            out = module.get_submodule(entry_name)(*args, **kwargs)
        forward = counter.seconds
        model.cache[key] = 3 * forward  # backward costs about twice the forward
    return model.cache[key]


def _bubble(option: Option, m: int) -> float:
    """Idle time of a pipeline as a fraction of its busy time."""
    if option.pp == 1:
        return 0.0
    p, v = option.pp, SCHEDULES[option.schedule].stages_per_rank
    if SCHEDULES[option.schedule].split_backward:
        return (p - 1) / (3 * v * m)  # zero-bubble schedules fill most of it with weight gradients
    return (p - 1) / (v * m)


def _tensor_parallel_seconds(model: _Model, micro_batch, option: Option, machine: Machine) -> float:
    if option.tp == 1:
        return 0.0
    plan = _tensor_plan(model, option.tp)
    rowwise = [name for name, style in plan.items() if canonical(style) in ("rowwise", "embedding_rowwise")]
    bytes_each = _output_bytes(model, micro_batch, rowwise)
    ring = 2 * (option.tp - 1) / option.tp
    per_reduce = [ring * b / machine.intra_node_bytes_per_s + machine.collective_seconds for b in bytes_each]
    return 2 * sum(per_reduce)  # forward outputs, and the matching input gradients in the backward


def _expert_dispatch_seconds(model: _Model, micro_batch, option: Option, machine: Machine) -> float:
    """Each experts module's four all-to-alls (tokens out and results back, forward and backward):
    a token chosen k times travels k times, (ep - 1) / ep of them to other ranks; two small
    exchanges (split sizes, expert ids) before, and the split sizes' read on the host."""
    if option.ep == 1:
        return 0.0
    sizes = _tensor_bytes_at(model, micro_batch, list(model.experts), "dispatched")
    spans_nodes = option.ep * option.tp > machine.devices_per_node
    bandwidth = machine.inter_node_bytes_per_s if spans_nodes else machine.intra_node_bytes_per_s
    moved = sum(sizes) * (option.ep - 1) / option.ep
    return 4 * moved / bandwidth + 6 * len(sizes) * machine.collective_seconds


def _output_bytes(model: _Model, micro_batch, names: list[str]) -> list[float]:
    return _tensor_bytes_at(model, micro_batch, names, "output")


def _input_bytes(model: _Model, micro_batch, names: list[str]) -> list[float]:
    return _tensor_bytes_at(model, micro_batch, names, "input")


def _tensor_bytes_at(model: _Model, micro_batch, names: list[str], where: str) -> list[float]:
    """Bytes of the tensors the named modules take (or return) in a forward of one micro-batch;
    "dispatched": an experts module's hidden states times the experts each token chose."""
    key = (where, tuple(names), batch_size(micro_batch))
    if key not in model.cache:
        module = copy.deepcopy(model.module)
        entry_name, args, kwargs = capture_call(module, model.step, micro_batch, 0)
        found: list[float] = []

        def record(_module, inputs, output=None):
            if where == "dispatched":
                hidden, top_k_index = inputs[:2]
                found.append(hidden.numel() * hidden.element_size() * top_k_index.shape[-1])
                return
            value = inputs if where == "input" else output
            found.append(sum(t.numel() * t.element_size() for t in torch.utils._pytree.tree_leaves(value)
                             if isinstance(t, torch.Tensor)))

        for name in names:
            target = module.get_submodule(name)
            if where in ("input", "dispatched"):
                target.register_forward_pre_hook(record)
            else:
                target.register_forward_hook(record)
        with torch.no_grad(), _FusedKernels(None):
            module.get_submodule(entry_name)(*args, **kwargs)
        model.cache[key] = found
    return model.cache[key]


def _send_seconds(model: _Model, cut, option: Option, machine: Machine, micro_batch) -> float:
    """One micro-batch's activations forward and gradients back across the widest stage boundary."""
    prefix = f"{cut.entry_name}." if cut.entry_name else ""
    firsts = [prefix + owned[0] for owned in cut.plan.owned_modules[1:] if owned]
    sizes = _input_bytes(model, micro_batch, firsts)
    if not sizes:
        return 0.0
    across = option.dp * option.tp >= machine.devices_per_node  # consecutive stages sit on different nodes
    bandwidth = machine.inter_node_bytes_per_s if across else machine.intra_node_bytes_per_s
    return 2 * (max(sizes) / bandwidth + machine.collective_seconds)


def _data_parallel_seconds(model: _Model, option: Option, machine: Machine, compute: float) -> float:
    """Gradient (and, sharded, parameter) traffic that compute does not hide. DDP all-reduces a
    few buckets during the backward; FSDP2 gathers each unit's parameters twice (forward and
    backward) and reduce-scatters its gradients, prefetching the next unit during the current
    one's compute; HSDP adds an all-reduce per unit across replicas. Experts count 1/ep each (their
    reductions span fewer ranks, which is not priced apart)."""
    if option.dp == 1:
        return 0.0
    experts = sum(p.numel() for name in model.experts for p in model.module.get_submodule(name).parameters())
    dense = sum(p.numel() for p in model.module.parameters()) - experts
    params = (dense / option.tp + experts / option.ep) / option.pp  # experts are not split by tp
    grad_bytes = params * (2 if model.precision != "32-true" else 4)
    spans_nodes = option.dp > max(1, machine.devices_per_node // option.tp)
    inter, intra = machine.inter_node_bytes_per_s, machine.intra_node_bytes_per_s
    units = max(1, len(data_parallel_units(model.module)) // option.pp)
    if option.sharding == "none":
        bandwidth = inter if spans_nodes else intra
        traffic = 2 * (option.dp - 1) / option.dp * grad_bytes / bandwidth
        collectives = max(1, math.ceil(grad_bytes / 25e6))  # DDP's 25 MB buckets
        hidden = 0.5 * compute  # the backward's share of the step
    elif option.sharding == "full":
        bandwidth = inter if spans_nodes else intra
        traffic = 3 * (option.dp - 1) / option.dp * grad_bytes / bandwidth
        collectives, hidden = 3 * units, compute
    else:  # hybrid: gathers inside the shard group, gradients all-reduced across replicas
        s, r = option.dp_shard, option.dp // option.dp_shard
        traffic = 3 * (s - 1) / s * grad_bytes / intra + 2 * (r - 1) / r * grad_bytes / s / inter
        collectives, hidden = 4 * units, compute
    waiting = traffic + collectives * machine.collective_seconds
    return max(0.0, waiting - machine.overlap * hidden)


def format_plan(predictions: list[Prediction], top: int = 10) -> str:
    """The ranked layouts as a table: step time, memory per rank, and why a layout is refused."""
    lines = [f"{'#':>3}  {'layout':<58} {'step ms':>9} {'GiB/rank':>9}  params/rank  note"]
    shown = [p for p in predictions if p.fits][:top] + [p for p in predictions if not p.fits][:top]
    for i, p in enumerate(shown, 1):
        step = f"{p.time.total * 1e3:9.1f}" if math.isfinite(p.time.total) else f"{'-':>9}"
        note = (p.refused or "").split("\n")[0]
        note = note if len(note) <= 110 else note[:107] + "..."
        lines.append(f"{i:>3}  {str(p.option):<58} {step} {p.memory.total_bytes / GiB:9.2f}  "
                     f"{p.memory.params:>11,}  {note}")
    return "\n".join(lines)


__all__ = ["MACHINES", "Machine", "Option", "Prediction", "build_on_meta", "candidate_options", "format_plan",
           "batch_size", "meta_copy", "plan", "plan_per_rank_batch", "predict"]
