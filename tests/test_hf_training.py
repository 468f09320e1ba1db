"""Hugging Face models trained the way users fine-tune them (`self.model(input_ids=x, labels=y).loss`,
the model's own loss) match one process under pipeline parallelism: every family whose declared
pipeline plan is verified, the seven schedules among them, and 3-D."""

import pytest
import torch

from lightning_parallel.pipeline import SCHEDULES
from lightning_parallel.pipeline.declared import VERIFIED_FAMILIES
from tests.harness import assert_checkpoint_saved, defaults_on, reference, run
from tests.test_pipeline_modules import check_parity as _check_parity

FAMILIES = sorted(VERIFIED_FAMILIES)
# Each family under one schedule, the schedules taken in turn, so that every schedule runs
# two or three families (stages of each family are checked against the unsplit model, labels
# included, in tests/test_declared.py). `make test` runs a dense and a mixture-of-experts model.
FAMILY_SCHEDULE = {family: list(SCHEDULES)[i % len(SCHEDULES)] for i, family in enumerate(FAMILIES)}
IN_MAKE_TEST = ("llama", "qwen3_moe")


def check_parity(label: str, reference: dict, parallel: dict) -> None:
    _check_parity(label, reference, parallel)
    assert_checkpoint_saved(reference, parallel)


def hf_spec(family: str, trainer: dict | None = None, max_steps: int = 3, **model_kwargs) -> dict:
    """With Lightning's defaults on: sanity validation, progress bar, model summary, logger, and
    ModelCheckpoint saving at the run's last step (the end of its one epoch)."""
    if family == "gemma2":  # its attention logit softcapping has no sdpa path in transformers 5
        model_kwargs.setdefault("attn", "eager")
    return defaults_on(dict(model="tests.hf_models:HFCausalLM", model_kwargs={"family": family, **model_kwargs},
                            data="tests.models:token_data", batch_size=8, max_steps=max_steps, trainer=trainer or {}))


@pytest.mark.parametrize("family, schedule", [
    pytest.param(family, schedule, marks=() if family in IN_MAKE_TEST else pytest.mark.slow)
    for family, schedule in FAMILY_SCHEDULE.items()
])
def test_labels_under_pipeline_parallel(family, schedule):
    """torch's stages learn what they receive from uninitialized tensors on their first step:
    labels sent between stages held garbage there (IndexError: Target ... out of bounds).
    Every stage now reads the model's tensor arguments from its own batch."""
    spec = hf_spec(family)
    par = run({**spec, "devices": 2, "strategy": {"pipeline_parallel": 2, "micro_batches": 4, "schedule": schedule}})
    check_parity(f"{family} labels= pp=2 {schedule}", reference(spec), par)


@pytest.mark.parametrize("loss", ["labels", pytest.param("logits", marks=pytest.mark.slow)])
def test_llama_3d(loss):
    spec = hf_spec("llama", loss=loss)
    strategy = dict(pipeline_parallel=2, data_parallel=2, tensor_parallel=2, sharding="full", micro_batches=2)
    par = run({**spec, "devices": 8, "strategy": strategy})
    check_parity(f"llama {loss} pp=2 x dp=2 x tp=2 full", reference(spec), par)
    assert "HybridParallel layout pp=2 x dp=2 x tp=2 on 8 processes" in par["output"]


# ---------------------------------------------------------------------------- tied input and output embeddings

# SGD, whose step shows a gradient's scale (AdamW hides it), with clipping: the tied weight's
# gradient must be the sum over both stages, and the global norm must count it once.
TIED = dict(family="llama", tie=True, optimizer="sgd", lr=0.5)
CLIPPED = {"gradient_clip_val": 0.05}


@pytest.mark.parametrize("layout", [
    "pp2",
    "pp2_dp2_full",  # shards of the copies summed, after two accumulated micro-steps
    pytest.param("pp2_zbv", marks=pytest.mark.slow),  # one rank holds both stages
])
def test_tied_embeddings_under_pipeline_parallel(layout):
    strategy = {"pp2": dict(pipeline_parallel=2, micro_batches=4),
                "pp2_dp2_full": dict(pipeline_parallel=2, data_parallel=2, sharding="full", micro_batches=2),
                "pp2_zbv": dict(pipeline_parallel=2, micro_batches=4, schedule="zbv")}[layout]
    trainer = {**CLIPPED, **({"accumulate_grad_batches": 2} if layout == "pp2_dp2_full" else {})}
    spec = hf_spec(**TIED, trainer=trainer, max_steps=3 if layout != "pp2_dp2_full" else 2)
    devices = 4 if "dp2" in layout else 2
    par = run({**spec, "devices": devices, "strategy": strategy})
    check_parity(f"tied embeddings {layout}", reference(spec), par)
    if layout != "pp2_zbv":
        assert "tied across stages 0, 1: model.model.embed_tokens.weight = model.lm_head.weight" in par["output"]
    assert_tied(par["params"])


def assert_tied(params: dict) -> None:
    """Both names of the weight hold the same values (each stage's copy, gathered)."""
    assert torch.equal(params["model.model.embed_tokens.weight"], params["model.lm_head.weight"])


def test_tied_embeddings_built_empty_start_equal(monkeypatch):
    """Each stage initializes its own copy; the copies are made equal before training, and the
    summed gradients keep them equal."""
    monkeypatch.setenv("LP_TEST_TENSOR", "model.model.embed_tokens.weight")
    spec = {**hf_spec(**TIED, max_steps=2), "build": "empty", "devices": 2,
            "strategy": {"pipeline_parallel": 2, "micro_batches": 4}, "callbacks": ["tests.probes:TensorOnEachRank"]}
    for when, (first, last) in run(spec)["on_each_rank"].items():
        assert torch.equal(first, last), f"the copies of the stages differ at the {when} of training"


@pytest.fixture(scope="module")
def tied_pretrained(tmp_path_factory):
    """A tied Llama directory as save_pretrained writes it: one copy of the tied weight."""
    from tests.hf_models import HFCausalLM

    torch.manual_seed(7)
    model = HFCausalLM(**TIED).model
    path = tmp_path_factory.mktemp("tied") / "llama"
    model.save_pretrained(path)
    return path


@pytest.mark.slow
def test_tied_embeddings_from_pretrained_and_exported(tied_pretrained, tmp_path):
    from safetensors import safe_open
    from torch.distributed.checkpoint import FileSystemReader
    from transformers import AutoModelForCausalLM

    from lightning_parallel.export import export_hf

    with safe_open(str(tied_pretrained / "model.safetensors"), "pt") as f:
        assert "lm_head.weight" not in f.keys()
    spec = hf_spec(**TIED, path=str(tied_pretrained), pretrained=True, trainer=CLIPPED)
    parallel = {**spec, "model_kwargs": {**TIED, "path": str(tied_pretrained)}, "build": "empty", "devices": 2,
                "strategy": {"pipeline_parallel": 2, "micro_batches": 4, "init_from": str(tied_pretrained)},
                "save_to": str(tmp_path / "ckpt")}
    par = run(parallel)
    check_parity("tied embeddings init_from pp2", reference(spec), par)
    # Both stages' ranks write the weight under its own name: one copy, in the model and the optimizer state.
    keys = FileSystemReader(tmp_path / "ckpt").read_metadata().state_dict_metadata
    assert "state_dict.model.model.embed_tokens.weight" in keys and "state_dict.model.lm_head.weight" not in keys
    assert not any(key.startswith("optimizer_states.0.state.model.lm_head") for key in keys)
    export_hf(tmp_path / "ckpt", tmp_path / "hf")
    exported = AutoModelForCausalLM.from_pretrained(tmp_path / "hf")
    assert exported.lm_head.weight is exported.model.embed_tokens.weight
    for name, value in exported.state_dict().items():
        assert torch.equal(value, par["params"][f"model.{name}"]), name


# ---------------------------------------------------------------------------- GPT-2


def test_gpt2_under_pipeline_parallel():
    """GPT-2 declares no pipeline plan and torch.fx cannot trace it: its stages follow a plan of
    our own (lightning_parallel/pipeline/declared.py), whose later stages must not add the
    position embedding again. Its embeddings are tied, as GPT-2 ships."""
    spec = hf_spec("gpt2", tie=True, optimizer="sgd", lr=0.5, trainer=CLIPPED)
    par = run({**spec, "devices": 2,
               "strategy": {"pipeline_parallel": 2, "micro_batches": 4, "schedule": "interleaved_1f1b"}})
    check_parity("gpt2 pp=2 interleaved_1f1b", reference(spec), par)
    assert "tied across stages 0, 3: model.transformer.wte.weight = model.lm_head.weight" in par["output"]


@pytest.mark.parametrize("layout", ["pp2_tp2", pytest.param("tp2", marks=pytest.mark.slow)])
def test_gpt2_under_tensor_parallel(layout):
    """GPT-2's Conv1D layers (transposed Linears) by a plan of our own: the fused q/k/v projection
    split by heads, its tied embeddings split by vocabulary in both places."""
    spec = hf_spec("gpt2", tie=True, optimizer="sgd", lr=0.5, trainer=CLIPPED)
    strategy = {"tensor_parallel": 2, **({"pipeline_parallel": 2, "micro_batches": 4} if layout == "pp2_tp2" else {})}
    par = run({**spec, "devices": 4 if layout == "pp2_tp2" else 2, "strategy": strategy})
    check_parity(f"gpt2 {layout}", reference(spec), par)
    assert "Tensor-parallel plan (declared by the model), tp=2:" in par["output"]
    assert "model.transformer.h.*.attn.c_attn: qkv_colwise" in par["output"]


def test_gpt2_plan_checks():
    from lightning_parallel import LayoutError
    from lightning_parallel.tensor_parallel import resolve_plan
    from tests.hf_models import HFCausalLM

    module = HFCausalLM("gpt2", tie=True)
    source, plan = resolve_plan(module, "auto", tp=2)
    assert source == "declared by the model"
    assert plan["model.transformer.h.0.attn.c_attn"] == "qkv_colwise" and plan["model.lm_head"] == "colwise_gather_output"
    with pytest.raises(LayoutError, match=r"c_attn \(qkv_colwise\): nf=32 is not divisible by tensor_parallel=3"):
        resolve_plan(module, "auto", tp=3)
    with pytest.raises(LayoutError, match=r"is a Conv1D, whose styles take whole sequences"):
        from lightning_parallel.tensor_parallel.conv1d import conv1d_style
        conv1d_style("h.0.mlp.c_fc", "colwise", sequence_parallel=True)
