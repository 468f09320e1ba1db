"""The errors the README's "What your module must satisfy" table promises for the rows that are
not pipeline checks (those are in test_pipeline_checks.py)."""

import pytest

from tests.harness import run
from tests.models import GPT_PLAN

SPEC = dict(data="tests.models:token_data", batch_size=8, max_steps=1)


def test_reading_a_blocks_weight_in_the_step_under_full_sharding():
    spec = {**SPEC, "model": "tests.models:weight_reading_gpt", "devices": 2,
            "strategy": {"data_parallel": 2, "sharding": "full"}}
    with pytest.raises(RuntimeError, match="got mixed torch.Tensor and DTensor"):
        run(spec)


def test_attention_with_a_stored_head_count_under_tensor_parallelism():
    spec = {**SPEC, "model": "tests.models:fixed_heads_gpt", "devices": 2,
            "strategy": {"tensor_parallel": 2, "tensor_plan": GPT_PLAN}}
    with pytest.raises(RuntimeError, match=r"shape '\[.*\]' is invalid for input of size"):
        run(spec)
