"""The start-up report: every rank's place in the mesh beside what it holds, in one block."""

import torch
from torch import nn

from lightning_parallel.layout import Layout
from lightning_parallel.report import Held, held_by, startup_report


def test_the_table_names_host_node_coordinates_and_what_each_rank_holds():
    ranks = [("localhost", 0, [0, 0, 0, 0]), ("localhost", 1, [1, 0, 0, 0])]
    held = [Held(1000, 1000, 2000, 16000), Held(1200, 1200, 2400, 2**20 * 3)]
    lines = startup_report(Layout(pp=2, dp=1, tp=1), ranks, held, ["Pipeline split ..."]).splitlines()
    assert lines[:4] == [
        "HybridParallel layout pp=2 x dp=1 x tp=1 on 2 processes",
        "  rank  host       node  pp  dp  tp  parameters  gradients  optimizer  MiB",
        "     0  localhost     0   0   0   0       1,000      1,000      2,000  0.0",
        "     1  localhost     1   1   0   0       1,200      1,200      2,400  3.0",
    ]
    assert lines[-1] == "Pipeline split ..."


def test_hybrid_sharding_shows_replica_and_shard():
    ranks = [("a", 0, [0, 0, 0, 0]), ("a", 0, [0, 0, 1, 0]), ("b", 1, [0, 1, 0, 0]), ("b", 1, [0, 1, 1, 0])]
    lines = startup_report(Layout(pp=1, dp=4, tp=1, dp_shard=2), ranks, [Held()] * 4).splitlines()
    assert lines[0] == "HybridParallel layout pp=1 x dp=4 (2 replicas x 2 shards) x tp=1 on 4 processes"
    assert [line.split()[4:6] for line in lines[2:6]] == [["0", "(0/0)"], ["1", "(0/1)"], ["2", "(1/0)"], ["3", "(1/1)"]]


def test_held_counts_gradients_of_trainable_parameters_and_the_optimizers_state():
    model = nn.Sequential(nn.Linear(4, 3), nn.Linear(3, 2))
    model[1].bias.requires_grad_(False)
    with torch.device("meta"):
        model.add_module("other_stage", nn.Linear(100, 100))  # another pipeline stage's: held elsewhere
    trainable = [p for p in model.parameters() if p.requires_grad and not p.is_meta]
    adam, sgd = torch.optim.AdamW(trainable), torch.optim.SGD(trainable, lr=0.1)
    assert held_by(model, [adam], training=True) == Held(23, 21, 42, 4 * (23 + 21 + 42))
    assert held_by(model, [sgd], training=True).optimizer == 0  # plain SGD keeps no state
    assert held_by(model, [adam], training=False) == Held(23, 0, 0, 4 * 23)
