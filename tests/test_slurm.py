"""SLURM: the example sbatch scripts as real jobs on a local cluster of two emulated nodes
(.ci/slurm/cluster.sh), and the layout checks that multi-node runs print."""

import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest

from lightning_parallel import parity
from lightning_parallel.layout import Layout, tensor_groups_across_nodes
from tests.harness import REPO, reference, report_rows, run

CLUSTER = REPO / ".ci" / "slurm" / "cluster.sh"
MULTI_NODE = REPO / "examples" / "slurm" / "multi_node.sbatch"
ONE_NODE = REPO / "examples" / "slurm" / "one_node.sbatch"
QUICK = ["trainer.max_steps=10", "model.n_layers=2"]
JOB_TIMEOUT = 600
UNFINISHED = ("PENDING", "CONFIGURING", "RUNNING", "COMPLETING", "")
TP_WARNING = "tensor_parallel=4 with 2 processes per node puts 1 tensor-parallel group(s) across nodes"


# ----------------------------------------------------------------- pure functions, no processes


@pytest.mark.parametrize(
    "degrees, nodes, expected",
    [
        ((2, 1, 2), [0, 0, 1, 1], []),                      # pp across nodes, tp within
        ((1, 1, 4), [0, 0, 1, 1], [[0, 1, 2, 3]]),          # tp larger than a node
        ((1, 3, 2), [0, 0, 0, 1, 1, 1], [[2, 3]]),          # tp=2 does not divide 3 per node
        ((1, 2, 2), [0, 0, 0, 0], []),                      # one node
    ],
)
def test_tensor_groups_across_nodes(degrees, nodes, expected):
    pp, dp, tp = degrees
    assert tensor_groups_across_nodes(Layout(pp=pp, dp=dp, tp=tp), nodes) == expected


def test_readme_shows_the_multi_node_script():
    readme = (REPO / "README.md").read_text()
    block = re.search(r"<!-- tested by tests/test_slurm.py -->\n```\w*\n(.*?)```", readme, re.S)
    assert block, "README.md has no code block marked as tested by tests/test_slurm.py"
    assert block.group(1) in MULTI_NODE.read_text()


# ----------------------------------------------------------------- jobs on the local cluster


def start_reason(proc: subprocess.CompletedProcess) -> str:
    said = [line for line in proc.stderr.splitlines() if line.startswith("cluster.sh:")]
    return " / ".join(said[-3:] or proc.stderr.splitlines()[-5:]) or f"exit status {proc.returncode}"


@pytest.fixture(scope="module")
def slurm_env():
    """The environment of a client of the local cluster. A cluster this fixture starts, it stops
    after the module's tests; one that was up already (.ci/run's) stays up."""
    was_up = subprocess.run(["bash", str(CLUSTER), "status"], capture_output=True, text=True).returncode == 0
    try:
        yield _started_cluster_env()
    finally:
        if not was_up:
            subprocess.run(["bash", str(CLUSTER), "stop"], capture_output=True, text=True, timeout=300)


def _started_cluster_env() -> dict:
    started = time.monotonic()
    proc = subprocess.run(["bash", str(CLUSTER), "start"], capture_output=True, text=True, timeout=900)
    if proc.returncode == 1 and os.environ.get("CI") == "true":
        # SLURM is installed but the cluster did not come up: in CI that is a failure, not a skip.
        pytest.fail(f"{CLUSTER.name} start failed: {start_reason(proc)}\n{proc.stderr[-4000:]}")
    if proc.returncode != 0:
        pytest.skip(f"no local SLURM cluster ({CLUSTER.name} start failed): {start_reason(proc)}")
    print(f"cluster start: {time.monotonic() - started:.1f}s")
    conf = re.search(r"export SLURM_CONF=(\S+)", proc.stdout).group(1)
    path = f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"  # the job's `python`
    # Emulated nodes share this host and their names do not resolve.
    return {**os.environ, "SLURM_CONF": conf, "PATH": path, "MASTER_ADDR": "127.0.0.1"}


def job_state(job: str, env: dict, fields: str = "%T") -> str:
    """squeue's `fields` for the job (its state by default), "" once squeue has forgotten it."""
    query = ["squeue", "-h", "-t", "all", "-j", job, "-o", fields]
    return subprocess.run(query, env=env, capture_output=True, text=True).stdout.strip()


def wait_for_job(job: str, env: dict) -> str:
    """Polls squeue (sbatch --wait polls every ~10 s) until the job ends; returns its state."""
    deadline = time.monotonic() + JOB_TIMEOUT
    while time.monotonic() < deadline:
        state = job_state(job, env)
        if state not in UNFINISHED:
            return state
        time.sleep(1)
    subprocess.run(["scancel", job], env=env)
    pytest.fail(f"SLURM job {job} did not end within {JOB_TIMEOUT}s")


def run_job(env: dict, tmp_path: Path, script: Path, shape: list[str], overrides: list[str]) -> str:
    """Submits `script` as a user would (from the repository root), waits, returns its output."""
    started = time.monotonic()
    out = tmp_path / "job.out"
    submit = ["sbatch", "--parsable", f"--output={out}", *shape, str(script), *overrides]
    job = subprocess.run(submit, cwd=REPO, env=env, capture_output=True, text=True, check=True).stdout.strip()
    state = wait_for_job(job.split(";")[0], env)
    output = out.read_text()
    print(f"{script.name} {' '.join(shape + overrides)}: {state} in {time.monotonic() - started:.1f}s\n{output}")
    assert state == "COMPLETED", f"SLURM job {job} ended {state}:\n{output[-4000:]}"
    assert re.search(r"train_loss by step: ", output), output[-4000:]
    return output


def printed_layout(output: str) -> list[dict]:
    """Each rank's node and mesh coordinate, from the layout rank 0 printed."""
    return report_rows(output)


def test_multi_node_job_puts_stages_across_nodes(slurm_env, tmp_path):
    shape = ["--nodes=2", "--ntasks-per-node=2"]
    output = run_job(slurm_env, tmp_path, MULTI_NODE, shape, QUICK)
    assert "HybridParallel layout pp=2 x dp=1 x tp=2 on 4 processes" in output
    ranks = printed_layout(output)
    assert [r["rank"] for r in ranks] == [0, 1, 2, 3], output[-4000:]
    assert all(r["node"] == r["pp"] for r in ranks), ranks  # stage 0 on n1, stage 1 on n2
    tensor_groups = {(r["pp"], r["dp"]): set() for r in ranks}
    for r in ranks:
        tensor_groups[(r["pp"], r["dp"])].add(r["node"])
    assert all(len(nodes) == 1 for nodes in tensor_groups.values()), ranks
    assert "across nodes" not in output


def test_job_with_tensor_groups_across_nodes_warns_and_trains(slurm_env, tmp_path):
    shape = ["--nodes=2", "--ntasks-per-node=2"]
    overrides = [*QUICK, "strategy.tensor_parallel=4", "strategy.pipeline_parallel=1"]
    output = run_job(slurm_env, tmp_path, MULTI_NODE, shape, overrides)
    assert "HybridParallel layout pp=1 x dp=1 x tp=4 on 4 processes" in output
    assert TP_WARNING in output, output[-4000:]
    assert "at most the devices per node (2) and a divisor of it" in output


@pytest.mark.slow  # the multi-node jobs run the same main job under srun in make test
def test_one_node_job(slurm_env, tmp_path):
    output = run_job(slurm_env, tmp_path, ONE_NODE, ["--nodes=1", "--ntasks-per-node=4"], QUICK)
    ranks = printed_layout(output)
    assert [r["node"] for r in ranks] == [0, 0, 0, 0], output[-4000:]


# The requeue job's model and data as a parity spec: the uninterrupted run is its one-process reference.
REQUEUE_SPEC = dict(model="tests.models:tiny_gpt", model_kwargs={"n_layers": 2}, data="tests.models:token_data",
                    batch_size=8, max_steps=12, loader="stateful")


@pytest.fixture(scope="module")
def preempted(slurm_env, tmp_path_factory):
    """The requeue job (pp=2 x dp=2 on two nodes, signalled after step 5): its run directory and output."""
    run_dir = tmp_path_factory.mktemp("requeue")
    job_script = REPO / "tests" / "slurm_requeue_job.py"
    submit = ["sbatch", "--parsable", "--nodes=2", "--ntasks-per-node=2", "--open-mode=append",
              f"--output={run_dir / 'job.out'}", f"--wrap=srun python {job_script} {run_dir} 1 5"]
    job = subprocess.run(submit, cwd=REPO, env=slurm_env, capture_output=True, text=True, check=True).stdout.strip()
    release_when_requeued(job, slurm_env)
    state = wait_for_job(job, slurm_env)
    output = (run_dir / "job.out").read_text()
    print(output)
    assert state == "COMPLETED", output[-4000:]
    return run_dir, output


def test_preempted_job_saves_requeues_and_resumes_with_the_next_batch(preempted):
    # Only rank 1 receives the requeue signal: the ranks must still save together (a save
    # inside each rank's signal handler would leave rank 0 out, or meet it mid-step).
    run_dir, output = preempted
    # Signalled after step 5: the vote starts at the next step and is read at the one after
    # (never waiting for a step's work), so the save holds 6 steps.
    assert re.findall(r"started at step (\d+)", output) == ["0", "6"], output[-4000:]
    assert "Requeued SLURM job" in output
    assert f"Restored all states from the checkpoint at {run_dir / 'hpc_ckpt_1.ckpt'}" in output
    assert "finished at step 12" in output.split("started at step 6", 1)[1], output[-4000:]
    # The requeued job reads batch 7 next, as the uninterrupted run did, not the epoch's first.
    resumed = [float(loss) for loss in re.findall(r"step \d+ loss (\S+)", output.split("started at step 6", 1)[1])]
    parity.assert_losses_close(reference(REQUEUE_SPEC)["losses"][6:], resumed)


@pytest.mark.parametrize("devices", [4, 1], ids=["dp4", "dp1"])
def test_preemption_save_resumes_under_another_data_parallel_degree(preempted, devices):
    run_dir, _ = preempted
    resumed = run({**REQUEUE_SPEC, "devices": devices, "strategy": {"data_parallel": devices},
                   "resume_from": str(run_dir / "hpc_ckpt_1.ckpt")})
    uninterrupted = reference(REQUEUE_SPEC)
    parity.assert_parity({**uninterrupted, "losses": uninterrupted["losses"][6:]}, resumed)


def release_when_requeued(job: str, env: dict) -> None:
    """A requeued job waits about two minutes before it may start again; start it now."""
    deadline = time.monotonic() + JOB_TIMEOUT
    while time.monotonic() < deadline:
        state = job_state(job, env, "%T %r")
        if state == "PENDING BeginTime":
            subprocess.run(["scontrol", "update", f"JobId={job}", "StartTime=now"], env=env, check=True)
            return
        if state.split(" ")[0] not in (*UNFINISHED, "REQUEUED"):
            pytest.fail(f"SLURM job {job} ended {state} before it was requeued")
        time.sleep(1)
    pytest.fail(f"SLURM job {job} was not requeued within {JOB_TIMEOUT}s")
