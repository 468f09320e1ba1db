"""Runs parity specs for the tests; one-process references are computed once per session."""

import functools
import json
import re
from pathlib import Path

from lightning_parallel import parity
from tests import forkserver

REPO = Path(__file__).resolve().parents[1]


# A row of the start-up report's table: rank, host, node, pp, dp (with "(replica/shard)" under
# hybrid sharding), tp, (under expert parallelism: ep and the experts held, "2-3"), then what the
# rank holds (elements) and MiB.
REPORT_ROW = re.compile(r"^ +(?P<rank>\d+) +\S+ +(?P<node>\d+) +(?P<pp>\d+) +(?P<dp>\d+)(?: \((?P<replica>\d+)/(?P<shard>\d+)\))?"
                        r" +(?P<tp>\d+)(?: +(?P<ep>\d+) +(?P<experts>[\d/-]+))? +(?P<parameters>[\d,]+) +(?P<gradients>[\d,]+) +(?P<optimizer>[\d,]+) +[\d,.]+$", re.M)


def report_rows(output: str) -> list[dict]:
    """The start-up report's table as one dict per rank, of ints but for the experts held (replica
    and shard None unless hybrid, ep and experts None without expert parallelism)."""
    return [{name: value if value is None or name == "experts" else int(value.replace(",", ""))
             for name, value in match.groupdict().items()} for match in REPORT_ROW.finditer(output)]


def run(spec: dict, fork: bool = True) -> dict:
    """`parity.run(spec)`, its ranks forked from the session's fork server (tests/forkserver.py);
    `fork=False` starts them as users do, with Lightning's launcher."""
    return parity.run(spec, pythonpath=[str(REPO)], start=forkserver.run_processes if fork else None)


@functools.lru_cache(maxsize=None)
def _reference(key: str) -> dict:
    return run(json.loads(key))


def reference(spec: dict) -> dict:
    """The one-process run of `spec` (its strategy and devices replaced)."""
    return _reference(json.dumps({**spec, "strategy": None, "devices": 1}, sort_keys=True))


_SHARED: dict[str, dict] = {}


def shared_run(spec: dict) -> dict:
    """`run(spec)`, once per session: for runs that several test files read (a parity test and
    the planner's memory test, say). The record must not be modified. The spec runs as given:
    the order of its dicts (a tensor plan's, say) is part of the run."""
    key = json.dumps(spec, sort_keys=True)
    if key not in _SHARED:
        _SHARED[key] = run(spec)
    return _SHARED[key]


def ranks_reporting(failure: str, message: str) -> set[int]:
    """The ranks whose error line in a failed run's report (`parity.run`'s RuntimeError) holds
    `message`: "[rank1]: ...LayoutError: <message>"; a line without a rank counts as rank 0."""
    return {int(rank or 0) for rank in re.findall(rf"^(?:\[rank(\d+)\]: )?[\w.]+: {re.escape(message)}", failure, re.M)}


# Lightning's own defaults, which the parity worker turns off unless a spec asks for them: the
# progress bar, the model summary, the default logger and ModelCheckpoint.
LIGHTNING_DEFAULTS = {"enable_progress_bar": True, "enable_checkpointing": True, "enable_model_summary": True, "logger": True}


def defaults_on(spec: dict, batches: int | None = None) -> dict:
    """`spec` with Lightning's defaults on, and as many training samples as its steps read
    (`batches`, where optimizer steps are not batches), so that the run's one epoch ends at its
    last step and the default ModelCheckpoint saves there."""
    batches = batches or spec["max_steps"] * spec.get("trainer", {}).get("accumulate_grad_batches", 1)
    samples = spec["batch_size"] * batches
    return {**spec, "trainer": {**LIGHTNING_DEFAULTS, **spec.get("trainer", {})},
            "data_kwargs": {**spec.get("data_kwargs", {}), "n_train": samples},
            "callbacks": [*spec.get("callbacks", []), "tests.probes:CheckpointWritten"]}


def assert_checkpoint_saved(reference: dict, parallel: dict) -> None:
    """The default ModelCheckpoint of a `defaults_on` run saved where one process's did."""
    name, exists = parallel["checkpoint"]
    assert exists and (name, exists) == reference["checkpoint"], (reference["checkpoint"], parallel["checkpoint"])
