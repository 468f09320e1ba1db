"""Faults: a rank that dies or raises ends the whole run (no hang), and checkpoints survive it."""

import time
from pathlib import Path

import pytest

from lightning_parallel import parity
from tests.harness import REPO, run

TIMEOUT = 60  # the strategy's collective timeout in these runs, seconds
GPT = dict(model="tests.models:tiny_gpt", model_kwargs={"n_layers": 4}, data="tests.models:token_data",
           batch_size=8, max_steps=8, callbacks=["tests.probes:CheckpointEveryTwoSteps", "tests.probes:Fault"],
           trainer={"enable_checkpointing": True})
PP2_DP2 = {"pipeline_parallel": 2, "data_parallel": 2, "micro_batches": 2, "timeout": TIMEOUT}


def run_with_fault(tmp_path, monkeypatch, kind, rank, step, strategy, devices):
    """Runs GPT with the fault injected; returns (exit code, output, seconds from fault to exit)."""
    faults, checkpoints = tmp_path / "fault", tmp_path / "checkpoints"
    faults.mkdir()
    for name, value in {"LP_TEST_FAULT": kind, "LP_TEST_FAULT_RANK": rank, "LP_TEST_FAULT_STEP": step,
                        "LP_TEST_FAULT_DIR": faults, "LP_TEST_CKPT_DIR": checkpoints}.items():
        monkeypatch.setenv(name, str(value))
    spec = {**GPT, "devices": devices, "strategy": strategy}
    proc = parity.run_processes(spec, tmp_path / "record.pt", [str(REPO)], timeout=TIMEOUT + 240)
    ended = time.time()
    pids = [int(line) for line in (faults / "pids").read_text().split()]
    assert len(pids) == devices
    alive = [pid for pid in pids if running(pid)]
    assert not alive, f"processes {alive} still run after the launcher exited"
    return proc.returncode, proc.stdout + proc.stderr, ended - float((faults / "fault_time").read_text())


def running(pid: int) -> bool:
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except FileNotFoundError:
        return False
    return "\nState:\tZ" not in status  # a zombie has exited; nobody reaped it yet


def resume_one_process(checkpoint: Path) -> dict:
    spec = {**GPT, "callbacks": [], "trainer": {}, "max_steps": 4, "devices": 1, "strategy": {},
            "resume_from": str(checkpoint)}
    return run(spec)


@pytest.mark.parametrize("kind, rank", [pytest.param("kill", 3, marks=pytest.mark.slow), ("raise", 1)])
def test_a_rank_that_dies_mid_step_ends_every_process(tmp_path, monkeypatch, kind, rank):
    # Rank 3 is the last pipeline stage; rank 1 the first stage of the second data-parallel
    # replica. Either way the other stages wait in point-to-point transfers when it fails.
    code, output, seconds = run_with_fault(tmp_path, monkeypatch, kind, rank, 3, PP2_DP2, devices=4)
    print(f"{kind} on rank {rank}: every process exited {seconds:.1f} s after the fault (exit {code})")
    assert code != 0, output[-3000:]
    assert seconds < TIMEOUT, output[-3000:]
    if kind == "raise":
        assert "injected fault" in output
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["epoch=0-step=2.ckpt"]
    resumed = resume_one_process(tmp_path / "checkpoints" / "epoch=0-step=2.ckpt")
    assert len(resumed["losses"]) == 2  # steps 3 and 4


def test_a_save_killed_midway_leaves_the_previous_checkpoint(tmp_path, monkeypatch):
    strategy = {"data_parallel": 2, "sharding": "full", "timeout": TIMEOUT}
    code, output, _ = run_with_fault(tmp_path, monkeypatch, "kill_in_save", 1, 4, strategy, devices=2)
    assert code != 0, output[-3000:]
    checkpoints = tmp_path / "checkpoints"
    assert sorted(p.name for p in checkpoints.iterdir()) == ["epoch=0-step=2.ckpt", "epoch=0-step=4.ckpt.partial"]
    resumed = resume_one_process(checkpoints / "epoch=0-step=2.ckpt")
    assert len(resumed["losses"]) == 2
    with pytest.raises(RuntimeError, match="incomplete checkpoint"):
        resume_one_process(checkpoints / "epoch=0-step=4.ckpt.partial")
