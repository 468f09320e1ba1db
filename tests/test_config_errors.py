"""Bad configurations fail at once, on every rank, with a message naming the problem and the fix."""

import os
import subprocess
import sys
import textwrap

import lightning.pytorch as pl
import pytest
import torch

from lightning_parallel import HybridParallel, Layout, LayoutError
from lightning_parallel.layout import check_backend
from tests.harness import REPO


def trainer(devices=2, **kwargs):
    return pl.Trainer(accelerator="cpu", devices=devices, logger=False, **kwargs)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"data_parallel": 0}, r"data_parallel must be >= 1, got 0\. Use 1 to turn"),
        ({"pipeline_parallel": -2}, r"pipeline_parallel must be >= 1, got -2"),
        ({"tensor_parallel": "2"}, r"tensor_parallel must be a positive int, got '2' \(str\)"),
        ({"data_parallel": 2.0}, r"data_parallel must be a positive int or \"auto\", got 2\.0"),
        ({"sharding": "zero3"}, r"sharding='zero3' is not one of \('none', 'full', 'hybrid'\): use 'none' .* or 'full'"),
        ({"data_parallel_shard": 2}, r"data_parallel_shard=2 applies to sharding='hybrid' only \(sharding='none'\)"),
        ({"sharding": "hybrid", "data_parallel_shard": 0}, r"data_parallel_shard must be >= 1, got 0"),
        ({"reduce_dtype": "fp16"}, r"reduce_dtype='fp16' is not one of .*'bfloat16', 'float32'"),
        ({"activation_checkpointing": True}, r"activation_checkpointing=True is not one of \('none', 'full', 'selective'\)"),
        ({"compile": "yes"}, r"compile must be True or False, got 'yes' \(str\)"),
        ({"sequence_parallel": "no"}, r"sequence_parallel must be True or False, got 'no' \(str\)"),
        ({"timeout": "600"}, r"timeout must be a number of seconds, got '600' \(str\)"),
        ({"timeout": True}, r"timeout must be a number of seconds, got True \(bool\)"),
        ({"schedule": ["1f1b"]}, r"schedule must be a schedule name, got \['1f1b'\] \(list\)"),
        ({"reshard_per_micro_batch": True}, r"reshard_per_micro_batch applies to pipeline stages: set pipeline_parallel > 1"),
        ({"reshard_per_micro_batch": True, "pipeline_parallel": 2, "schedule": "zbv"},
         r"reshard_per_micro_batch does not work with schedule='zbv', which computes weight gradients after"),
        ({"init_from": 3}, r"init_from must be a path, or None, got 3 \(int\)"),
    ],
)
def test_bad_arguments_fail_in_the_constructor(kwargs, message):
    with pytest.raises(LayoutError, match=message):
        HybridParallel(**kwargs)


def test_degrees_must_tile_the_world():
    with pytest.raises(LayoutError, match=r"1 x 2 x 1 = 2, but the world size \(devices x num_nodes\) is 3\. Make"):
        trainer(devices=3, strategy=HybridParallel(data_parallel=2))


def test_hybrid_shard_degree_must_divide_the_data_parallel_degree():
    with pytest.raises(LayoutError, match=r"data_parallel_shard=3 does not divide the data-parallel degree 4: hybrid"):
        Layout.resolve(4, "auto", 1, 1, sharding="hybrid", data_parallel_shard=3)
    assert Layout.resolve(8, "auto", 1, 1, sharding="hybrid", per_node=4).dp_shard == 4  # auto: a node's processes
    assert Layout.resolve(16, 8, 2, 1, sharding="hybrid", per_node=8).dp_shard == 4  # tp=2 within the node


def test_auto_needs_a_divisible_world():
    with pytest.raises(LayoutError, match=r"world size 6 .* not divisible by tensor_parallel x pipeline_parallel = 4 x 1"):
        Layout.resolve(6, "auto", tensor_parallel=4, pipeline_parallel=1)
    assert Layout.resolve(8, "auto", tensor_parallel=2, pipeline_parallel=2) == Layout(pp=2, dp=2, tp=2)


def test_nccl_on_cpu_is_refused():
    with pytest.raises(LayoutError, match=r"backend='nccl' needs CUDA devices, but the accelerator is 'cpu'\. Use backend='gloo'"):
        trainer(strategy=HybridParallel(backend="nccl"))


@pytest.mark.parametrize(
    "backend, device, message",
    [
        ("gloo", "cuda", r"backend='gloo' cannot run FSDP2's reduce-scatter on CUDA tensors\. Use backend='nccl'"),
        (None, "mps", r"runs on CPU \(gloo\) and CUDA \(nccl\) devices, not on 'mps'"),
        ("cpu:gloo", "cuda", r"names no backend for 'cuda' devices"),
        ("smoke", "cpu", r"Unknown process-group backend 'smoke'"),
    ],
)
def test_backend_and_device_mismatches(backend, device, message):
    with pytest.raises(LayoutError, match=message):
        check_backend(backend, torch.device(device))
    check_backend("cpu:gloo,cuda:nccl", torch.device("cuda"))  # a composite backend is fine


def test_unsupported_precision_is_refused():
    with pytest.raises(LayoutError, match=r"does not support precision='64-true'"):
        trainer(strategy=HybridParallel(), precision="64-true")


def test_registered_with_lightning():
    assert isinstance(trainer(strategy="hybrid").strategy, HybridParallel)


def test_every_rank_fails_before_any_collective(tmp_path):
    """Under torchrun each rank builds its own Trainer: all of them must raise, none may hang. The
    ranks start as torchrun starts them (its environment), without its agent, which would stop
    the second rank as soon as the first failed."""
    script = tmp_path / "bad.py"
    script.write_text(textwrap.dedent("""
        import lightning.pytorch as pl
        from lightning_parallel import HybridParallel
        pl.Trainer(accelerator="cpu", devices=2, strategy=HybridParallel(data_parallel=3))
    """))
    ranks = []
    for rank in (0, 1):
        env = {**os.environ, "RANK": str(rank), "LOCAL_RANK": str(rank), "WORLD_SIZE": "2", "LOCAL_WORLD_SIZE": "2",
               "GROUP_RANK": "0", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "29531", "TORCHELASTIC_RUN_ID": "bad"}
        ranks.append(subprocess.Popen([sys.executable, str(script)], env=env, cwd=REPO, text=True,
                                      stdout=subprocess.PIPE, stderr=subprocess.STDOUT))
    for rank, proc in enumerate(ranks):
        output, _ = proc.communicate(timeout=180)
        assert proc.returncode != 0, f"rank {rank} did not fail:\n{output[-3000:]}"
        assert "but the world size (devices x num_nodes) is 2" in output, f"rank {rank}:\n{output[-3000:]}"
