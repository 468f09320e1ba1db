"""Pipeline parallelism matches one process on modules written the way users write them
(tests/user_models.py and a Hugging Face Llama): bare parameters on the LightningModule,
parameters only the loss uses, torchvision-style stages, skips crossing stages."""

import functools
import importlib
import json
import re

import lightning.pytorch as pl
import pytest
import torch

from lightning_parallel import parity
from lightning_parallel.pipeline import SCHEDULES
from lightning_parallel.pipeline.schedules import stages_of_rank
from tests.harness import reference, run
from lightning_parallel.pipeline.balance import stage_costs
from tests.stage_timing import plan_for, spread
from tests.test_pipeline import assert_each_rank_holds_its_stages_only
from tests.user_models import MODELS, ResNetStyle, image_data


def case(name, **model_kwargs):
    if name == "TinyLlama":
        model, data, data_kwargs = "tests.models:TinyLlama", "tests.models:token_data", {}
        model_kwargs = {"layers": 4, **model_kwargs}
    else:
        model, data, data_kwargs = MODELS[name]
    spec = dict(model=model, data=data, data_kwargs=data_kwargs, batch_size=8, max_steps=4)
    if model_kwargs:
        spec["model_kwargs"] = model_kwargs
    return spec


def pipelined(spec, schedule="1f1b", pp=2, dp=1, **strategy):
    strategy = {"pipeline_parallel": pp, "schedule": schedule, "micro_batches": 4, **strategy}
    if dp > 1:
        strategy["data_parallel"] = dp
    return {**spec, "devices": pp * dp * strategy.get("tensor_parallel", 1), "strategy": strategy}


@functools.lru_cache(maxsize=None)
def _run(key: str) -> dict:
    return run(json.loads(key))


def run_once(spec: dict) -> dict:
    """A parallel run, shared by the tests of this file that need the same one."""
    return _run(json.dumps(spec, sort_keys=True))


def check_parity(label, ref, par):
    gaps = parity.assert_parity(ref, par)
    print(f"\nGAPS {label}: loss {gaps['loss_rtol']:.3g} rel, val {gaps['val_rtol']:.3g} rel, "
          f"params {gaps['param_atol']:.3g} abs")
    return gaps


def initial_params(spec) -> dict[str, torch.Tensor]:
    """The module's parameters before training, built as the parity worker builds it."""
    module_name, attr = spec["model"].split(":")
    pl.seed_everything(spec.get("seed", 0), verbose=False)
    model = getattr(importlib.import_module(module_name), attr)(**spec.get("model_kwargs", {}))
    return {n: p.detach().float().clone() for n, p in model.named_parameters()}


def stage_lines(output: str) -> dict[int, str]:
    """What each stage holds, from the split report: {stage: "conv1, gn1, ... + pos"}."""
    return {int(s): what for s, what in re.findall(r"^  stage (\d+): (.*?) \([\d,]+ parameters", output, re.M)}


# ---------------------------------------------------------------------------- 1. every schedule, pp=2

PP2_MODELS = ["LlamaStyle", "ViTStyle", "LearnedNoise", "TinyLlama"]
BARE = {"LlamaStyle": "+ pos", "ViTStyle": "+ cls_token, pos_embed"}
LOSS_ONLY = ["log_sigma", "criterion.scale"]
OUTSIDE_LINE = "used outside the forward, held by the last stage: log_sigma, criterion.scale (5 parameters)"


def assert_holds_its_stages_only_with_a_scalar(ref, par, schedule):
    """assert_each_rank_holds_its_stages_only for LearnedNoise, whose criterion.scale is 0-dim:
    AdamW's state for it is 0-dim too, and the parity record counts only state tensors with
    dimensions (to leave out step counters), so the rank holding the last stage (and with it
    the loss-only parameters) shows 2 optimizer elements fewer than twice what it holds."""
    total = ref["elements_held"][0]
    held = par["elements_held"]
    assert sum(held) == total, held
    assert max(held) < total, held
    last_rank = next(r for r in range(len(held)) if 2 * SCHEDULES[schedule].stages_per_rank - 1 in
                     stages_of_rank(SCHEDULES[schedule], r, len(held)))
    expected = [2 * h - (2 if r == last_rank else 0) for r, h in enumerate(held)]
    assert par["optimizer_elements"] == expected, (par["optimizer_elements"], held)


def assert_loss_only_parameters_trained(spec, ref, par):
    before = initial_params(spec)
    for name in LOSS_ONLY:
        assert name in par["params"], f"{name} missing from the parallel run's parameters"
        moved = (par["params"][name] - before[name]).abs().max().item()
        assert moved > 1e-4, f"{name} did not move from its initial value {before[name]} (moved {moved:.3g})"
        gap = (par["params"][name] - ref["params"][name]).abs().max().item()
        assert gap <= parity.PARAM_ATOL, (f"{name} trained differently: {par['params'][name]} (from "
                                          f"{before[name]}) vs one process's {ref['params'][name]}")


# Every schedule for the two models with bare and loss-only parameters; the ViT-style and Hugging
# Face models under 1F1B in `make test`, under the other schedules in `make test-slow`.
EVERY_SCHEDULE = ("LlamaStyle", "LearnedNoise")
PP2_CASES = [pytest.param(name, schedule, marks=() if name in EVERY_SCHEDULE or schedule == "1f1b" else pytest.mark.slow)
             for name in PP2_MODELS for schedule in SCHEDULES]


@pytest.mark.parametrize("name, schedule", PP2_CASES)
def test_every_schedule_pp2(name, schedule):
    spec = case(name)
    ref = reference(spec)
    par = run_once(pipelined(spec, schedule))
    if name == "LearnedNoise":  # by name first: the clearest message if the loss-only parameters went wrong
        assert OUTSIDE_LINE in par["output"], par["output"]
        assert_loss_only_parameters_trained(spec, ref, par)
    check_parity(f"{name} pp=2 {schedule}", ref, par)
    if name == "LearnedNoise":
        assert_holds_its_stages_only_with_a_scalar(ref, par, schedule)
    else:
        assert_each_rank_holds_its_stages_only(ref, par)

    stages = 4 if SCHEDULES[schedule].stages_per_rank == 2 else 2
    assert f"Pipeline split (balanced by counted cost), {stages} stages:" in par["output"]
    lines = stage_lines(par["output"])
    assert sorted(lines) == list(range(stages)), par["output"]
    if name in BARE:  # the bare parameters are held by a stage (the one that uses them)
        assert any(what.endswith(" " + BARE[name]) for what in lines.values()), par["output"]


# (Hugging Face models in 3-D: tests/test_hf_training.py.)


# ---------------------------------------------------------------------------- 3. loss-only parameters under dp


@pytest.mark.parametrize("sharding", ["none", "full"])
def test_learned_noise_pp2_dp2(sharding):
    spec = case("LearnedNoise")
    ref = reference(spec)
    par = run(pipelined(spec, "1f1b", dp=2, sharding=sharding))
    assert "HybridParallel layout pp=2 x dp=2 x tp=1 on 4 processes" in par["output"]
    assert OUTSIDE_LINE in par["output"], par["output"]
    assert_loss_only_parameters_trained(spec, ref, par)
    check_parity(f"LearnedNoise pp=2 x dp=2 {sharding}", ref, par)


# ---------------------------------------------------------------------------- 4. ResNet and U-Net

RESNET_STAGES = {"sequential": [f"stages.{i}" for i in range(4)], "attributes": [f"layer{i}" for i in range(1, 5)]}


@pytest.mark.parametrize("stages_as", ["sequential", pytest.param("attributes", marks=pytest.mark.slow)])
def test_resnet_pp2(stages_as):
    spec = case("ResNetStyle", stages_as=stages_as)
    ref = reference(spec)
    par = run(pipelined(spec, "1f1b"))
    check_parity(f"ResNetStyle[{stages_as}] pp=2 1f1b", ref, par)
    assert_each_rank_holds_its_stages_only(ref, par)

    # The printed split cuts between the ResNet's stages, two on each pipeline stage.
    lines = stage_lines(par["output"])
    names = RESNET_STAGES[stages_as]
    assert lines == {
        0: f"conv1, gn1, act, {names[0]}.0-1, {names[1]}.0-1",
        1: f"{names[2]}.0-1, {names[3]}.0-1, avgpool, fc",
    }, par["output"]

    # Counted, the automatic split's stages cost about the same; the old split (everything
    # before the widest stage on stage 0: cut at its first block) does not. (Timed, on this
    # machine: benchmarks/balance.py, docs/balance.md. Timings are not asserted in tests.)
    torch.manual_seed(0)
    module = ResNetStyle(stages_as=stages_as)
    train, _ = image_data(size=32)
    batch = train[: spec["batch_size"]]
    _, auto, _, _ = plan_for(module, batch, 2)
    old_split = f"{names[3]}.0"
    assert old_split in lines[1], lines  # the old split point is a name the report uses
    _, old, old_plan, _ = plan_for(module, batch, 2, names=[old_split])
    assert old_plan.owned_modules[1][0] == old_split, old_plan.owned_modules
    auto_spread = spread(stage_costs(auto.costs, auto.unit_stage, 2))
    old_spread = spread(stage_costs(old.costs, old.unit_stage, 2))
    assert auto_spread < 0.5 * old_spread and old_spread > 0.15, (auto_spread, old_spread)


def test_unet_pp2():
    spec = case("UNetStyle")
    ref = reference(spec)
    par = run(pipelined(spec, "1f1b"))
    check_parity("UNetStyle pp=2 1f1b", ref, par)
    assert_each_rank_holds_its_stages_only(ref, par)


# ---------------------------------------------------------------------------- 5. trained or refused, none frozen


# Every schedule: the runs are the ones test_every_schedule_pp2 made (run_once), nothing new to train
# when the whole file runs.
@pytest.mark.parametrize("schedule", list(SCHEDULES))
@pytest.mark.parametrize("name", EVERY_SCHEDULE)
def test_every_parameter_trained_none_silently_frozen(name, schedule):
    """Each parameter that one process trains is trained the same pipelined, name by name (a
    refused layout would fail the run with its error instead: never a silent freeze)."""
    spec = case(name)
    ref = reference(spec)
    par = run_once(pipelined(spec, schedule))
    before = initial_params(spec)
    lr = 1e-3  # the models' default
    learned = 0.1 * lr  # more than AdamW's weight decay alone moves a parameter in 4 steps

    # `before` is the worker's initialization: 4 AdamW steps move no element by much more than 4 lr.
    moved = {n: (ref["params"][n] - init).abs().max().item() for n, init in before.items()}
    assert max(moved.values()) < 2 * spec["max_steps"] * lr, moved
    # Every parameter learns on one process (tests/test_user_models.py), so every one is checked below.
    assert all(m > learned for m in moved.values()), {n: m for n, m in moved.items() if m <= learned}

    missing = sorted(before.keys() - par["params"].keys())
    assert not missing, f"parameters missing from the parallel run's record: {missing}"
    problems = []
    for n, init in before.items():
        ref_moved = moved[n]
        par_moved = (par["params"][n] - init).abs().max().item()
        gap = (par["params"][n] - ref["params"][n]).abs().max().item()
        if par_moved <= learned:
            problems.append(f"{n}: moved {ref_moved:.3g} on one process but {par_moved:.3g} pipelined (frozen)")
        elif gap > parity.PARAM_ATOL:
            problems.append(f"{n}: trained differently, {gap:.3g} from one process's value")
    assert not problems, f"{name} under pp=2 {schedule}:\n" + "\n".join(problems)


def test_hugging_face_model_behind_the_modules_own_forward():
    """`def forward(self, x): return self.model(input_ids=x).logits`, the steps calling self(x)."""
    spec = {**case("TinyLlama"), "model": "tests.models:WrappedTinyLlama"}
    ref = reference(spec)
    par = run(pipelined(spec))
    check_parity("WrappedTinyLlama pp=2 1f1b", ref, par)
    assert "stage 0: model.model.embed_tokens, model.model.layers.0-1 (" in par["output"]


def test_lightning_defaults_left_on():
    """Progress bar, model summary, the default logger and ModelCheckpoint (which saves at the
    epoch's end: 8 steps are one epoch), with sanity validation, under pp=2."""
    defaults = {"enable_progress_bar": True, "enable_checkpointing": True, "enable_model_summary": True, "logger": True}
    spec = {**case("LlamaStyle"), "max_steps": 8, "trainer": defaults, "callbacks": ["tests.probes:CheckpointWritten"]}
    ref = reference(spec)
    par = run(pipelined(spec, "gpipe"))
    check_parity("LlamaStyle pp=2 gpipe, Lightning's defaults", ref, par)
    assert par["checkpoint"] == ref["checkpoint"] == ("epoch=0-step=8.ckpt", True)
