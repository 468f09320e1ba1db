"""Hugging Face models trained the way users fine-tune them (`self.model(input_ids=x, labels=y).loss`,
the model's own loss) match one process under pipeline parallelism: every family whose declared
pipeline plan is verified, the seven schedules among them, and 3-D."""

import pytest

from lightning_parallel.pipeline import SCHEDULES
from lightning_parallel.pipeline.declared import VERIFIED_FAMILIES
from tests.harness import reference, run
from tests.test_pipeline_modules import check_parity

FAMILIES = sorted(VERIFIED_FAMILIES)
# Each family under one schedule, the schedules taken in turn, so that every schedule runs
# two or three families (stages of each family are checked against the unsplit model, labels
# included, in tests/test_declared.py). `make test` runs a dense and a mixture-of-experts model.
FAMILY_SCHEDULE = {family: list(SCHEDULES)[i % len(SCHEDULES)] for i, family in enumerate(FAMILIES)}
IN_MAKE_TEST = ("llama", "qwen3_moe")


def hf_spec(family: str, **model_kwargs) -> dict:
    if family == "gemma2":  # its attention logit softcapping has no sdpa path in transformers 5
        model_kwargs.setdefault("attn", "eager")
    return dict(model="tests.hf_models:HFCausalLM", model_kwargs={"family": family, **model_kwargs},
                data="tests.models:token_data", batch_size=8, max_steps=3)


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
