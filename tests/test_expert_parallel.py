"""Expert parallelism: mixture-of-experts layers with their experts sharded over data-parallel
ranks train as one process does (with SGD, whose steps show a wrongly scaled expert gradient,
which AdamW's would hide), checkpoints reshard between ep degrees, and bad layouts are refused."""

import pytest
import torch

from lightning_parallel import HybridParallel, Layout, LayoutError, parity, planner
from lightning_parallel.expert_parallel import check_expert_parallel, find_experts
from lightning_parallel.report import Held, startup_report
from tests.harness import defaults_on, ranks_reporting, reference, report_rows, run, shared_run
from tests.moe_models import (MOE_GPT_PLAN, MOE_NOT_BUILT, USER_EXPERTS, Experts, SGDCausalLM, declared_moe_families,
                              moe_family_kwargs, moe_gpt)

BASE = dict(data="tests.models:token_data", batch_size=8, max_steps=6)
# With Lightning's defaults on (progress bar, summary, logger, ModelCheckpoint saving at the last step).
QWEN = defaults_on(dict(BASE, model="tests.moe_models:SGDCausalLM", model_kwargs={"family": "qwen3_moe"}))
MIXTRAL = defaults_on(dict(BASE, model="tests.moe_models:SGDCausalLM", model_kwargs={"family": "mixtral"}))
USER = defaults_on(dict(BASE, model="tests.moe_models:moe_gpt", model_kwargs={"optimizer": "sgd", "lr": 0.5}))


def expert_elements(model) -> int:
    return sum(p.numel() for name in find_experts(model) for p in model.get_submodule(name).parameters())


def test_hugging_face_experts_are_found_by_their_declared_plan():
    for family in ("qwen3_moe", "mixtral"):
        names = find_experts(SGDCausalLM(family))
        assert names == [f"model.model.layers.{i}.mlp.experts" for i in range(4)], family
    assert find_experts(moe_gpt()) == []  # "auto": a user's model declares nothing
    assert find_experts(moe_gpt(), USER_EXPERTS) == ["blocks.0.mlp.experts", "blocks.1.mlp.experts"]


QWEN_EP2 = {**QWEN, "devices": 2, "strategy": {"data_parallel": 2, "expert_parallel": 2}}


def test_qwen3_moe_ep2_matches_one_process_holding_half_the_experts():
    spec = QWEN_EP2
    par = shared_run(spec)
    print(parity.assert_parity(reference(spec), par))
    model = SGDCausalLM("qwen3_moe")
    whole, experts = sum(p.numel() for p in model.parameters()), expert_elements(model)
    # sharding="none": the dense parameters whole on each rank, half the experts.
    assert par["elements_held"] == [whole - experts // 2] * 2
    rows = report_rows(par["output"])
    assert [(r["dp"], r["ep"], r["experts"]) for r in rows] == [(0, 0, "0-1"), (1, 1, "2-3")]
    assert "pp=1 x dp=2 (experts over ep=2 x edp=1) x tp=1" in par["output"]


# Run by `make test`: latent attention with shared experts and grouped routing (deepseek_v3), experts
# with biases (gpt_oss), a per-expert norm inside the experts module (ergo), a gated shared expert
# (qwen2_moe), experts under another path (granitemoe, nemotron_h's hybrid mamba layers).
UNMARKED_FAMILIES = {"deepseek_v3", "gpt_oss", "ergo", "qwen2_moe", "granitemoe", "nemotron_h"}


@pytest.mark.parametrize("family", [pytest.param(f, marks=() if f in UNMARKED_FAMILIES else pytest.mark.slow)
                                    for f in declared_moe_families()])
def test_each_hugging_face_moe_family_trains_under_ep2_as_one_process(family):
    """Every family the installed transformers ships with declared experts, a new release's too."""
    if family in MOE_NOT_BUILT:
        pytest.skip(f"{family} is not built tiny here: {MOE_NOT_BUILT[family]}")
    spec = {**QWEN_EP2, "model_kwargs": moe_family_kwargs(family)}
    par = run(spec)
    print(family, parity.assert_parity(reference(spec), par))
    model = SGDCausalLM(**moe_family_kwargs(family))
    whole, experts = sum(p.numel() for p in model.parameters()), expert_elements(model)
    assert experts and par["elements_held"] == [whole - experts // 2] * 2  # every expert tensor halved


def test_the_planner_predicts_what_an_ep_rank_holds_and_offers_ep_for_experts_only():
    from tests.test_planner import model_and_batch

    module, batch = model_and_batch(QWEN_EP2)
    predicted = planner.predict(module, batch, planner.Option(dp=2, ep=2), planner.MACHINES["cpu"])
    measured = shared_run(QWEN_EP2)
    assert predicted.memory.params == max(measured["elements_held"])
    assert predicted.memory.optimizer == 0  # SGD without momentum
    assert predicted.option.arguments()["expert_parallel"] == 2
    options = list(planner.candidate_options(4, 8, 4, experts=[4, 4]))
    assert {o.ep for o in options if o.dp == 4} == {1, 2, 4} and {o.ep for o in options if o.dp == 2} == {1, 2}
    assert {o.ep for o in planner.candidate_options(4, 8, 4)} == {1}


SLOW = pytest.mark.slow


# make test runs one case of each composition (clipping, hybrid, tp, pp); make test-slow the rest.
@pytest.mark.parametrize("spec", [
    pytest.param({**QWEN, "devices": 2, "strategy": {"data_parallel": 2, "expert_parallel": 2, "sharding": "full"}},
                 id="qwen3_moe_dp2_full", marks=SLOW),
    pytest.param({**USER, "devices": 2, "trainer": {**USER["trainer"], "gradient_clip_val": 0.5},
                  "strategy": {"data_parallel": 2, "expert_parallel": 2, "sharding": "full", "expert_plan": USER_EXPERTS}},
                 id="user_moe_dp2_full_clipped"),  # the global norm counts each expert's gradient once
    pytest.param({**USER, "devices": 2, "strategy": {"data_parallel": 2, "expert_parallel": 2, "sharding": "full",
                                                     "expert_plan": USER_EXPERTS, "compile": True,
                                                     "activation_checkpointing": "full"}},
                 id="user_moe_dp2_full_compile_ac", marks=SLOW),  # the dispatch runs outside the compiled graph, twice
    pytest.param({**MIXTRAL, "devices": 4, "strategy": {"data_parallel": 2, "tensor_parallel": 2, "expert_parallel": 2,
                                                        "sharding": "full"}}, id="mixtral_ep2_tp2_declared_plan"),
    pytest.param({**USER, "devices": 4, "strategy": {"data_parallel": 2, "tensor_parallel": 2, "expert_parallel": 2,
                                                     "expert_plan": USER_EXPERTS, "tensor_plan": MOE_GPT_PLAN}},
                 id="user_moe_ep2_tp2", marks=SLOW),
    pytest.param({**QWEN, "devices": 4, "strategy": {"data_parallel": 4, "expert_parallel": 2, "sharding": "hybrid",
                                                     "data_parallel_shard": 2}}, id="qwen3_moe_dp4_hybrid"),
    pytest.param({**QWEN, "devices": 4, "strategy": {"pipeline_parallel": 2, "data_parallel": 2, "expert_parallel": 2,
                                                     "micro_batches": 2}}, id="qwen3_moe_pp2_dp2_ep2_declared_stages"),
    pytest.param({**USER, "model_kwargs": {**USER["model_kwargs"], "n_layers": 4}, "devices": 4,
                  "strategy": {"pipeline_parallel": 2, "data_parallel": 2, "expert_parallel": 2, "sharding": "full",
                               "expert_plan": USER_EXPERTS, "micro_batches": 2, "schedule": "zbv"}},
                 id="user_moe_pp2_dp2_ep2_zbv", marks=SLOW),
])
def test_expert_parallel_matches_one_process(spec):
    print(parity.assert_parity(reference(spec), run(spec)))


@pytest.mark.parametrize("devices, strategy", [
    pytest.param(1, {}, id="ep2_to_one_process", marks=SLOW),
    pytest.param(4, {"data_parallel": 4, "expert_parallel": 4, "expert_plan": USER_EXPERTS}, id="ep2_to_dp4_ep4"),
])
def test_a_checkpoint_saved_under_ep2_resumes_under_another_layout(tmp_path, devices, strategy):
    """Saved at the first epoch's end (8 steps) under dp=2 x ep=2 fully sharded, AdamW's state
    included; the second epoch, resumed with the experts whole or one per rank, continues the
    uninterrupted run."""
    epochs = dict(BASE, model="tests.moe_models:moe_gpt", max_steps=-1)
    path = str(tmp_path / "ep2.ckpt")
    uninterrupted = reference({**epochs, "trainer": {"max_epochs": 2}})
    first = run({**epochs, "trainer": {"max_epochs": 1}, "devices": 2, "save_to": path,
                 "strategy": {"data_parallel": 2, "expert_parallel": 2, "sharding": "full", "expert_plan": USER_EXPERTS}})
    second = run({**epochs, "trainer": {"max_epochs": 2}, "devices": devices, "strategy": strategy, "resume_from": path})
    parity.assert_losses_close(uninterrupted["losses"][:8], first["losses"])
    print(parity.assert_parity({**uninterrupted, "losses": uninterrupted["losses"][8:]}, second))


@pytest.mark.slow
def test_experts_built_empty_are_equal_where_replicated_and_distinct_across_ep_ranks():
    """dp=4 x ep=2, sharding none: ranks 0 and 2 (ep coordinate 0) hold the same experts, as do
    1 and 3; each pair initialized its own (one rank's draws, broadcast over edp)."""
    record = run({**USER, "devices": 4, "build": "empty", "callbacks": ["tests.probes:InitRecord"],
                  "strategy": {"data_parallel": 4, "expert_parallel": 2, "expert_plan": USER_EXPERTS}})
    assert not any(t.isnan().any() for t in record["init_full"].values())
    sums = [tensors for _, tensors in record["init_ranks"]]
    experts = [name for name in sums[0] if ".experts." in name]
    assert experts
    for name in experts:
        assert sums[0][name] == sums[2][name] and sums[1][name] == sums[3][name], name
        assert sums[0][name] != sums[1][name], name


def test_the_router_aux_loss_of_two_halves_is_not_the_whole_batchs():
    """Why Hugging Face MoE models with output_router_logits=True differ from one process under
    data parallelism: the load-balancing loss multiplies two means over the batch (tokens sent
    to each expert, router probability of each), and each rank computes it from its own batch."""
    from transformers.models.qwen3_moe.modeling_qwen3_moe import load_balancing_loss_func

    torch.manual_seed(0)
    layers = [torch.randn(16, 4) for _ in range(2)]  # router logits of 16 tokens in 2 layers
    whole = load_balancing_loss_func(tuple(layers), 4, 2)
    halves = [load_balancing_loss_func(tuple(logits[half * 8:(half + 1) * 8] for logits in layers), 4, 2)
              for half in (0, 1)]
    assert not torch.allclose(whole, sum(halves) / 2, rtol=1e-3)


# ----------------------------------------------------------------------------------- refusals


def test_expert_parallel_must_divide_the_data_parallel_degree():
    with pytest.raises(LayoutError, match=r"expert_parallel=3 does not divide the data-parallel degree 4: experts are "
                                          r"sharded over groups of expert_parallel data-parallel ranks"):
        Layout.resolve(4, "auto", 1, 1, expert_parallel=3)
    with pytest.raises(LayoutError, match=r"expert_parallel=4 and data_parallel_shard=3: under sharding='hybrid' one "
                                          r"must divide the other"):
        Layout.resolve(12, "auto", 1, 1, sharding="hybrid", data_parallel_shard=3, expert_parallel=4)
    with pytest.raises(LayoutError, match=r"expert_parallel must be >= 1, got 0"):
        HybridParallel(expert_parallel=0)
    layout = Layout.resolve(8, 4, 2, 1, sharding="hybrid", data_parallel_shard=4, expert_parallel=2)
    assert (layout.edp, layout.edp_shard) == (2, 2)  # an ep group inside each shard group


@pytest.mark.parametrize("kwargs, message", [
    ({"expert_parallel": 2, "sequence_parallel": True}, r"expert_parallel does not work with sequence_parallel=True"),
    ({"expert_plan": "blocks.*.experts"}, r"expert_plan must be 'auto' .* or a list of module-name globs"),
])
def test_bad_expert_arguments_fail_in_the_constructor(kwargs, message):
    with pytest.raises(LayoutError, match=message):
        HybridParallel(**kwargs)


def test_models_without_fitting_experts_are_refused():
    dense = moe_gpt()
    with pytest.raises(LayoutError, match=r"expert_parallel=2, but MoEGPT declares no experts .* Name your experts "
                                          r"modules with expert_plan="):
        check_expert_parallel(dense, find_experts(dense), 2, "auto")
    with pytest.raises(LayoutError, match=r"expert_plan entry 'blocks.\*.moe.experts' matches no module"):
        find_experts(dense, ["blocks.*.moe.experts"])
    with pytest.raises(LayoutError, match=r"blocks.0.mlp.experts holds 4 experts, which do not divide over "
                                          r"expert_parallel=3"):
        check_expert_parallel(dense, find_experts(dense, USER_EXPERTS), 3, USER_EXPERTS)
    with pytest.raises(LayoutError, match=r"blocks.0.mlp \(MoE\) is named as an experts module but has no num_experts"):
        find_experts(dense, ["blocks.*.mlp"])
    dense.blocks[0].mlp.experts.scale = torch.nn.Parameter(torch.ones(8))
    with pytest.raises(LayoutError, match=r"every parameter of an experts module must hold one slice per expert on dim "
                                          r"0 \(shape \[4, ...\]\); these do not: scale \(8,\)"):
        find_experts(dense, USER_EXPERTS)


def test_the_report_shows_each_ranks_ep_coordinate_and_experts():
    ranks = [("a", 0, [0, 0, r, 0]) for r in range(4)]
    lines = startup_report(Layout(pp=1, dp=4, tp=1, dp_shard=4, ep=2), ranks, [Held()] * 4,
                           experts_per_layer=[8, 8]).splitlines()
    assert lines[0] == "HybridParallel layout pp=1 x dp=4 (experts over ep=2 x edp=2) x tp=1 on 4 processes"
    assert lines[1].split()[4:8] == ["dp", "tp", "ep", "experts"]
    assert [line.split()[4:8] for line in lines[2:6]] == [["0", "0", "0", "0-3"], ["1", "0", "1", "4-7"],
                                                         ["2", "0", "0", "0-3"], ["3", "0", "1", "4-7"]]


def _dispatch(rank: int, port: int, results) -> None:
    """Rank `rank` of 2: its tokens all choose experts 0 and 1, which rank 0 holds; rank 1 receives none."""
    import copy
    import os

    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh

    from lightning_parallel.expert_parallel import apply_expert_parallel

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=2)
    torch.manual_seed(0)
    holder = torch.nn.Module()
    holder.experts = Experts(4, 8, 16)
    whole = copy.deepcopy(holder.experts)
    apply_expert_parallel(holder, ["experts"], init_device_mesh("cpu", (2,), mesh_dim_names=("ep",)))
    torch.manual_seed(1 + rank)
    hidden = torch.randn(5, 8)
    chosen = torch.stack([torch.randperm(2) for _ in range(5)])
    weights = torch.rand(5, 2).softmax(dim=-1)
    outputs, grads = [], []
    for module in (holder.experts, whole):
        x = hidden.clone().requires_grad_()
        out = module(x, chosen, weights)
        out.square().sum().backward()
        outputs.append(out.detach())
        grads.append(x.grad)
    for param in whole.parameters():
        dist.all_reduce(param.grad)  # both ranks' tokens, summed
    expected = torch.cat([p.grad[2 * rank:2 * rank + 2].flatten() / 2 for p in whole.parameters()])
    held = torch.cat([p.grad.to_local().flatten() for p in holder.experts.parameters()])
    results[rank] = (outputs, grads, expected, held, holder.experts.num_experts)
    dist.destroy_process_group()


def test_tokens_reach_their_experts_and_gradients_come_back(tmp_path):
    """The dispatch alone, on 2 processes: outputs and input gradients as the whole experts module
    gives them; each rank's expert gradients the mean over both ranks' tokens (ep=2), zeros on the
    rank that received no token (it still joins the all-to-alls' backward)."""
    import socket

    import torch.multiprocessing as mp

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    results = mp.Manager().dict()
    mp.start_processes(_dispatch, args=(port, results), nprocs=2, start_method="spawn")
    for rank in (0, 1):
        (out, whole_out), (grad, whole_grad), expected, held, local_count = results[rank]
        torch.testing.assert_close(out, whole_out)
        torch.testing.assert_close(grad, whole_grad)
        torch.testing.assert_close(held, expected)
        assert local_count == 2
    assert results[1][3].abs().sum() == 0 and results[0][3].abs().sum() > 0


def test_a_moe_model_under_ddp_that_leaves_parameters_without_gradients_gets_the_fix():
    """DeepSeek-V4 leaves some parameters out of every step: torch's DDP (dp=2, sharding="none")
    refuses that from the second step; the error names the cause and the fixes on every rank."""
    spec = {**QWEN_EP2, "model_kwargs": moe_family_kwargs("deepseek_v4"), "strategy": {"data_parallel": 2}}
    with pytest.raises(RuntimeError) as failure:
        run(spec)
    assert ranks_reporting(str(failure.value), "Under sharding='none' without tensor or pipeline parallelism") == {0, 1}
    assert "Fix: sharding='full' or 'hybrid'" in str(failure.value)
