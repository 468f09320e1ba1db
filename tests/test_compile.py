"""Compiled blocks train as one uncompiled process does, compiled whole and once for all blocks."""

import re

import pytest

from lightning_parallel import HybridParallel, parity
from lightning_parallel.layout import LayoutError
from lightning_parallel.pipeline import SCHEDULES
from tests.harness import reference, run
from tests.models import GPT_PLAN

# The spec of test_data_parallel.py: its one-process reference is shared.
GPT = dict(model="tests.models:tiny_gpt", data="tests.models:token_data", batch_size=8, max_steps=4)
LAYOUTS = {
    "dp2": (2, {"data_parallel": 2, "sharding": "full"}),
    # Selective checkpointing inside the compiled blocks, with the tensor-parallel collectives.
    "dp2_tp2_selective": (4, {"data_parallel": 2, "tensor_parallel": 2, "sharding": "full", "tensor_plan": GPT_PLAN,
                              "activation_checkpointing": "selective"}),
}


def test_refused_with_split_backward_schedules():
    for name, spec in SCHEDULES.items():
        if spec.split_backward:
            with pytest.raises(LayoutError, match=rf"compile=True does not work with schedule='{name}'.*#161904"):
                HybridParallel(pipeline_parallel=2, schedule=name, micro_batches=4, compile=True)
        else:
            HybridParallel(pipeline_parallel=2, schedule=name, micro_batches=4, compile=True)
    HybridParallel(pipeline_parallel=2, schedule="zbv", micro_batches=4)


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_matches_one_process(layout, monkeypatch):
    devices, strategy = LAYOUTS[layout]
    monkeypatch.setenv("TORCH_LOGS", "recompiles,graph_breaks")
    par = run({**GPT, "devices": devices, "strategy": {**strategy, "compile": True}})
    parity.assert_parity(reference(GPT), par)
    # Each block runs as one graph, and the blocks share their graphs: each rank compiles once
    # for the sanity check (no grad) and once more, for training, when grad mode changes.
    output = par["output"]
    assert "__graph_breaks" not in output
    reasons = re.findall(r"\[__recompiles\]\s+- \d+/\d+: (.*)", output)
    assert len(reasons) == devices and all("grad_mode" in reason for reason in reasons), reasons
