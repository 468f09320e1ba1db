"""Pipeline parallelism matches one process: every schedule, P=2 and 4, a non-transformer, 3-D."""

import pytest
import torch

from lightning_parallel import parity
from lightning_parallel.pipeline import SCHEDULES
from tests.harness import reference, run, shared_run
from tests.models import GPT_PLAN

GPT = dict(model="tests.models:tiny_gpt", model_kwargs={"n_layers": 4}, data="tests.models:token_data",
           batch_size=8, max_steps=4)
MLP = dict(model="tests.models:ResidualMLP", model_kwargs={"optimizer": "adamw", "lr": 1e-2},
           data="tests.models:regression_data", batch_size=8, max_steps=6)


def assert_each_rank_holds_its_stages_only(ref, par):
    total = ref["elements_held"][0]
    held = par["elements_held"]
    assert sum(held) == total, held  # every parameter lives on exactly one stage
    assert max(held) < total, held
    # AdamW keeps two state tensors per parameter it updates: only this rank's.
    assert par["optimizer_elements"] == [2 * h for h in held], (par["optimizer_elements"], held)


def assert_no_host_sync_after_the_first_step(par, last_stage_rank):
    """No pickled collective, and no read of a device tensor on the host, in a training step
    after the first, except one: the other stages read whether the logged names changed."""
    steps = par_steps = len(par["losses"]) - 1
    for rank, sites in enumerate(par["host_syncs"]):
        # The last stage's loss_fn reads its micro-batch index from a host tensor (no device sync).
        sites = {site: n for site, n in sites.items() if site != "runner.py:loss_fn:__int__"}
        expected = {} if rank == last_stage_rank else {"runner.py:_share_training_step:__bool__": par_steps}
        assert sites == expected, (rank, par["host_syncs"], steps)


# Every schedule runs on modules as users write them in test_pipeline_modules.py; the example
# GPT keeps the simplest and the most involved one.
@pytest.mark.parametrize("schedule", ["1f1b", "dualpipev"])
def test_example_gpt_pp2(schedule):
    ref = reference(GPT)
    strategy = {"pipeline_parallel": 2, "schedule": schedule, "micro_batches": 4}
    par = shared_run({**GPT, "devices": 2, "strategy": strategy, "callbacks": ["tests.probes:HostSyncProbe"]})
    parity.assert_parity(ref, par)
    assert_no_host_sync_after_the_first_step(par, last_stage_rank=1 if schedule == "1f1b" else 0)
    assert_each_rank_holds_its_stages_only(ref, par)
    stages = 4 if SCHEDULES[schedule].stages_per_rank == 2 else 2
    assert f"Pipeline split (balanced by counted cost), {stages} stages:" in par["output"]


def test_1f1b_pp4():
    ref = reference(GPT)
    par = run({**GPT, "devices": 4, "strategy": {"pipeline_parallel": 4, "schedule": "1f1b", "micro_batches": 4}})
    parity.assert_parity(ref, par)
    assert_each_rank_holds_its_stages_only(ref, par)


@pytest.mark.parametrize("schedule", list(SCHEDULES))
def test_residual_mlp(schedule):
    ref = reference(MLP)
    par = run({**MLP, "devices": 2, "strategy": {"pipeline_parallel": 2, "schedule": schedule, "micro_batches": 4}})
    parity.assert_parity(ref, par)
    # The MLP logs a torchmetrics metric in validation_step: rank 0 (first stage) sees its value.
    assert par["val_metrics"]["val_mse"] == pytest.approx(ref["val_metrics"]["val_mse"], rel=1e-5)


def test_validate_test_predict():
    case = {**GPT, "evaluate": ["test", "predict"]}
    ref = reference(case)
    par = run({**case, "devices": 2, "strategy": {"pipeline_parallel": 2, "micro_batches": 2}})
    parity.assert_parity(ref, par)
    assert par["test_loss"] == pytest.approx(ref["test_loss"], rel=1e-5)
    # Rank 0 holds the first stage; the last stage's predictions reach it.
    assert torch.equal(par["predictions"], ref["predictions"])


def test_explicit_split_accumulation_and_binding_clip():
    trainer = {"accumulate_grad_batches": 2, "gradient_clip_val": 0.05}
    case = {**MLP, "model_kwargs": {"optimizer": "sgd", "lr": 0.1}, "max_steps": 3, "trainer": trainer}
    ref = reference(case)
    strategy = {"pipeline_parallel": 2, "micro_batches": 2, "pipeline_split": ["blocks.1"]}
    par = run({**case, "devices": 2, "strategy": strategy})
    parity.assert_parity(ref, par)
    assert "Pipeline split (at the given split points), 2 stages:\n  stage 0: inp, blocks.0 (" in par["output"]
    unclipped = reference({**case, "trainer": {"accumulate_grad_batches": 2}})
    assert unclipped["losses"][-1] != pytest.approx(ref["losses"][-1], rel=1e-2)


@pytest.mark.parametrize("sharding", [pytest.param("none", marks=pytest.mark.slow), "full"])
def test_3d_dp2_tp2_pp2(sharding):
    ref = reference(GPT)
    strategy = {"pipeline_parallel": 2, "data_parallel": 2, "tensor_parallel": 2, "sharding": sharding,
                "tensor_plan": GPT_PLAN, "micro_batches": 2}
    par = shared_run({**GPT, "devices": 8, "strategy": strategy})
    parity.assert_parity(ref, par)
    assert "HybridParallel layout pp=2 x dp=2 x tp=2 on 8 processes" in par["output"]


@pytest.mark.parametrize("schedule", ["1f1b", pytest.param("interleaved_1f1b", marks=pytest.mark.slow)])
def test_resharding_per_micro_batch(schedule):
    """Each block gathered and its gradients reduce-scattered for every micro-batch: the same
    training, with fewer parameters and gradients held in full at a time."""
    ref = reference(GPT)
    strategy = {"pipeline_parallel": 2, "data_parallel": 2, "sharding": "full", "schedule": schedule,
                "micro_batches": 4, "reshard_per_micro_batch": True}
    par = run({**GPT, "devices": 4, "strategy": strategy})
    parity.assert_parity(ref, par)
