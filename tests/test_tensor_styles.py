"""Every tensor-parallel style transformers registers is mapped onto DTensor styles or refused
with its reason, and the families whose declared plans use the new ones train as one process."""

import pytest
from torch import nn
from torch.distributed.tensor import Replicate, Shard
from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel

from lightning_parallel import LayoutError, parity
from lightning_parallel.tensor_parallel import resolve_plan
from lightning_parallel.tensor_parallel.styles import (
    REFUSED,
    STYLES,
    canonical,
    check_style,
    make_style,
    parameter_placement,
    replicate_with_gradient_sum,
    sum_rotary_key_gradient,
)
from tests.harness import defaults_on, reference, run

transformers = pytest.importorskip("transformers")

HF = defaults_on(dict(model="tests.hf_models:HFCausalLM", data="tests.models:token_data", batch_size=8, max_steps=4))
# Where each mapped style puts a Linear's (or an Embedding's) weight on the tp mesh.
MAPPED = {
    "colwise": (ColwiseParallel, nn.Linear, Shard(0)),
    "colwise_rep": (ColwiseParallel, nn.Linear, Shard(0)),
    "colwise_gather_output": (ColwiseParallel, nn.Linear, Shard(0)),
    "unit_colwise": (ColwiseParallel, nn.Linear, Shard(0)),
    "rowwise": (RowwiseParallel, nn.Linear, Shard(1)),
    "rowwise_rep": (RowwiseParallel, nn.Linear, Shard(1)),
    "rowwise_split_input": (RowwiseParallel, nn.Linear, Shard(1)),
    "unit_rowwise": (RowwiseParallel, nn.Linear, Shard(1)),
    "embedding_rowwise": (RowwiseParallel, nn.Embedding, Shard(0)),
    "embedding_colwise": (ColwiseParallel, nn.Embedding, Shard(1)),
    "replicated_with_grad_allreduce": (replicate_with_gradient_sum, nn.LayerNorm, Replicate()),
    "replicate": (None, nn.Embedding, None),
    "mla_kv_a_proj": (None, nn.Linear, None),  # a function of the rotary width; the weight stays whole
}
# DeepSeek-V3 with multi-head latent attention: layer 0 dense, layers 1-3 mixtures of experts.
DEEPSEEK = dict(family="deepseek_v3", q_lora_rank=16, kv_lora_rank=16, qk_rope_head_dim=4, head_dim=4,
                qk_nope_head_dim=4, v_head_dim=8, n_routed_experts=4, num_experts_per_tok=2, moe_intermediate_size=16,
                first_k_dense_replace=1, n_group=1, topk_group=1)


def registered_styles() -> list[str]:
    import transformers.distributed.expert_parallel  # noqa: F401 (registers the expert-parallel styles)
    import transformers.distributed.tensor_parallel  # noqa: F401
    from transformers.distributed.parallel_utils import ALL_PARALLEL_STYLES

    return sorted(ALL_PARALLEL_STYLES.keys())


def test_every_style_transformers_registers_is_mapped_or_refused():
    styles = registered_styles()
    assert "replicated_with_grad_allreduce" in styles and "grouped_gemm" in styles
    for style in styles:
        if style in REFUSED:
            with pytest.raises(LayoutError, match=rf"style '{style}' for 'layers.\*.x': .* Fix: "):
                check_style("layers.*.x", style, "SomeForCausalLM (model_type='some')")
            continue
        assert canonical(style) in STYLES, f"{style} is neither mapped nor refused"
        if style in ("sequence_parallel",):  # ours already: needs HybridParallel(sequence_parallel=True)
            continue
        kind, module_type, placement = MAPPED[style]
        made = make_style(style, sequence_parallel=False, rotary_dim=4)
        if style == "mla_kv_a_proj":
            assert made.func is sum_rotary_key_gradient and made.keywords == {"rotary_dim": 4}
        else:
            assert isinstance(made, kind) if isinstance(kind, type) else made is kind, style
        assert parameter_placement(style, module_type, "weight") == placement, style


def test_expert_parallel_styles_in_a_tensor_plan_are_refused():
    with pytest.raises(LayoutError, match=r"tensor_plan gives tensor-parallel style 'grouped_gemm' for 'experts': it "
                                          r"belongs to the expert-parallel plan .* HybridParallel\(expert_parallel=\.\.\.\) "
                                          r"handles\. Fix: remove it from tensor_plan"):
        check_style("experts", "grouped_gemm")


def _hf(family, **config):
    from tests.hf_models import hf_config

    return transformers.AutoModelForCausalLM.from_config(hf_config(family, **config))


@pytest.mark.parametrize("family, config, message", [
    ("llama4_text", dict(num_local_experts=2, intermediate_size_mlp=64, moe_layers=[1]),
     r"Llama4ForCausalLM \(model_type='llama4_text'\) declares tensor-parallel style 'packed_rowwise' for "
     r"'model.layers.\*.feed_forward.experts.gate_up_proj': .* Fix: give tensor_plan explicitly without the experts' "
     r"entries .* or use tensor_parallel=1"),
    ("granite_swa", {},
     r"GraniteSWAForCausalLM \(model_type='granite_swa'\) declares tensor-parallel style 'colwise' for the parameter "
     r"'model.layers.\*.self_attn.sinks': transformers splits it inside its module's forward"),
])
def test_declared_styles_that_are_refused_name_the_family_the_module_and_the_fix(family, config, message):
    with pytest.raises(LayoutError, match=message):
        resolve_plan(_hf(family, **config), "auto", tp=2)


def test_declared_plan_entries_a_model_lacks_are_skipped_and_experts_stay_whole():
    # Qwen3-MoE's plan names layers.*.mlp.gate_proj, which only its dense layers have.
    model = _hf("qwen3_moe", mlp_only_layers=[0])
    _, plan = resolve_plan(model, "auto", tp=2)
    assert [name for name in plan if ".mlp." in name] == [f"model.layers.0.mlp.{p}" for p in ("gate_proj", "up_proj", "down_proj")]
    assert plan["model.layers.1.self_attn.q_norm"] == "replicated_with_grad_allreduce"
    assert not any("experts" in name or name.endswith("mlp.gate") for name in plan)
    # A plan given explicitly still has to match: the same entry is refused there.
    with pytest.raises(LayoutError, match=r"entry 'model.layers.\*.mlp.gate_proj' matches no module"):
        resolve_plan(_hf("qwen3_moe"), {"model.layers.*.mlp.gate_proj": "colwise"}, tp=2)


def test_multi_head_latent_attention_keeps_its_down_projections_whole():
    family, config = DEEPSEEK["family"], {k: v for k, v in DEEPSEEK.items() if k != "family"}
    _, plan = resolve_plan(_hf(family, **config), "auto", tp=2)
    attention = {name.rsplit(".", 1)[1]: style for name, style in plan.items() if name.startswith("model.layers.1.self_attn.")}
    # q_proj is declared too, but with q_lora_rank the model has q_a_proj/q_b_proj instead: skipped.
    assert attention == {"q_b_proj": "colwise", "kv_a_proj_with_mqa": "mla_kv_a_proj", "kv_b_proj": "colwise",
                         "o_proj": "rowwise"}


def test_unit_colwise_is_colwise_where_the_heads_divide():
    model = _hf("minicpm5_moe")
    _, plan = resolve_plan(model, "auto", tp=2)
    assert plan["model.layers.0.self_attn.k_proj"] == "colwise"
    with pytest.raises(LayoutError, match=r"num_key_value_heads=2 is not divisible by tensor_parallel=4"):
        resolve_plan(model, "auto", tp=4)


def _assert_parity(case, strategy, devices, label):
    gaps = parity.assert_parity(reference(case), run({**case, "devices": devices, "strategy": strategy}))
    print(f"\nGAPS {label}: loss {gaps['loss_rtol']:.3g} rel, params {gaps['param_atol']:.3g} abs")


def test_tp2_qwen3_moe_with_dense_and_moe_layers():
    # Layer 0 dense (its MLP split), layers 1-3 mixtures of experts (whole on both ranks); every
    # layer's per-head q_norm/k_norm replicated with its gradient summed over the two ranks.
    case = {**HF, "model_kwargs": {"family": "qwen3_moe", "mlp_only_layers": [0]}}
    _assert_parity(case, {"tensor_parallel": 2}, 2, "qwen3_moe tp2")


@pytest.mark.slow  # widens test_tp2_qwen3_moe_with_dense_and_moe_layers to the dense family
def test_tp2_qwen3():
    _assert_parity({**HF, "model_kwargs": {"family": "qwen3"}}, {"tensor_parallel": 2}, 2, "qwen3 tp2")


@pytest.mark.slow  # the same style as Qwen3's, with Gemma's scaled embedding and (1 + weight) norms
def test_tp2_gemma3():
    # Seed 1: with seed 0 one q_proj weight's first gradient is 2e-9 (a millionth of the others'),
    # where AdamW's first step turns rounding noise into a 2.5e-4 difference (the losses agree to 1e-7).
    case = {**HF, "model_kwargs": {"family": "gemma3_text"}, "seed": 1}
    _assert_parity(case, {"tensor_parallel": 2}, 2, "gemma3_text tp2")


@pytest.mark.slow  # test_tied_embeddings runs dp2 x tp2 fully sharded; this adds the replicated norms
def test_dp2_tp2_full_qwen3():
    strategy = {"data_parallel": 2, "tensor_parallel": 2, "sharding": "full"}
    _assert_parity({**HF, "model_kwargs": {"family": "qwen3"}}, strategy, 4, "qwen3 dp2 x tp2 full")


@pytest.mark.slow  # another style: DeepSeek's multi-head latent attention, with mixtures of experts
def test_tp2_deepseek_v3():
    _assert_parity({**HF, "model_kwargs": DEEPSEEK}, {"tensor_parallel": 2}, 2, "deepseek_v3 tp2")


@pytest.mark.slow  # the pipeline stages hold the replicated norms of their own layers
def test_pp2_tp2_qwen3():
    # The loss from the logits: the labels= path under pipelines is issue 21's first item, not this one's.
    case = {**HF, "model_kwargs": {"family": "qwen3", "loss": "logits"}}
    _assert_parity(case, {"pipeline_parallel": 2, "tensor_parallel": 2, "micro_batches": 2}, 4, "qwen3 pp2 x tp2")
