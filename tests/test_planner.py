"""The layout planner: predicted elements per rank against real runs, refusals, ranking."""

import json

import pytest

from lightning_parallel import planner
from lightning_parallel.parity import _load
from tests.harness import report_rows, shared_run
from tests.models import GPT_PLAN

GPT = dict(model="tests.models:tiny_gpt", data="tests.models:token_data", batch_size=8, max_steps=4)
GPT4 = {**GPT, "model_kwargs": {"n_layers": 4}}

# Runs the parity tests make too (shared): the layout, and the planner's option for it.
RUNS = {
    "dp2_full": ({**GPT, "devices": 2, "strategy": {"data_parallel": 2, "sharding": "full"}},
                 planner.Option(dp=2, sharding="full", dp_shard=2)),
    "tp2": ({**GPT, "devices": 2, "strategy": {"tensor_parallel": 2, "tensor_plan": GPT_PLAN}},
            planner.Option(tp=2)),
    "pp2": ({**GPT4, "devices": 2, "strategy": {"pipeline_parallel": 2, "schedule": "1f1b", "micro_batches": 4},
             "callbacks": ["tests.probes:HostSyncProbe"]},
            planner.Option(pp=2, micro_batches=4)),
    "hsdp_2x2": ({**GPT, "batch_size": 16, "devices": 4,
                  "strategy": {"data_parallel": 4, "sharding": "hybrid", "data_parallel_shard": 2}},
                 planner.Option(dp=4, sharding="hybrid", dp_shard=2)),
    "3d": ({**GPT4, "devices": 8, "strategy": {"pipeline_parallel": 2, "data_parallel": 2, "tensor_parallel": 2,
                                               "sharding": "full", "tensor_plan": GPT_PLAN, "micro_batches": 2}},
           planner.Option(pp=2, dp=2, tp=2, sharding="full", dp_shard=2, micro_batches=2)),
}


def model_and_batch(spec):
    module = planner.build_on_meta(_load(spec["model"]), **spec.get("model_kwargs", {}))
    train, _ = _load(spec["data"])(**spec.get("data_kwargs", {}))
    x, y = train.tensors
    return module, (x[: spec["batch_size"]], y[: spec["batch_size"]])


@pytest.mark.parametrize("name", list(RUNS))
def test_predicted_elements_per_rank_match_a_real_run(name):
    spec, option = RUNS[name]
    module, batch = model_and_batch(spec)
    predicted = planner.predict(module, batch, option, planner.MACHINES["cpu"],
                                tensor_plan=spec["strategy"].get("tensor_plan", "auto"))
    assert predicted.fits, predicted.refused
    measured = shared_run(spec)
    held, optimizer = max(measured["elements_held"]), max(measured["optimizer_elements"])
    print(f"{name}: params {predicted.memory.params} vs {held}, optimizer {predicted.memory.optimizer} vs {optimizer}")
    assert predicted.memory.params == pytest.approx(held, rel=0.05)
    assert predicted.memory.grads == pytest.approx(held, rel=0.05)  # every parameter trains
    assert predicted.memory.optimizer == pytest.approx(optimizer, rel=0.05)
    # The start-up report told each rank's parameters and optimizer state before the first step.
    rows = report_rows(measured["output"])
    assert [row["parameters"] for row in rows] == measured["elements_held"]
    assert [row["optimizer"] for row in rows] == measured["optimizer_elements"]


def test_a_layout_that_does_not_fit_is_refused_with_its_reason():
    module, batch = model_and_batch(GPT)
    small = planner.Machine("small", 8, 64 * 1024, 1e11, 3e10, 5e-6, 1e9, 1e9, 1e-4)
    alone = planner.predict(module, batch, planner.Option(), small)
    assert not alone.fits and "GiB per device, the device has" in alone.refused
    predictions = planner.plan(module, batch, 4, planner.MACHINES["cpu"], tensor_plan=GPT_PLAN)
    assert predictions and all(p.fits for p in predictions[:3])
    times = [p.time.total for p in predictions if p.fits]
    assert times == sorted(times)
    bad = planner.predict(module, batch, planner.Option(dp=3), planner.MACHINES["cpu"])
    assert "does not divide over dp=3" in bad.refused


def test_candidates_cover_the_layouts_of_a_world():
    options = list(planner.candidate_options(8, 16, per_node=4))
    degrees = {(o.pp, o.dp, o.tp) for o in options}
    assert (2, 2, 2) in degrees and (8, 1, 1) in degrees and (1, 8, 1) in degrees
    assert all(o.tp <= 4 for o in options)  # tensor groups stay inside a node
    assert any(o.sharding == "hybrid" and o.dp_shard == 4 for o in options if o.dp == 8)
    json.dumps([o.arguments() for o in options])  # plain values: a YAML file can hold them


def test_layout_auto_trains_on_the_planners_first_layout():
    from lightning_parallel import parity
    from tests.harness import reference, run

    # Lightning's batch size is per data-parallel rank: the tiny GPT on 2 CPU processes goes
    # fastest per sample at dp=2, which trains as one process does on the batch of 8.
    record = run({**GPT, "devices": 2, "strategy": {"layout": "auto"}})
    assert "layout='auto' chose pp=1 x dp=2 x tp=1" in record["output"], record["output"][-3000:]
    assert "HybridParallel layout pp=1 x dp=2 x tp=1 on 2 processes" in record["output"]
    parity.assert_parity(reference(GPT), record)


def test_layout_auto_refuses_degrees_given_too():
    from lightning_parallel import HybridParallel, LayoutError

    with pytest.raises(LayoutError, match="layout='auto' chooses .* but tensor_parallel, sharding were given too"):
        HybridParallel(layout="auto", tensor_parallel=2, sharding="full")
    with pytest.raises(LayoutError, match="machine='tpu' is not a planner preset"):
        HybridParallel(layout="auto", machine="tpu")


def test_plan_command_composes_the_main_jobs_config_with_overrides(capsys):
    from lightning_parallel import cli
    from tests.harness import REPO

    cli.main(["plan", "--config", str(REPO / "configs" / "train.yaml"), "--pythonpath", str(REPO / "examples"),
              "--world", "2", "--machine", "cpu", "model.n_layers=2", "~trainer.logger"])
    printed = capsys.readouterr().out
    assert "layouts of 2 devices on CPU (2 cores, gloo), fastest first:" in printed
    # Two layers of the example GPT, all on each rank at dp=2: the override reached the model.
    assert "pp=1 x dp=2 x tp=1 none" in printed and "136,832" in printed, printed
