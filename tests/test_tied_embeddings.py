"""Tied input and output embeddings under tensor parallelism: the embedding (split by vocabulary
rows) and the head (split by output features, the vocabulary) keep one weight, split one way;
checkpoints hold it once, resume, and export as save_pretrained writes it."""

import warnings

import lightning.pytorch as pl
import pytest
import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint import FileSystemReader

from lightning_parallel import LayoutError, parity
from lightning_parallel.checkpoint import META_FILE, sharded_model_state, tied_aliases
from lightning_parallel.export import TIED_KEY, consolidate, export_hf
from lightning_parallel.tensor_parallel import resolve_plan
from tests.harness import defaults_on, reference, run
from tests.models import GPT_PLAN, TiedGPT, save_pretrained_llama, tied_gpt

GPT = defaults_on(dict(model="tests.models:tied_gpt", data="tests.models:token_data", batch_size=8, max_steps=4))
LLAMA = defaults_on(dict(model="tests.hf_models:HFCausalLM", model_kwargs={"family": "llama", "tie": True},
                         data="tests.models:token_data", batch_size=8, max_steps=4))


def test_a_tie_split_one_way_is_kept_and_one_split_two_ways_is_refused():
    model = tied_gpt()
    _, plan = resolve_plan(model, GPT_PLAN, tp=2)
    assert plan["tok_emb"] == "embedding_rowwise" and plan["head"] == "colwise_gather_output"
    with pytest.raises(LayoutError, match=r"tok_emb \(embedding_colwise\) and head \(colwise_gather_output\) share one "
                                          r"weight .* split along dim 1 in tok_emb, split along dim 0 in head\. Give both "
                                          r"styles that split the same dim .* or untie them \(tie_word_embeddings=False\)"):
        resolve_plan(model, {**GPT_PLAN, "tok_emb": "embedding_colwise"}, tp=2)
    with pytest.raises(LayoutError, match=r"tok_emb \(embedding_rowwise\) and head \(not in the plan\) share one weight"):
        resolve_plan(model, {k: v for k, v in GPT_PLAN.items() if k != "head"}, tp=2)


def _write(module, path):
    """A checkpoint directory as HybridParallel writes it (model entries and meta.pt only)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        dcp.save({"state_dict": sharded_model_state(module)}, checkpoint_id=path, no_dist=True)
    torch.save({"epoch": 0, "global_step": 4, "pytorch-lightning_version": pl.__version__,
                "hyper_parameters": dict(module.hparams), TIED_KEY: tied_aliases(module)}, path / META_FILE)


def test_checkpoints_hold_a_tied_weight_once_and_the_one_file_export_restores_the_tie(tmp_path):
    model = tied_gpt()
    assert tied_aliases(model) == {"head.weight": "tok_emb.weight"}
    _write(model, tmp_path / "ckpt")
    keys = FileSystemReader(tmp_path / "ckpt").read_metadata().state_dict_metadata
    assert "state_dict.tok_emb.weight" in keys and "state_dict.head.weight" not in keys
    consolidate(tmp_path / "ckpt", tmp_path / "one.ckpt")
    state = torch.load(tmp_path / "one.ckpt", weights_only=False)["state_dict"]
    assert state["head.weight"] is state["tok_emb.weight"]  # one tensor, stored once
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        loaded = TiedGPT.load_from_checkpoint(tmp_path / "one.ckpt")  # strict: every name is there
    assert loaded.head.weight is loaded.tok_emb.weight
    assert torch.equal(loaded.tok_emb.weight, model.tok_emb.weight)


@pytest.fixture(scope="module")
def tied_pretrained(tmp_path_factory):
    """A Hugging Face Llama directory with tied embeddings: its safetensors hold the weight once."""
    from safetensors import safe_open

    path = tmp_path_factory.mktemp("pretrained") / "tied_llama"
    save_pretrained_llama(path, tie=True)
    with safe_open(str(path / "model.safetensors"), "pt") as f:
        assert "model.embed_tokens.weight" in f.keys() and "lm_head.weight" not in f.keys()
    return path


def test_tied_llama_built_empty_from_pretrained_dp2_tp2_saved_resumed_under_tp2_and_exported(tied_pretrained, tmp_path):
    """One epoch fully sharded over dp2 x tp2 from the Hugging Face directory (into a model built
    empty), saved; the second epoch resumed under tp2; against one process fine-tuning after
    from_pretrained for both epochs."""
    from transformers import LlamaForCausalLM

    path, ckpt = tied_pretrained, tmp_path / "tied.ckpt"
    spec = dict(model="tests.models:pretrained_llama", model_kwargs={"path": str(path)}, data="tests.models:token_data",
                data_kwargs={"n_train": 32}, batch_size=8, max_steps=-1)
    uninterrupted = reference({**spec, "trainer": {"max_epochs": 2}})
    parallel = {**spec, "model": "tests.models:llama_from_config"}
    first = run({**parallel, "build": "empty", "trainer": {"max_epochs": 1}, "save_to": str(ckpt), "devices": 4,
                 "strategy": {"data_parallel": 2, "tensor_parallel": 2, "sharding": "full", "init_from": str(path)}})
    first_gap = parity.assert_losses_close(uninterrupted["losses"][:4], first["losses"])
    assert "model.lm_head: colwise_gather_output" in first["output"] and "model.model.embed_tokens: embedding_rowwise" in first["output"]

    keys = FileSystemReader(ckpt).read_metadata().state_dict_metadata
    assert "state_dict.model.model.embed_tokens.weight" in keys and "state_dict.model.lm_head.weight" not in keys
    assert not any(key.startswith("optimizer_states.0.state.model.lm_head") for key in keys)

    second = run({**parallel, "trainer": {"max_epochs": 2}, "resume_from": str(ckpt), "devices": 2,
                  "strategy": {"tensor_parallel": 2}})
    gaps = parity.assert_parity({**uninterrupted, "losses": uninterrupted["losses"][4:]}, second)
    print(f"\nGAPS tied llama: dp2 x tp2 full epoch 1 loss {first_gap:.3g} rel; resumed tp2 epoch 2 loss "
          f"{gaps['loss_rtol']:.3g} rel, params {gaps['param_atol']:.3g} abs")

    export_hf(ckpt, tmp_path / "hf")
    exported = LlamaForCausalLM.from_pretrained(tmp_path / "hf")
    assert exported.lm_head.weight is exported.model.embed_tokens.weight
    for name, value in exported.state_dict().items():
        assert torch.equal(value, first["params"][f"model.{name}"]), name


def _assert_parity(case, strategy, devices, label):
    gaps = parity.assert_parity(reference(case), run({**case, "devices": devices, "strategy": strategy}))
    print(f"\nGAPS {label}: loss {gaps['loss_rtol']:.3g} rel, params {gaps['param_atol']:.3g} abs")


def test_tp2_tied_gpt_given_plan():
    _assert_parity(GPT, {"tensor_parallel": 2, "tensor_plan": GPT_PLAN}, 2, "tied gpt tp2")


@pytest.mark.slow  # test_tp2_tied_gpt_given_plan with the logits left split over the vocabulary
def test_tp2_tied_gpt_loss_parallel():
    _assert_parity(GPT, {"tensor_parallel": 2, "tensor_plan": GPT_PLAN, "loss_parallel": True}, 2, "tied gpt tp2 loss_parallel")


@pytest.mark.slow  # the resume under tp2 in the test above runs this layout; here through labels=
def test_tp2_tied_llama_declared_plan():
    _assert_parity(LLAMA, {"tensor_parallel": 2}, 2, "tied llama tp2")


@pytest.mark.slow  # the first epoch in the test above runs dp2 x tp2 full; here through labels=, and replicated
@pytest.mark.parametrize("sharding", ["full", "none"])
def test_dp2_tp2_tied_llama(sharding):
    strategy = {"data_parallel": 2, "tensor_parallel": 2, "sharding": sharding}
    _assert_parity(LLAMA, strategy, 4, f"tied llama dp2 x tp2 {sharding}")
