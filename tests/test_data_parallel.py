"""Data parallelism matches one process: losses, logged values, validation, parameters."""

import pytest
import torch

from lightning_parallel import parity
from tests.harness import reference, report_rows, run, shared_run

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
    par = shared_run({**case, "devices": 2, "strategy": {"data_parallel": 2, "sharding": sharding}})
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


def test_hybrid_sharding_matches_one_process():
    """dp=4 as 2 replicas x 2 shards: each rank holds half the model (its replica's shard)."""
    case = {**GPT, "batch_size": 16}
    ref = reference(case)
    par = shared_run({**case, "devices": 4, "strategy": {"data_parallel": 4, "sharding": "hybrid", "data_parallel_shard": 2}})
    parity.assert_parity(ref, par)
    assert "HybridParallel layout pp=1 x dp=4 (2 replicas x 2 shards) x tp=1 on 4 processes" in par["output"]
    rank2 = report_rows(par["output"])[2]
    assert (rank2["pp"], rank2["dp"], rank2["replica"], rank2["shard"], rank2["tp"]) == (0, 2, 1, 0, 0), par["output"][-3000:]
    total = ref["elements_held"][0]
    assert par["elements_held"][0] + par["elements_held"][1] == total, par["elements_held"]
    assert par["elements_held"][:2] == par["elements_held"][2:], par["elements_held"]  # replicas hold the same
    assert par["optimizer_elements"] == [2 * h for h in par["elements_held"]]


@pytest.mark.parametrize("sharding", [pytest.param("none", marks=pytest.mark.slow), "full", "hybrid"])
def test_accumulation_and_clipping(sharding):
    accumulate = {"accumulate_grad_batches": 2, "gradient_clip_val": 0.05}
    # SGD, not Adam: Adam's update hardly depends on the gradient's scale, so clipping would barely show.
    sgd = {"optimizer": "sgd", "lr": 0.1}
    dp = 4 if sharding == "hybrid" else 2
    case = {**MLP, "model_kwargs": sgd, "max_steps": 3, "batch_size": 4 * dp, "trainer": accumulate,
            "callbacks": ["tests.probes:GradSyncProbe"]}
    ref = reference(case)
    strategy = {"data_parallel": dp, "sharding": sharding, **({"data_parallel_shard": 2} if sharding == "hybrid" else {})}
    par = run({**case, "devices": dp, "strategy": strategy})
    parity.assert_parity(ref, par)

    # The clip value binds: without clipping the same run trains differently.
    unclipped = reference({**case, "trainer": {"accumulate_grad_batches": 2}})
    assert unclipped["losses"][-1] != pytest.approx(ref["losses"][-1], rel=1e-2)

    # Replicated gradients are reduced on the last micro-step of each accumulation only; sharded
    # ones are reduce-scattered every micro-step (they stay sharded), and all-reduced across
    # replicas on the last only.
    kinds = par["reductions_by_kind"]
    assert len(kinds) == 6
    first, last = kinds[0::2], kinds[1::2]
    if sharding == "none":
        assert all(sum(k.values()) == 0 for k in first), kinds
    else:
        assert all(k["reduce_scatter"] > 0 and k["allreduce"] == 0 for k in first), kinds
    assert all(sum(k.values()) > 0 for k in last), kinds
    if sharding == "hybrid":
        assert all(k["allreduce"] > 0 for k in last), kinds


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


BYTES = {**MLP, "max_steps": 3, "model_kwargs": {"optimizer": "adamw", "lr": 1e-3},
         "callbacks": ["tests.probes:CollectiveBytesProbe"]}


def test_bf16_mixed_gathers_in_bf16_and_reduces_in_the_chosen_dtype():
    """Under bf16-mixed, FSDP2 gathers parameters in bf16 (half the bytes of fp32) and reduces
    gradients in fp32 by default, in bf16 when asked (half again); fp32 master weights."""
    def sent(precision, **strategy):
        par = run({**BYTES, "devices": 2, "trainer": {"precision": precision},
                   "strategy": {"data_parallel": 2, "sharding": "full", **strategy}})
        return par, par["collective_bytes"], par["collective_dtypes"]

    _, fp32, _ = sent("32-true")
    par, mixed, mixed_dtypes = sent("bf16-mixed")
    _, compressed, compressed_dtypes = sent("bf16-mixed", reduce_dtype="bfloat16")
    assert mixed["all_gather_single"] * 2 == fp32["all_gather_single"], (mixed, fp32)
    assert mixed["reduce_scatter_single"] == fp32["reduce_scatter_single"], (mixed, fp32)
    assert mixed_dtypes["all_gather_single"] == ["bfloat16"] and mixed_dtypes["reduce_scatter_single"] == ["float32"]
    assert compressed["reduce_scatter_single"] * 2 == fp32["reduce_scatter_single"], (compressed, fp32)
    assert compressed_dtypes["reduce_scatter_single"] == ["bfloat16"]
    # The master weights and the optimizer's state stay fp32; bf16 tolerances against one process.
    assert par["param_dtypes"] == ["float32"] and par["optimizer_dtypes"] in ([], ["float32"]), par
    parity.assert_parity(reference({**BYTES, "trainer": {"precision": "bf16-mixed"}}), par, loss_rtol=2e-2, param_atol=2e-2)


def test_replicated_gradients_reduced_in_bf16_when_asked():
    def sent(**strategy):
        par = run({**BYTES, "devices": 2, "trainer": {"precision": "bf16-mixed"},
                   "strategy": {"data_parallel": 2, "sharding": "none", **strategy}})
        return par["collective_bytes_by_dtype"]["all_reduce"]

    # (Lightning all-reduces a few fp32 scalars of its own besides the gradients.)
    fp32, bf16 = sent(), sent(reduce_dtype="bfloat16")
    assert bf16["bfloat16"] * 2 == fp32["float32"] - bf16["float32"], (fp32, bf16)
