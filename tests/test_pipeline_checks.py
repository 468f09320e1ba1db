"""Pipeline configuration checks and the measured-cost split; these run before any collective."""

import pytest
import torch
from torch import nn

from lightning_parallel import HybridParallel, LayoutError
from lightning_parallel.pipeline import SCHEDULES, split_model
from lightning_parallel.pipeline.balance import balanced_split, profile, stage_costs
from lightning_parallel.pipeline.runner import split_batch
from tests.harness import run
from tests.models import token_data, tiny_gpt


def split(module, pp=2, schedule="1f1b", micro_batches=4, pipeline_split="auto", batch=None):
    batch = batch if batch is not None else [t[:8] for t in token_data()[0].tensors]
    return split_model(module, "training_step", batch, pp, 0, SCHEDULES[schedule], micro_batches, pipeline_split)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"pipeline_parallel": 2, "schedule": "pipedream"}, r"schedule='pipedream': unknown pipeline schedule; choose one of gpipe, 1f1b"),
        ({"pipeline_parallel": 4, "schedule": "1f1b", "micro_batches": 2}, r"'1f1b' with pipeline_parallel=4 needs micro_batches >= 4, got 2"),
        ({"pipeline_parallel": 2, "schedule": "dualpipev", "micro_batches": 3}, r"'dualpipev' with pipeline_parallel=2 needs micro_batches >= 4"),
        ({"pipeline_parallel": 2, "micro_batches": 0}, r"micro_batches must be a positive int, got 0"),
        ({"pipeline_parallel": 2, "pipeline_split": "blocks.1"}, r"pipeline_split must be 'auto' or a list of layer names"),
        ({"pipeline_parallel": 2, "tensor_parallel": 2, "tensor_plan": print}, r"A callable tensor_plan parallelizes the whole module"),
    ],
)
def test_bad_pipeline_arguments(kwargs, message):
    with pytest.raises(LayoutError, match=message):
        HybridParallel(**kwargs)


def test_more_stages_than_layers():
    with pytest.raises(LayoutError, match=r"4 pipeline stages \(2 ranks x 2 stages each\) need at least 4 layers in the trunk 'blocks'"):
        split(tiny_gpt(n_layers=3), schedule="interleaved_1f1b")


def test_bad_split_points():
    with pytest.raises(LayoutError, match=r"split point 'blocks.9' is not a layer of the trunk 'blocks'"):
        split(tiny_gpt(n_layers=4), pipeline_split=["blocks.9"])
    with pytest.raises(LayoutError, match=r"lists 2 split points, but 2 stages need 1"):
        split(tiny_gpt(n_layers=4), pipeline_split=["blocks.1", "blocks.2"])


class Branchy(nn.Module):
    def __init__(self):
        super().__init__()
        self.blocks = nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 4), nn.Linear(4, 4))

    def forward(self, x):
        if x.sum() > 0:  # data-dependent control flow
            x = -x
        return self.blocks(x)

    def training_step(self, batch, batch_idx):
        return self(batch).sum()


def test_forward_the_splitter_cannot_handle():
    with pytest.raises(LayoutError, match=r"cannot split Branchy.forward: torch.fx could not trace it .* must not branch on tensor"):
        split(Branchy(), batch=torch.randn(8, 4))


def test_weights_tied_across_stages():
    model = tiny_gpt(n_layers=4)
    model.head.weight = model.tok_emb.weight
    with pytest.raises(LayoutError, match=r"'tok_emb.weight' \(stage 0\) and 'head.weight' \(stage 1\) are one tied weight"):
        split(model, pipeline_split=["blocks.2"])


def test_parameters_used_directly_in_forward_are_refused():
    class DirectParam(Branchy):
        def __init__(self):
            super().__init__()
            self.scale = nn.Parameter(torch.ones(4))

        def forward(self, x):
            return self.blocks(x) * self.scale

    with pytest.raises(LayoutError, match=r"uses the parameter 'scale' directly\. .* wrap it in a small nn.Module"):
        split(DirectParam(), batch=torch.randn(8, 4))


def test_step_must_call_the_model():
    class NoForward(Branchy):
        def training_step(self, batch, batch_idx):
            return self.blocks(batch).sum()

    with pytest.raises(LayoutError, match=r"NoForward.training_step never calls self\(...\)"):
        split(NoForward(), batch=torch.randn(8, 4))


def test_batch_not_divisible_into_micro_batches():
    with pytest.raises(LayoutError, match=r"A batch of 10 samples does not divide into micro_batches=4\. Make each rank's batch"):
        split_batch((torch.zeros(10, 3), torch.zeros(10)), 4)


def test_batch_not_divisible_fails_on_every_rank_without_hanging():
    spec = dict(model="tests.models:tiny_gpt", data="tests.models:token_data", batch_size=8, max_steps=2,
                devices=2, strategy={"pipeline_parallel": 2, "micro_batches": 3, "schedule": "gpipe"})
    with pytest.raises(RuntimeError) as err:
        run(spec)
    assert str(err.value).count("LayoutError: A batch of 8 samples does not divide into micro_batches=3") == 2


class HeavyHead(nn.Module):
    """Sixteen small blocks and an output head that costs about four of them."""

    def __init__(self, d=128, vocab=1024, n=16):
        super().__init__()
        self.emb = nn.Embedding(vocab, d)
        self.blocks = nn.ModuleList([nn.Sequential(nn.Linear(d, d), nn.GELU(), nn.Linear(d, d)) for _ in range(n)])
        self.head = nn.Linear(d, vocab)

    def forward(self, idx):
        x = self.emb(idx)
        for block in self.blocks:
            x = x + block(x)
        return self.head(x)


def test_auto_split_balances_measured_cost_where_layer_counts_do_not():
    torch.manual_seed(0)
    model = HeavyHead()
    idx = torch.randint(1024, (8, 64))
    measured = profile(model, list(model.blocks), lambda: model(idx), repeats=5)
    auto = balanced_split(measured.blocks, measured.prologue, measured.epilogue, 2)
    by_count = [0] * 8 + [1] * 8

    def spread(block_stage):
        costs = stage_costs(measured, block_stage, 2)
        return (max(costs) - min(costs)) / max(costs)

    assert measured.epilogue > 2 * max(measured.blocks)  # the head is heavy
    assert spread(auto) <= 0.15, (auto, measured)
    assert spread(by_count) > 0.15, measured
    assert auto.count(0) > 8  # the first stage takes more blocks to make up for the head
