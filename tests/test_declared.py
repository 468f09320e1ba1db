"""Stages from a transformers model's declared pipeline plan reproduce the unsplit model:
outputs, loss and every gradient, chained in one process.

Families tried and left out of VERIFIED_FAMILIES:
- granite: its base forward multiplies inputs_embeds by embedding_multiplier, so each stage
  entered through inputs_embeds multiplies the hidden state again (logits differ).
- phi: its plan declares embed_dropout as a second piece before the layers; refused as a plan
  shape not supported.
qwen2, qwen3, gemma2, gemma3_text, cohere2, olmo3, exaone4 and ministral index
config.layer_types by loop position; they pass only because a stage also swaps in its slice
of layer_types (the configs below make sliding and full layers differ, and without that swap
the 3-stage cut fails). gemma2 runs with eager attention: transformers 5 gives it no sdpa path.
"""

import copy

import pytest
import torch
from torch import nn

transformers = pytest.importorskip("transformers")

from lightning_parallel.layout import LayoutError  # noqa: E402
from lightning_parallel.pipeline.declared import (  # noqa: E402
    VERIFIED_FAMILIES,
    DeclaredStage,
    call_by_name,
    declared_units,
)

TINY = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2,
            vocab_size=64, head_dim=8, tie_word_embeddings=False)
# Windows shorter than the sequence, so sliding layers see other masks than full ones: a stage
# that gave a layer the wrong kind of mask would show.
EXTRA = {
    "mistral": dict(sliding_window=3),
    "qwen2": dict(use_sliding_window=True, sliding_window=3, max_window_layers=1),
    "qwen3": dict(use_sliding_window=True, sliding_window=3, max_window_layers=1),
    "phi3": dict(pad_token_id=0),
    "gemma2": dict(sliding_window=3),  # layer_types alternate sliding / full
    **{family: dict(sliding_window=3, layer_types=["sliding_attention", "full_attention"] * 2)
       for family in ("gemma3_text", "cohere2", "olmo3", "exaone4", "ministral")},
    "mixtral": dict(sliding_window=3, num_local_experts=4, num_experts_per_tok=2),
    "qwen3_moe": dict(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=16),
    "granite": dict(embedding_multiplier=2.0, logits_scaling=3.0, residual_multiplier=0.5, attention_multiplier=0.2),
    "gpt2": dict(n_inner=64, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0),  # a plan of our own (see declared.py)
}
ATTENTION = {"gemma2": "eager"}  # its attention logit softcapping has no sdpa path in transformers 5
BATCH, SEQ = 2, 7
# Cuts of the 7 units [embed, L0, L1, L2, L3, norm, lm_head] (for a base model, 6: no lm_head).
CUTS = {
    "2 stages": [3],  # [embed, L0, L1] [L2, L3, norm, head]
    "3 stages": [2, 4],  # [embed, L0] [L1, L2] [L3, norm, head]
    "edges": [1, 6],  # [embed] [L0..L3, norm] [head]: no layers at either end
}


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Ops this small run faster on one thread; a second one spins, the more so on a busy machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def make(family: str, head: bool = True) -> nn.Module:
    config = transformers.AutoConfig.for_model(family, **TINY, **EXTRA.get(family, {}))
    torch.manual_seed(0)
    auto = transformers.AutoModelForCausalLM if head else transformers.AutoModel
    model = auto.from_config(config, attn_implementation=ATTENTION.get(family, "sdpa"))
    # Larger than the default init (std 0.02), so that a wrong stage shows well above atol.
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0.0, 0.5)
    return model.train()


def batch(mask: bool, labels: bool) -> dict:
    g = torch.Generator().manual_seed(1)
    call = {"input_ids": torch.randint(1, 64, (BATCH, SEQ), generator=g)}
    if mask:
        call["attention_mask"] = torch.ones(BATCH, SEQ, dtype=torch.long)
        call["attention_mask"][1, -3:] = 0
    if labels:
        call["labels"] = torch.randint(0, 64, (BATCH, SEQ), generator=g)
    return call


def stages_for(model, cuts, args=(), kwargs=None) -> list[DeclaredStage]:
    units = declared_units(model)
    bounds = [0, *[c for c in cuts if c < len(units)], len(units)]
    return [
        DeclaredStage(model, units[a:b], i == 0, b == len(units), args, kwargs or {})
        for i, (a, b) in enumerate(zip(bounds, bounds[1:]))
    ]


def run_stages(stages, args=(), kwargs=None):
    """Chains the stages as a pipeline would: every stage gets the model's call by name (as the
    schedule hands each stage its micro-batch of it), a later one also a detached copy of the
    hidden state, whose gradient it hands back to the previous stage; the last stage's output,
    which travels as tensors, is rebuilt as the runner rebuilds it for the step."""
    call = call_by_name(stages[0]._model, args, kwargs or {})
    out, sent = stages[0](**call), []
    for stage in stages[1:]:
        received = out.detach().requires_grad_()
        sent.append((out, received))
        out = stage(received, **call)
    return stages[-1].flat_output.rebuild(out), sent


def objective(out) -> torch.Tensor:
    if getattr(out, "loss", None) is not None:
        return out.loss
    return (out[0].float() ** 2).mean()


def backward(out, sent) -> None:
    objective(out).backward()
    for hidden, received in reversed(sent):
        hidden.backward(received.grad)


def assert_same_grads(ref: nn.Module, model: nn.Module) -> None:
    grads = dict(model.named_parameters())
    for name, p in ref.named_parameters():
        assert p.grad is not None and grads[name].grad is not None, name
        torch.testing.assert_close(grads[name].grad, p.grad, atol=1e-6, rtol=0, msg=name)


_MODELS: dict = {}


def fresh(family: str, head: bool = True) -> tuple[nn.Module, nn.Module]:
    """(model to split, unsplit reference), equal copies of one seeded model."""
    if (family, head) not in _MODELS:
        _MODELS[family, head] = make(family, head)
    return copy.deepcopy(_MODELS[family, head]), copy.deepcopy(_MODELS[family, head])


@pytest.mark.parametrize("cut", list(CUTS))
@pytest.mark.parametrize("family", sorted(VERIFIED_FAMILIES))
def test_causal_lm_matches_unsplit(family, cut):
    for mask in (False, True):
        model, ref = fresh(family)
        call = batch(mask, labels=True)
        expected = ref(**call)
        expected.loss.backward()
        out, sent = run_stages(stages_for(model, CUTS[cut], kwargs=call), kwargs=call)
        assert isinstance(out, type(expected))
        torch.testing.assert_close(out.logits, expected.logits, atol=1e-6, rtol=0)
        torch.testing.assert_close(out.loss, expected.loss, atol=1e-6, rtol=0)
        backward(out, sent)
        assert_same_grads(ref, model)


@pytest.mark.parametrize("family", sorted(VERIFIED_FAMILIES))
def test_base_model_matches_unsplit(family):
    for cut in ("3 stages", "edges"):
        model, ref = fresh(family, head=False)
        call = batch(mask=True, labels=False)
        expected = ref(**call)
        objective(expected).backward()
        out, sent = run_stages(stages_for(model, CUTS[cut], kwargs=call), kwargs=call)
        torch.testing.assert_close(out.last_hidden_state, expected.last_hidden_state, atol=1e-6, rtol=0)
        backward(out, sent)
        assert_same_grads(ref, model)


def test_positional_call_and_constants():
    model, ref = fresh("llama")
    x = batch(mask=False, labels=False)["input_ids"]
    out, _ = run_stages(stages_for(model, CUTS["3 stages"], args=(x,)), args=(x,))
    torch.testing.assert_close(out.logits, ref(x).logits, atol=1e-6, rtol=0)

    # A constant reaches the last stage only: earlier ones pass every position on.
    call = {**batch(mask=True, labels=False), "logits_to_keep": 2, "return_dict": True}
    stages = stages_for(model, CUTS["2 stages"], kwargs=call)
    assert stages[1]._carried == ["attention_mask"]
    out, _ = run_stages(stages, kwargs=call)
    assert out.logits.shape == (BATCH, 2, 64)
    torch.testing.assert_close(out.logits, ref(**call).logits, atol=1e-6, rtol=0)


def test_only_the_hidden_state_crosses_stages():
    """Labels and the mask reach each stage from its own batch, not from the stage before:
    torch's stages infer what they receive from uninitialized tensors on first use."""
    model, ref = fresh("llama")
    call = batch(mask=True, labels=True)
    first, last = stages_for(model, CUTS["2 stages"], kwargs=call)
    hidden = first(**call)
    assert isinstance(hidden, torch.Tensor) and hidden.shape == (BATCH, SEQ, 32)
    # Probed with the whole batch, called with a micro-batch of it.
    micro = {name: value[:1] for name, value in call.items()}
    out = last.flat_output.rebuild(last(first(**micro), **micro))
    torch.testing.assert_close(out.loss, ref(**micro).loss, atol=1e-6, rtol=0)
    with pytest.raises(LayoutError, match="labels"):
        last(hidden, attention_mask=call["attention_mask"])


def test_stages_partition_the_parameters():
    model, _ = fresh("llama")
    names = {id(p): n for n, p in model.named_parameters()}
    for cut in CUTS.values():
        held = [[id(p) for p in stage.parameters()] for stage in stages_for(model, cut)]
        flat = [i for ids in held for i in ids]
        assert len(flat) == len(set(flat)) == len(names)
        assert set(flat) == set(names)
    # The model stays outside the stage; its units keep their place and names in the model.
    stage = stages_for(model, CUTS["2 stages"])[0]
    assert model not in list(stage.modules())
    assert stage.owned["model__layers__1"] is model.model.layers[1]


def test_model_restored_after_forward_and_after_a_failure():
    model, _ = fresh("qwen2")
    base = model.model
    before = (base.layers, base.norm, model.lm_head, list(model.config.layer_types))
    parameters = [n for n, _ in model.named_parameters()]
    call = batch(mask=True, labels=True)
    stages = stages_for(model, CUTS["3 stages"], kwargs=call)
    out, _ = run_stages(stages, kwargs=call)
    assert (base.layers, base.norm, model.lm_head, model.config.layer_types) == before
    assert [n for n, _ in model.named_parameters()] == parameters

    def fail(*args, **kwargs):
        raise RuntimeError("layer failed")

    base.layers[2].forward = fail
    with pytest.raises(RuntimeError, match="layer failed"):
        stages[1](stages[0](**call), **call)
    assert (base.layers, base.norm, model.lm_head, model.config.layer_types) == before
    assert len(base.layers) == 4 and isinstance(base.norm, type(before[1]))


def test_units_of_a_causal_lm_and_a_base_model():
    model, _ = fresh("llama")
    assert declared_units(model) == [
        "model.embed_tokens", "model.layers.0", "model.layers.1", "model.layers.2", "model.layers.3",
        "model.norm", "lm_head",
    ]
    base, _ = fresh("llama", head=False)
    assert declared_units(base) == ["embed_tokens", *(f"layers.{i}" for i in range(4)), "norm"]


def test_plain_module_declares_nothing():
    assert declared_units(nn.Sequential(nn.Linear(2, 2), nn.Linear(2, 2))) is None


def test_unverified_family_is_refused():
    model = make("granite")
    assert "granite" not in VERIFIED_FAMILIES
    with pytest.raises(LayoutError, match="granite") as err:
        declared_units(model)
    assert "pipeline_parallel=1" in str(err.value) and "llama" in str(err.value)
    with pytest.raises(LayoutError, match="granite"):
        DeclaredStage(model, ["model.embed_tokens"], True, False, (), {})


def test_bad_units_and_unsupported_plans_are_refused():
    model, _ = fresh("llama")
    with pytest.raises(LayoutError, match="contiguous"):
        DeclaredStage(model, ["model.layers.0", "model.layers.2"], False, False, (), {})
    with pytest.raises(LayoutError, match="contradict"):
        DeclaredStage(model, ["model.layers.0"], True, False, (), {})
    # A parameter outside every declared piece would belong to no stage.
    model.extra = nn.Linear(2, 2)
    with pytest.raises(LayoutError, match="extra.weight") as err:
        declared_units(model)
    assert "pipeline_parallel=1" in str(err.value)
