"""Data parallelism matches one process: losses, logged values, validation, parameters."""

import pytest
import torch

from lightning_parallel import parity
from tests.harness import reference, run

GPT = dict(model="tests.models:tiny_gpt", data="tests.models:token_data", batch_size=8, max_steps=4)
MLP = dict(
    model="tests.models:ResidualMLP",
    model_kwargs={"optimizer": "adamw", "lr": 1e-2},
    data="tests.models:regression_data",
    batch_size=8,
    max_steps=6,
)


@pytest.mark.parametrize("sharding", ["none", "full"])
@pytest.mark.parametrize("case", [GPT, MLP], ids=["gpt", "mlp"])
def test_dp2_matches_one_process(case, sharding):
    ref = reference(case)
    par = run({**case, "devices": 2, "strategy": {"data_parallel": 2, "sharding": sharding}})
    parity.assert_parity(ref, par)

    # The model summary counts the whole model, not one rank's shard.
    assert par["summary_total_params"] == ref["summary_total_params"]
    total = ref["elements_held"][0]
    if sharding == "full":
        assert sum(par["elements_held"]) == total
        for held in par["elements_held"]:
            assert abs(held - total / 2) <= 0.05 * total, par["elements_held"]
    else:
        assert par["elements_held"] == [total, total]
    # Metrics sync over the data-parallel ranks: the MLP logs a torchmetrics MSE.
    for name, value in ref["val_metrics"].items():
        assert par["val_metrics"][name] == pytest.approx(value, rel=1e-5), name


@pytest.mark.parametrize("sharding", ["none", "full"])
def test_accumulation_and_clipping(sharding):
    accumulate = {"accumulate_grad_batches": 2, "gradient_clip_val": 0.05}
    # SGD, not Adam: Adam's update hardly depends on the gradient's scale, so clipping would barely show.
    sgd = {"optimizer": "sgd", "lr": 0.1}
    case = {**MLP, "model_kwargs": sgd, "max_steps": 3, "trainer": accumulate, "callbacks": ["tests.probes:GradSyncProbe"]}
    ref = reference(case)
    par = run({**case, "devices": 2, "strategy": {"data_parallel": 2, "sharding": sharding}})
    parity.assert_parity(ref, par)

    # The clip value binds: without clipping the same run trains differently.
    unclipped = reference({**case, "trainer": {"accumulate_grad_batches": 2}})
    assert unclipped["losses"][-1] != pytest.approx(ref["losses"][-1], rel=1e-2)

    # Gradients are reduced on the last micro-step of each accumulation only.
    reductions = par["reductions_per_backward"]
    assert len(reductions) == 6
    assert reductions[0::2] == [0, 0, 0], reductions
    assert all(n > 0 for n in reductions[1::2]), reductions


@pytest.mark.parametrize("precision", ["bf16-mixed", "bf16-true"])
def test_bf16_precision(precision):
    case = {**MLP, "model_kwargs": {"optimizer": "sgd", "lr": 1e-2}, "trainer": {"precision": precision}}
    ref = reference(case)
    par = run({**case, "devices": 2, "strategy": {"data_parallel": 2, "sharding": "full"}})
    # bf16 keeps 8 bits of mantissa: a per-rank half-batch mean rounds differently than a
    # full-batch one, so the tolerances are bf16's, not fp32's.
    parity.assert_parity(ref, par, loss_rtol=2e-2, param_atol=2e-2)


def test_validate_test_predict():
    case = {**GPT, "evaluate": ["test", "predict"]}
    ref = reference(case)
    par = run({**case, "devices": 2, "strategy": {"data_parallel": 2, "sharding": "full"}})
    parity.assert_parity(ref, par)
    assert par["test_loss"] == pytest.approx(ref["test_loss"], rel=1e-5)
    # Each data-parallel rank predicts its own samples: rank 0 has every second one.
    assert torch.equal(par["predictions"], ref["predictions"][0::2])
