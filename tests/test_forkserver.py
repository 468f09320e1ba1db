"""The fork server (tests/forkserver.py) that starts the suite's parity runs: its ranks train and
print exactly as those Lightning's launcher starts, and a run that hangs is ended whole."""

import re
import subprocess

import pytest
import torch

from lightning_parallel import parity
from tests import forkserver
from tests.harness import REPO, run
from tests.test_faults import running

GPT = dict(model="tests.models:tiny_gpt", data="tests.models:token_data", batch_size=8, max_steps=3)


def _lines(output: str) -> set[str]:
    return {re.sub(r"\d+\.\d+", "N", line) for line in output.splitlines()}  # timings differ


def test_forked_ranks_train_and_start_as_lightnings_launcher_starts_them():
    # Lightning's own ModelParallelStrategy: under its launcher rank 0 trains with cores/processes
    # threads (the launcher sets them in its own process), the other ranks with torch's default.
    spec = {**GPT, "model": "tests.models:self_parallel_gpt", "devices": 2, "callbacks": ["tests.probes:StartProbe"],
            "strategy": {"class": "lightning.pytorch.strategies:ModelParallelStrategy", "data_parallel_size": 1,
                         "tensor_parallel_size": 2}}
    launched, forked = run(spec, fork=False), run(spec)
    assert forked["start"] == launched["start"]
    assert [start["environment"] for start in forked["start"]] == ["LightningEnvironment"] * 2
    assert [start["rank_zero"] for start in forked["start"]] == [(0, 0), (1, 1)]
    assert forked["losses"] == launched["losses"] and forked["val_loss"] == launched["val_loss"]
    assert all(torch.equal(forked["params"][name], value) for name, value in launched["params"].items())
    assert _lines(forked["output"]) == _lines(launched["output"])


def test_a_run_that_hangs_ends_whole_at_its_timeout(tmp_path, monkeypatch):
    faults = tmp_path / "fault"
    faults.mkdir()
    for name, value in {"LP_TEST_FAULT": "hang", "LP_TEST_FAULT_RANK": 1, "LP_TEST_FAULT_STEP": 1,
                        "LP_TEST_FAULT_DIR": faults}.items():
        monkeypatch.setenv(name, str(value))
    spec = {**GPT, "devices": 2, "strategy": {"data_parallel": 2}, "callbacks": ["tests.probes:Fault"]}
    with pytest.raises(subprocess.TimeoutExpired):
        forkserver.run_processes(spec, tmp_path / "record.pt", [str(REPO)], timeout=15)
    pids = [int(pid) for pid in (faults / "pids").read_text().split()]
    assert len(pids) == 2 and not [pid for pid in pids if running(pid)]
    # The server serves the next run.
    assert parity.run({**GPT, "devices": 2, "strategy": {"data_parallel": 2}}, [str(REPO)], start=forkserver.run_processes)
