"""A fork server for the tests' parity runs: a process imports torch, Lightning, transformers and
the tests' modules once a session, and forks each run's ranks from there, ready to train.

A rank started with `python -m lightning_parallel.parity` spends about 6 s of CPU importing before
it trains; a forked rank spends none. Each forked rank gets what Lightning's launcher gives the
ranks it starts (MASTER_ADDR, MASTER_PORT, NODE_RANK, LOCAL_RANK, WORLD_SIZE: LightningEnvironment
sees processes created externally and starts none; rank 0 takes the thread count the launcher sets
in its own process), the test's environment, the run's working directory, and one stdout and one
stderr for the run, as the launcher's ranks share their parent's. A rank that fails ends the run
after the 5 s Lightning's process observer would give; a run past its timeout is killed as a group.

One server serves the runs of one environment (as far as start-up reads it): a run that sets
a variable glibc, torch or Lightning read only at start-up (MALLOC_MMAP_THRESHOLD_, TORCH_LOGS)
gets a server started with it. The tests' run-time settings (LP_TEST_*) go to the ranks alone.
"""

import atexit
import contextlib
import ctypes
import importlib
import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

from lightning_parallel import parity

REPO = Path(__file__).resolve().parents[1]
PRELOAD = ["torch", "lightning.pytorch", "torchmetrics", "transformers", "lightning_parallel", "lightning_parallel.parity",
           "tests.models", "tests.probes", "tests.hf_models", "tests.user_models"]
# Read when a run's code runs, not at import: a run may differ from the server in these.
RUN_TIME_VARIABLES = re.compile(r"PYTEST_CURRENT_TEST|LP_TEST_\w+")
FAILURE_GRACE = 5.0  # seconds the other ranks get to exit after one failed (Lightning's observer polls every 5 s)
PR_SET_PDEATHSIG = 1

_servers: dict[str, subprocess.Popen] = {}  # by start-up environment, for the session


# ---------------------------------------------------------------------------- in the tests' process


def run_processes(spec: dict, out_file: Path, pythonpath: list[str] = (), timeout: float = 600.0) -> subprocess.CompletedProcess:
    """`parity.run_processes` with the ranks forked from a server."""
    args = [str(parity.write_spec(spec, out_file)), str(out_file)]
    job = dict(args=args, env=parity.worker_env(pythonpath), cwd=str(out_file.parent), devices=spec.get("devices", 1),
               timeout=timeout, stdout=f"{out_file}.stdout", stderr=f"{out_file}.stderr")
    reply = _ask(_start_up_env(job["env"]), job)
    stdout, stderr = (Path(job[name]).read_text(errors="replace") for name in ("stdout", "stderr"))
    cmd = ["forkserver", *args]
    if reply["timed_out"]:
        raise subprocess.TimeoutExpired(cmd, timeout, stdout, stderr)
    return subprocess.CompletedProcess(cmd, reply["returncode"], stdout, stderr)


def _start_up_env(env: dict) -> dict:
    return {name: value for name, value in env.items() if not RUN_TIME_VARIABLES.fullmatch(name)}


def _ask(server_env: dict, job: dict) -> dict:
    """Sends `job` to the server of `server_env` (started if there is none) and waits for its reply."""
    key = json.dumps(server_env, sort_keys=True)
    server = _servers.get(key)
    if server is None or server.poll() is not None:
        server = _servers[key] = subprocess.Popen([sys.executable, "-m", "tests.forkserver"], env=server_env, cwd=REPO,
                                                  text=True, stdin=subprocess.PIPE, stdout=subprocess.PIPE)
        atexit.register(_stop, server)
    try:
        server.stdin.write(json.dumps(job) + "\n")
        server.stdin.flush()
        reply = server.stdout.readline()
    except BaseException:  # interrupted: the server (and with it the run's ranks) goes, the next run starts another
        _stop(server, wait=0)
        raise
    if not reply:
        raise RuntimeError(f"the fork server exited (code {server.wait()}); its output is on the tests' stderr")
    return json.loads(reply)


def _stop(server: subprocess.Popen, wait: float = 30) -> None:
    with contextlib.suppress(BrokenPipeError):
        server.stdin.close()  # the server ends after the run in progress
    try:
        server.wait(wait)
    except subprocess.TimeoutExpired:
        server.kill()
        server.wait()


# ---------------------------------------------------------------------------- in the server


def serve() -> None:
    """Imports what the ranks use, then runs one job per line of stdin, one reply per job."""
    ctypes.CDLL(None).prctl(PR_SET_PDEATHSIG, signal.SIGKILL)  # ends with the tests' process
    for module in PRELOAD:
        importlib.import_module(module)
    # Imports only: no torch op has run, so no thread pool exists to be lost in a fork, and no CUDA context.
    assert not sys.modules["torch"].cuda.is_initialized()
    library_pages = _resident_library_pages()
    replies = os.fdopen(os.dup(1), "w")
    os.dup2(2, 1)  # whatever a library prints goes to stderr, not into the replies
    for line in sys.stdin:
        returncode, timed_out = run_job(json.loads(line), replies.fileno(), library_pages)
        replies.write(json.dumps(dict(returncode=returncode, timed_out=timed_out)) + "\n")
        replies.flush()


def run_job(job: dict, replies: int, library_pages: list[int]) -> tuple[int, bool]:
    """Forks the job's ranks and waits for them; returns the exit code of the lowest rank that failed (0 if
    none failed) and whether the run timed out."""
    devices = job["devices"]
    env = dict(job["env"])
    if devices > 1:  # as Lightning's launcher sets them for the ranks it starts
        env.setdefault("MASTER_ADDR", "127.0.0.1")
        env.setdefault("MASTER_PORT", str(_free_port()))
        env.setdefault("NODE_RANK", "0")
        env["WORLD_SIZE"] = str(devices)
    for name in ("stdout", "stderr"):
        Path(job[name]).write_bytes(b"")
    sys.stdout.flush()
    sys.stderr.flush()
    pids: list[int] = []
    for rank in range(devices):
        pid = os.fork()
        if pid == 0:
            rank_env = {**env, "LOCAL_RANK": str(rank)} if devices > 1 else env
            _rank(job, rank_env, group=pids[0] if pids else 0, replies=replies, library_pages=library_pages)
        with contextlib.suppress(ProcessLookupError):  # here too: the group exists before the next rank joins it
            os.setpgid(pid, pids[0] if pids else pid)
        pids.append(pid)
    timed_out = _wait(pids, job["timeout"])
    with contextlib.suppress(ProcessLookupError):  # the ranks' group: what is left of it (their children)
        os.killpg(pids[0], signal.SIGKILL)
    codes = [os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1]) for pid in pids]
    return next((code for code in codes if code), 0), timed_out


def _wait(pids: list[int], timeout: float) -> bool:
    """Waits until every rank exited, one failed FAILURE_GRACE ago, or the timeout passed; leaves
    them unreaped (their pids and group stay theirs). Returns whether the timeout passed."""
    deadline, failed_at = time.monotonic() + timeout, None
    while True:
        exited = [os.waitid(os.P_PID, pid, os.WEXITED | os.WNOHANG | os.WNOWAIT) for pid in pids]
        now = time.monotonic()
        if failed_at is None and any(e and (e.si_code != os.CLD_EXITED or e.si_status) for e in exited):
            failed_at = now
        if all(exited) or (failed_at is not None and now > failed_at + FAILURE_GRACE):
            return False
        if now > deadline:
            return True
        time.sleep(0.01)


def _rank(job: dict, env: dict, group: int, replies: int, library_pages: list[int]):
    """One rank, in the forked process: the run's environment, directory and output, then the worker."""
    code = 1
    try:
        os.setpgid(0, group)
        ctypes.CDLL(None).prctl(PR_SET_PDEATHSIG, signal.SIGKILL)  # ends with the server
        os.close(replies)
        for fd, path, flags in ((0, os.devnull, os.O_RDONLY), (1, job["stdout"], os.O_WRONLY | os.O_APPEND),
                                (2, job["stderr"], os.O_WRONLY | os.O_APPEND)):
            opened = os.open(path, flags)
            os.dup2(opened, fd)
            os.close(opened)
        os.environ.clear()
        os.environ.update(env)
        os.chdir(job["cwd"])
        sys.argv, sys.path[0] = [parity.__file__, *job["args"]], job["cwd"]  # as `python -m` in that directory sets them
        if "LOCAL_RANK" in env:
            _as_launched(int(env["LOCAL_RANK"]), int(env["WORLD_SIZE"]))
        # A fork maps the libraries' pages again only as it touches them: touched now, they count in
        # the resident memory the worker reads after its imports, as in a process that imported them.
        for address in library_pages:
            ctypes.string_at(address, 1)
        parity._worker(*job["args"])
        code = 0
    except SystemExit as stop:
        code = stop.code if isinstance(stop.code, int) else int(stop.code is not None)
    except BaseException:
        sys.excepthook(*sys.exc_info())
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)


def _as_launched(rank: int, world_size: int) -> None:
    """What a rank's start-up under Lightning's launcher sets that a fork inherits from the server."""
    from lightning.fabric.utilities.distributed import _set_num_threads_if_needed
    from lightning.fabric.utilities.rank_zero import rank_zero_only
    from torchmetrics.utilities import prints

    # Lightning and torchmetrics read the rank from LOCAL_RANK when imported.
    rank_zero_only.rank = prints.rank_zero_only.rank = rank
    if rank == 0:  # the launcher sets OMP_NUM_THREADS and the thread count in its own process, rank 0
        _set_num_threads_if_needed(num_processes=world_size)


def _resident_library_pages() -> list[int]:
    """The addresses of this process's resident pages of mapped files (the libraries)."""
    page = os.sysconf("SC_PAGE_SIZE")
    pages = []
    with open("/proc/self/maps") as maps, open("/proc/self/pagemap", "rb") as pagemap:
        for line in maps:
            fields = line.split()
            if len(fields) < 6 or "r" not in fields[1] or not fields[5].startswith("/") or fields[5].startswith("/dev/"):
                continue
            start, end = (int(address, 16) for address in fields[0].split("-"))
            pagemap.seek(start // page * 8)
            entries = pagemap.read((end - start) // page * 8)
            pages += [start + i * page for i in range(len(entries) // 8) if entries[8 * i + 7] & 0x80]  # bit 63: present
    return pages


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("", 0))
        return probe.getsockname()[1]


if __name__ == "__main__":
    serve()
