"""Activation checkpointing recomputes what it should, keeps what it should, and trains as one process does."""

import copy
import re

import pytest
import torch
from torch.profiler import ProfilerActivity, profile

from lightning_parallel import parity
from lightning_parallel import HybridParallel
from lightning_parallel.activation_checkpointing import apply_activation_checkpointing, check_activation_checkpointing
from lightning_parallel.layout import LayoutError
from lightning_parallel.pipeline import SCHEDULES
from tests.harness import reference, run
from tests.models import GPT_PLAN, tiny_gpt

# The specs of test_data_parallel.py and test_pipeline.py: their one-process references are shared.
GPT = dict(model="tests.models:tiny_gpt", data="tests.models:token_data", batch_size=8, max_steps=4)
GPT4 = {**GPT, "model_kwargs": {"n_layers": 4}}
LAYOUTS = {
    "dp2": (GPT, 2, {"data_parallel": 2, "sharding": "full"}),
    "dp2_tp2": (GPT, 4, {"data_parallel": 2, "tensor_parallel": 2, "tensor_plan": GPT_PLAN}),
    "pp2_dp2_tp2": (GPT4, 8, {"pipeline_parallel": 2, "data_parallel": 2, "tensor_parallel": 2, "sharding": "full",
                              "tensor_plan": GPT_PLAN, "micro_batches": 2}),
}


def forward_and_backward(mode: str) -> dict:
    """One step of a GPT with dropout and long sequences under `mode`: the gradients, how often
    a block's first matmul ran, and the bytes the forward left allocated for the backward."""
    torch.manual_seed(0)
    model = tiny_gpt(dropout=0.1, seq_len=256)
    keys = list(model.state_dict())
    apply_activation_checkpointing(list(model.blocks), mode)
    fc1_calls = []
    model.blocks[0].mlp.fc1.register_forward_hook(lambda *_: fc1_calls.append(1))
    tokens = torch.randint(64, (8, 256), generator=torch.Generator().manual_seed(1))
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        loss = model._loss((tokens, tokens.roll(1, dims=1)))
    held = sum(event.self_cpu_memory_usage for event in prof.key_averages())  # allocated minus freed
    loss.backward()
    assert list(model.state_dict()) == keys  # the blocks keep their names
    grads = {name: p.grad for name, p in model.named_parameters()}
    return {"model": model, "grads": grads, "fc1_calls": len(fc1_calls), "held": held}


def test_recomputes_and_keeps_what_each_mode_says():
    none, full, selective = (forward_and_backward(mode) for mode in ("none", "full", "selective"))
    # The backward runs the block's forward again (a matmul's output is kept under selective,
    # but its module still runs around it) ...
    assert (none["fc1_calls"], full["fc1_calls"], selective["fc1_calls"]) == (1, 2, 2)
    # ... with the forward's dropout masks: the gradients are exactly those of no checkpointing.
    for run_ in (full, selective):
        for name, grad in none["grads"].items():
            assert torch.equal(run_["grads"][name], grad), name
    # Full keeps only the blocks' inputs; selective keeps the matmul and attention outputs too.
    assert full["held"] < 0.1 * none["held"], (full["held"], none["held"])
    assert 2 * full["held"] < selective["held"] < 0.6 * none["held"], (full["held"], selective["held"], none["held"])

    # A deep copy of a checkpointed block runs with the copy's own parameters.
    block = full["model"].blocks[0]
    copied = copy.deepcopy(block)
    with torch.no_grad():
        copied.mlp.fc2.weight.zero_()
        copied.mlp.fc2.bias.zero_()
        copied.attn.o_proj.weight.zero_()
        copied.attn.o_proj.bias.zero_()
    x = torch.randn(2, 16, 32)
    assert torch.equal(copied(x), x) and not torch.equal(block(x), x)


def test_selective_is_refused_with_split_backward_schedules():
    for name, spec in SCHEDULES.items():
        if spec.split_backward:
            refused = f"activation_checkpointing='selective' does not work with schedule='{name}'"
            with pytest.raises(LayoutError, match=refused):
                check_activation_checkpointing("selective", spec)
            with pytest.raises(LayoutError, match=refused):  # in the strategy's constructor, on every rank
                HybridParallel(pipeline_parallel=2, schedule=name, micro_batches=4, activation_checkpointing="selective")
        else:
            check_activation_checkpointing("selective", spec)
        check_activation_checkpointing("full", spec)  # recomputes the block for each backward pass
    check_activation_checkpointing("selective", None)


SLOW = {("pp2_dp2_tp2", "selective"), ("dp2_tp2", "full")}  # make test-slow: the others cover each mode and layout


@pytest.mark.parametrize("layout, mode", [
    pytest.param(layout, mode, marks=pytest.mark.slow if (layout, mode) in SLOW else ())
    for layout in LAYOUTS for mode in ("full", "selective")
])
def test_matches_one_process(layout, mode):
    case, devices, strategy = LAYOUTS[layout]
    par = run({**case, "devices": devices, "strategy": {**strategy, "activation_checkpointing": mode}})
    parity.assert_parity(reference(case), par)
    assert re.search(rf"Activation checkpointing \({mode}\) of \d+ blocks \(Block\)\.", par["output"])
