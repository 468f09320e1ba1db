"""Expert parallelism: the experts of a mixture-of-experts model sharded over data-parallel ranks.

An *experts module* holds every expert of one MoE layer as parameters (its submodules' too) whose
dim 0 is the expert, says how many in `num_experts`, and computes `forward(hidden_states [N, H],
top_k_index [N, k], top_k_weights [N, k]) -> [N, H]`: each token's output is the weighted sum of
its k chosen experts' outputs (Hugging Face's `Qwen3MoeExperts`, `MixtralExperts`, ... and modules
written to match). Which modules are experts: those a Hugging Face model declares
(`base_model_ep_plan` entries of style "ep_dispatch_experts"), or the module-name globs of
`expert_plan`.

Under expert_parallel=E, the E data-parallel ranks of an *ep group* (consecutive dp ranks, each
reading its own batch) each keep 1/E of every experts module's experts: its parameters become
DTensors sharded on dim 0 over the ep dim of the experts' mesh, `num_experts` the local count.
The module's forward is replaced by a dispatch: every (token, chosen expert) pair goes to the rank
owning that expert with an all-to-all (autograd-aware, uneven splits), the rank's experts run on
what arrives (local expert ids, unit weights), the results come back with a second all-to-all and
are weighted and summed per token. No token is dropped, so the model computes what one process
does. Ranks that hold the same experts (edp = dp / E of them) reduce the experts' gradients with
their own FSDP2 group over the experts' mesh (`apply_expert_data_parallel`).

Under tensor parallelism the experts are not split: the tp ranks of a group hold the same batch
and each runs it through its ep group's experts (simple and correct; the experts' work is done tp
times, where a token slice per tp rank and an all-gather after the combine would share it).
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from typing import Optional, Union

import torch
import torch.distributed as dist
import torch.distributed.nn.functional as dist_autograd
from torch import nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
from torch.distributed.tensor import DTensor, Shard, distribute_tensor

from lightning_parallel.layout import Layout, LayoutError
from lightning_parallel.tensor_parallel.plans import matches

DISPATCH_STYLE = "ep_dispatch_experts"  # Hugging Face's name for a module whose tokens are dispatched to experts
ExpertPlan = Union[str, Sequence[str]]


def declared_expert_plan(module: nn.Module) -> Optional[list[str]]:
    """The experts modules a Hugging Face model declares (`_ep_plan` / `config.base_model_ep_plan`,
    entries of style "ep_dispatch_experts"), as globs relative to `module`."""
    for path, sub in module.named_modules():
        plan = getattr(sub, "_ep_plan", None) or getattr(getattr(sub, "config", None), "base_model_ep_plan", None)
        if isinstance(plan, dict) and plan:
            prefix = f"{path}." if path else ""
            return [prefix + glob for glob, style in plan.items() if style == DISPATCH_STYLE]
    return None


def check_expert_plan(expert_plan: ExpertPlan) -> None:
    """Refuses an expert_plan that is neither "auto" nor a list of module-name globs."""
    if expert_plan == "auto":
        return
    if isinstance(expert_plan, str) or not isinstance(expert_plan, Sequence) or not all(
            isinstance(glob, str) for glob in expert_plan):
        raise LayoutError(f"expert_plan must be 'auto' (the model's declared experts) or a list of module-name globs "
                          f"such as ['blocks.*.moe.experts'], got {expert_plan!r}.")


def find_experts(module: nn.Module, expert_plan: ExpertPlan = "auto") -> list[str]:
    """The names of the experts modules in `module` (none for a dense model under "auto"), each
    checked against the contract in the module's docstring."""
    check_expert_plan(expert_plan)
    globs = (declared_expert_plan(module) or []) if expert_plan == "auto" else list(expert_plan)
    modules = [name for name, _ in module.named_modules() if name]
    found: list[str] = []
    for glob in globs:
        hits = [name for name in modules if matches(glob, name)]
        if not hits and expert_plan != "auto":
            raise LayoutError(f"expert_plan entry {glob!r} matches no module of the model. A '*' stands for exactly "
                              "one part of a dotted module name (e.g. 'blocks.*.moe.experts').")
        found += [name for name in hits if name not in found]
    for name in found:
        _check_contract(name, module.get_submodule(name))
    return found


def _check_contract(name: str, experts: nn.Module) -> None:
    count = getattr(experts, "num_experts", None)
    if isinstance(count, bool) or not isinstance(count, int) or count < 1:
        raise LayoutError(f"{name} ({type(experts).__name__}) is named as an experts module but has no num_experts "
                          f"(an int, the number of experts it holds; got {count!r}). Give it one, or leave it out of "
                          "expert_plan.")
    params = list(experts.named_parameters())
    wrong = [f"{n} {tuple(p.shape)}" for n, p in params if p.dim() < 2 or p.shape[0] != count]
    if not params or wrong:
        raise LayoutError(f"{name} ({type(experts).__name__}, num_experts={count}): every parameter of an experts "
                          f"module must hold one slice per expert on dim 0 (shape [{count}, ...]); "
                          f"{'these do not: ' + ', '.join(wrong) if wrong else 'it has none'}. Keep the router and "
                          "shared experts outside the experts module.")


def check_expert_parallel(module: nn.Module, names: list[str], ep: int, expert_plan: ExpertPlan) -> None:
    """Refusals that depend on the model, raised on every rank before any collective."""
    if ep == 1:
        return
    if not names:
        source = ("declares no experts (no base_model_ep_plan with 'ep_dispatch_experts' entries)"
                  if expert_plan == "auto" else f"has no module matching expert_plan={list(expert_plan)}")
        raise LayoutError(f"expert_parallel={ep}, but {type(module).__name__} {source}. Name your experts modules with "
                          "expert_plan=['blocks.*.moe.experts'] (module-name globs), or set expert_parallel=1.")
    for name in names:
        count = module.get_submodule(name).num_experts
        if count % ep:
            raise LayoutError(f"{name} holds {count} experts, which do not divide over expert_parallel={ep}: each ep "
                              f"rank keeps the same number of experts. Choose an expert_parallel that divides {count}.")


def apply_expert_parallel(module: nn.Module, names: list[str], ep_mesh: DeviceMesh) -> None:
    """Keeps this rank's slice of each experts module's experts (DTensors sharded on dim 0 over
    `ep_mesh`, from real or meta tensors alike) and dispatches its tokens."""
    for name in names:
        experts = module.get_submodule(name)
        for owner, param_name, param in _parameter_slots(experts):
            # Every rank holds the same full value (or none, on meta): each keeps its chunk, no communication.
            sharded = distribute_tensor(param.data, ep_mesh, [Shard(0)], src_data_rank=None)
            owner.register_parameter(param_name, nn.Parameter(sharded, requires_grad=param.requires_grad))
        experts.num_experts //= ep_mesh.size()
        experts.forward = ExpertDispatch(experts, ep_mesh.get_group())


def _parameter_slots(experts: nn.Module) -> list[tuple[nn.Module, str, nn.Parameter]]:
    """(owning module, name, parameter) of every parameter under `experts`: a submodule's too
    (Ergo's per-expert post_expert_norm)."""
    return [(owner, name, param) for owner in experts.modules() for name, param in owner._parameters.items()
            if param is not None]


def expert_data_parallel_mesh(expert_mesh: DeviceMesh, layout: Layout) -> DeviceMesh:
    """The experts' FSDP2 mesh: the ranks holding the same experts, 1-D (shard) when nothing is
    replicated, else 2-D (replicate, shard), as data_parallel_mesh is for the dense parameters."""
    replicate = layout.edp // layout.edp_shard
    return expert_mesh["edp_shard"] if replicate == 1 else expert_mesh["edp_replicate", "edp_shard"]


def apply_expert_data_parallel(module: nn.Module, names: list[str], edp_mesh: DeviceMesh, mp_policy: MixedPrecisionPolicy,
                               reshard_after_forward: bool = True) -> None:
    """Each experts module its own FSDP2 group over the ranks that hold the same experts
    (before the dense units claim their parameters)."""
    for name in names:
        fully_shard(module.get_submodule(name), mesh=edp_mesh, mp_policy=mp_policy,
                    reshard_after_forward=reshard_after_forward)


class ExpertDispatch:
    """The forward of an expert-parallel experts module (see the module's docstring). Gradients
    of the experts' parameters are divided by the ep degree here: they sum the contributions of
    the ep group's batches (the all-to-all's backward brings them back), and FSDP2 averages over
    the edp ranks only, so dp = ep x edp batches make the mean one process computes. (FSDP2's
    set_gradient_divide_factor would need sum reductions on gloo, which divide twice where a
    shard group has one rank, as under sharding="none", in torch 2.13.)"""

    def __init__(self, experts: nn.Module, group) -> None:
        self.experts = experts
        self.local_forward = experts.forward  # the module's own forward, run on local experts
        self.group = group
        self.ep = dist.get_world_size(group)

    # Compiled blocks run the dispatch eagerly (a graph break): its split sizes are data on the host.
    @torch.compiler.disable
    def __call__(self, hidden_states: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor):
        tokens, k = hidden_states.shape[0], top_k_index.shape[1]
        local_count = self.experts.num_experts
        expert_of_pair = top_k_index.reshape(-1)  # pair p is (token p // k, its p % k-th choice)
        order = torch.argsort(expert_of_pair, stable=True)  # pairs grouped by expert, so by owner
        owner = expert_of_pair[order] // local_count
        send = torch.bincount(owner, minlength=self.ep)
        recv = torch.empty_like(send)
        dist.all_to_all_single(recv, send, group=self.group)
        # Dropless dispatch must know how many rows it receives before it can receive them: the
        # split sizes are read on the host, once per layer and step (a sync that is inherent here).
        send_sizes, recv_sizes = torch.stack([send, recv]).tolist()
        local_ids = expert_of_pair[order] - owner * local_count
        arrived_ids = local_ids.new_empty(sum(recv_sizes))
        dist.all_to_all_single(arrived_ids, local_ids, recv_sizes, send_sizes, group=self.group)
        arrived = _all_to_all(hidden_states[order // k], recv_sizes, send_sizes, self.group)
        results = _all_to_all(self._run_local(arrived, arrived_ids), send_sizes, recv_sizes, self.group)
        per_choice = results[torch.argsort(order)].view(tokens, k, -1)
        return (per_choice * top_k_weights.unsqueeze(-1).to(per_choice.dtype)).sum(dim=1).to(hidden_states.dtype)

    def _run_local(self, arrived: torch.Tensor, arrived_ids: torch.Tensor) -> torch.Tensor:
        """This rank's experts on the rows that arrived, with the module's own forward."""
        if arrived.shape[0] == 0:
            # Nothing arrived, but the experts' parameters (and the empty rows, whose all-to-all
            # backward every rank joins) must stay in the graph: FSDP2 reduces gradients only
            # for parameters that got one, and the ranks must agree on which.
            row, ids = arrived.sum(dim=0, keepdim=True), arrived_ids.new_zeros(1, 1)
            return self._local_forward(row, ids, row.new_ones(1, 1))[:0]
        return self._local_forward(arrived, arrived_ids.unsqueeze(1), arrived.new_ones(arrived.shape[0], 1))

    def _local_forward(self, hidden_states, top_k_index, top_k_weights):
        sharded = [slot for slot in _parameter_slots(self.experts) if isinstance(slot[2], DTensor)]
        try:
            for owner, name, param in sharded:
                local = param.to_local()
                if local.requires_grad:
                    local.register_hook(lambda grad: grad / self.ep)
                owner._parameters[name] = local
            return self.local_forward(hidden_states, top_k_index, top_k_weights)
        finally:
            for owner, name, param in sharded:
                owner._parameters[name] = param


def _all_to_all(tensor: torch.Tensor, output_sizes: list[int], input_sizes: list[int], group) -> torch.Tensor:
    """Rows to the ep ranks (`input_sizes` to each, `output_sizes` from each), differentiable."""
    output = tensor.new_empty(sum(output_sizes), *tensor.shape[1:])
    with warnings.catch_warnings():
        # Deprecated in torch 2.13 for the functional collectives, whose autograd version is private.
        warnings.simplefilter("ignore", FutureWarning)
        return dist_autograd.all_to_all_single(output, tensor.contiguous(), output_sizes, input_sizes, group=group)
