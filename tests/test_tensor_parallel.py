"""Tensor parallelism (alone and with data parallelism) matches one process."""

import pytest

from lightning_parallel import parity
from lightning_parallel.tensor_parallel.plans import expand
from tests.harness import reference, run, shared_run
from tests.models import GPT_PLAN, GPT_SP_PLAN, tiny_gpt

GPT = dict(model="tests.models:tiny_gpt", data="tests.models:token_data", batch_size=8, max_steps=4)
MLP = dict(
    model="tests.models:ResidualMLP",
    model_kwargs={"optimizer": "sgd", "lr": 0.1},
    data="tests.models:regression_data",
    batch_size=8,
    max_steps=6,
)
LLAMA = dict(model="tests.models:TinyLlama", data="tests.models:token_data", batch_size=8, max_steps=4)


def expected_elements(module, plan, tp, sharded_over=1):
    """Parameter elements one rank should hold: layers in the plan hold 1/tp of their weights
    (a rowwise layer's bias is added after the sum, so it stays whole)."""
    styles = expand(plan, module)
    held = 0
    for name, sub in module.named_modules():
        for pname, param in sub.named_parameters(recurse=False):
            whole = name not in styles or (styles[name].startswith("rowwise") and pname == "bias")
            held += param.numel() if whole else param.numel() // tp
    return held / sharded_over


def test_tp2_gpt_explicit_plan():
    ref = reference(GPT)
    par = shared_run({**GPT, "devices": 2, "strategy": {"tensor_parallel": 2, "tensor_plan": GPT_PLAN}})
    parity.assert_parity(ref, par)
    assert par["elements_held"] == [expected_elements(tiny_gpt(), GPT_PLAN, 2)] * 2
    assert par["summary_total_params"] == ref["summary_total_params"]
    assert "Tensor-parallel plan (given), tp=2:\n  tok_emb: embedding_rowwise\n  blocks.*.attn.q_proj: colwise" in par["output"]


@pytest.mark.parametrize("sharding", ["none", "full"])
def test_dp2_tp2_gpt(sharding):
    ref = reference(GPT)
    strategy = {"data_parallel": 2, "tensor_parallel": 2, "sharding": sharding, "tensor_plan": GPT_PLAN}
    par = run({**GPT, "devices": 4, "strategy": strategy})
    parity.assert_parity(ref, par)
    per_rank = expected_elements(tiny_gpt(), GPT_PLAN, 2, sharded_over=2 if sharding == "full" else 1)
    for held in par["elements_held"]:
        assert abs(held - per_rank) <= 0.02 * per_rank, (par["elements_held"], per_rank)


def test_tp2_sequence_parallel():
    ref = reference(GPT)
    strategy = {"tensor_parallel": 2, "tensor_plan": GPT_SP_PLAN, "sequence_parallel": True}
    parity.assert_parity(ref, run({**GPT, "devices": 2, "strategy": strategy}))


def test_tp2_loss_parallel():
    ref = reference(GPT)
    strategy = {"tensor_parallel": 2, "tensor_plan": GPT_PLAN, "loss_parallel": True}
    parity.assert_parity(ref, run({**GPT, "devices": 2, "strategy": strategy}))


def test_tp2_hugging_face_llama_declared_plan():
    pytest.importorskip("transformers")
    ref = reference(LLAMA)
    par = run({**LLAMA, "devices": 2, "strategy": {"tensor_parallel": 2}})
    parity.assert_parity(ref, par)
    assert "Tensor-parallel plan (declared by the model), tp=2:" in par["output"]
    assert "model.layers.*.self_attn.k_proj: colwise" in par["output"]
    # Attention, MLP, embedding and head are split: each rank holds about half the model.
    total = ref["elements_held"][0]
    assert all(0.5 * total <= held <= 0.52 * total for held in par["elements_held"]), par["elements_held"]


def test_tp2_inferred_plan_with_binding_clip():
    case = {**MLP, "trainer": {"gradient_clip_val": 0.05}}
    ref = reference(case)
    par = run({**case, "devices": 2, "strategy": {"tensor_parallel": 2}})
    parity.assert_parity(ref, par)
    assert "Tensor-parallel plan (inferred), tp=2:\n  blocks.*.1: colwise\n  blocks.*.3: rowwise" in par["output"]
    # The clip value binds: unclipped, the same run trains differently.
    assert reference(MLP)["losses"][-1] != pytest.approx(ref["losses"][-1], rel=1e-2)


def test_module_written_for_model_parallel_strategy():
    case = {**GPT, "model": "tests.models:self_parallel_gpt", "devices": 2}
    lightning = run({**case, "strategy": {
        "class": "lightning.pytorch.strategies:ModelParallelStrategy", "data_parallel_size": 1, "tensor_parallel_size": 2}})
    hybrid = run({**case, "strategy": {"tensor_parallel": 2}})
    parity.assert_parity(lightning, hybrid)
    parity.assert_parity(reference(GPT), hybrid)
    assert "applied its own parallelism in configure_model" in hybrid["output"]
