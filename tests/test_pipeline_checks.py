"""Pipeline configuration checks and the measured-cost split; these run before any collective."""

import pytest
import torch
from torch import nn

from lightning_parallel import HybridParallel, LayoutError
from lightning_parallel.pipeline import SCHEDULES, split_model
from lightning_parallel.pipeline.balance import stage_costs
from lightning_parallel.pipeline.cost import CPU
from lightning_parallel.pipeline.runner import split_batch
from lightning_parallel.pipeline.schedules import stages_of_rank
from lightning_parallel.pipeline.tied import Tie, check_ties
from tests.harness import run, ranks_reporting
from tests.models import token_data, tiny_gpt
from tests.stage_timing import plan_for, spread


def split(module, pp=2, schedule="1f1b", micro_batches=4, pipeline_split="auto", batch=None):
    batch = batch if batch is not None else [t[:8] for t in token_data()[0].tensors]
    return split_model(module, "training_step", batch, pp, 0, SCHEDULES[schedule], micro_batches, pipeline_split, CPU)


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


def test_more_stages_than_places_to_cut():
    class TwoCalls(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = nn.Linear(4, 4), nn.Linear(4, 4)

        def forward(self, x):
            return self.b(self.a(x))

        def training_step(self, batch, batch_idx):
            return self(batch).sum()

    with pytest.raises(LayoutError, match=r"4 pipeline stages need 3 places to cut the forward, but it offers 1: it calls a, b\."):
        split(TwoCalls(), schedule="interleaved_1f1b", batch=torch.randn(8, 4))


def test_bad_split_points():
    with pytest.raises(LayoutError, match=r"split point 'blocks.9' is not a module the forward calls after its first one; the forward calls, in order: tok_emb, pos_emb, drop, blocks.0, blocks.1"):
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


def test_weights_tied_across_stages_are_found_and_reported():
    model = tiny_gpt(n_layers=4)
    model.head.weight = model.tok_emb.weight
    stages = split(model, pipeline_split=["blocks.2"])
    assert stages.ties == [Tie(("tok_emb.weight", "head.weight"), (0, 1))]
    assert "tied across stages 0, 1: tok_emb.weight = head.weight (gradients summed)" in stages.report
    # Stage 0 keeps the weight: the rank of stage 0 holds it (and stage 1's rank its copy).
    assert any(p is model.tok_emb.weight for p in stages.stage_modules[0].parameters())


def test_a_weight_read_directly_by_another_stage_is_refused():
    class ReadsEmbedding(nn.Module):
        def __init__(self):
            super().__init__()
            self.emb = nn.Embedding(64, 8)
            self.blocks = nn.Sequential(*[nn.Linear(8, 8) for _ in range(4)])

        def forward(self, x):
            return nn.functional.linear(self.blocks(self.emb(x)), self.emb.weight)  # read on the last stage

        def training_step(self, batch, batch_idx):
            return self(batch[0]).mean()

    with pytest.raises(LayoutError, match=r"reads the parameter 'emb.weight' directly on pipeline stage 1, while modules "
                                          r"of stage\(s\) \[0\] use it too"):
        split(ReadsEmbedding(), pipeline_split=["blocks.2"])


TIE = Tie(("model.embed_tokens.weight", "lm_head.weight"), (0, 3))


@pytest.mark.parametrize("schedule, splits, message", [
    ("zbv", True, r"model.embed_tokens.weight and lm_head.weight are one weight tied across stages \[0, 3\], which "
                  r"this schedule puts on one rank; with tensor or data parallelism"),
    ("zbv", False, None),  # one rank holds both stages: nothing to sum, nothing sharded apart
    ("interleaved_1f1b", True, None),
])
def test_ties_under_the_schedules(schedule, splits, message):
    spec = SCHEDULES[schedule]
    rank_of_stage = {s: r for r in range(2) for s in stages_of_rank(spec, r, 2)}.__getitem__
    if message is None:
        check_ties([TIE], rank_of_stage, splits, None, "")
    else:
        with pytest.raises(LayoutError, match=message):
            check_ties([TIE], rank_of_stage, splits, None, "")


def test_ties_split_alike_by_the_tensor_plan():
    one_rank_each = [0, 1, 0, 1].__getitem__
    alike = {"model.model.embed_tokens": "embedding_rowwise", "model.lm_head": "colwise_gather_output"}
    check_ties([TIE], one_rank_each, True, alike, "model.")
    with pytest.raises(LayoutError, match=r"split differently by the tensor-parallel plan: model.model.embed_tokens.weight "
                                          r"\(not split\), model.lm_head.weight \(dim 0\).*'embedding_rowwise'"):
        check_ties([TIE], one_rank_each, True, {"model.lm_head": "colwise_gather_output"}, "model.")


def test_bare_parameters_belong_to_the_stage_that_reads_them():
    class DirectParam(Branchy):
        def __init__(self):
            super().__init__()
            self.scale = nn.Parameter(torch.ones(4))

        def forward(self, x):
            return self.blocks(x) * self.scale

    model = DirectParam()
    last = split_model(model, "training_step", torch.randn(8, 4), 2, 1, SCHEDULES["1f1b"], 4, "auto", CPU)
    assert any(p is model.scale for p in last.stage_modules[0].parameters())
    assert "+ scale" in last.report.splitlines()[2]  # the last stage's line
    first = split_model(DirectParam(), "training_step", torch.randn(8, 4), 2, 0, SCHEDULES["1f1b"], 4, "auto", CPU)
    assert not any(p.shape == (4,) and p.dim() == 1 and p is not None and "scale" in n
                   for n, p in first.stage_modules[0].named_parameters())


def test_a_module_using_another_modules_parameter_is_refused():
    class Borrower(nn.Module):
        def __init__(self, lender):
            super().__init__()
            object.__setattr__(self, "lender", lender)  # a reference the graph cannot see

        def forward(self, x):
            return x @ self.lender.weight

    class Borrowing(Branchy):
        def __init__(self):
            super().__init__()
            self.borrower = Borrower(self.blocks[0])

        def forward(self, x):
            return self.borrower(self.blocks(x))

    with pytest.raises(LayoutError, match=r"'borrower' uses the parameter\(s\) \['blocks.0.weight'\], which belong to another module"):
        split(Borrowing(), batch=torch.randn(8, 4))


def test_step_must_call_the_model():
    class NoForward(Branchy):
        def training_step(self, batch, batch_idx):
            return (batch @ self.blocks[0].weight).sum()

    with pytest.raises(LayoutError, match=r"NoForward.training_step never calls the model\. .* `self\(x\)` or a child module's `self.model\(x\)`"):
        split(NoForward(), batch=torch.randn(8, 4))


def test_batch_not_divisible_into_micro_batches():
    with pytest.raises(LayoutError, match=r"A batch of 10 samples does not divide into micro_batches=4\. Make each rank's batch"):
        split_batch((torch.zeros(10, 3), torch.zeros(10)), 4)


def test_batch_not_divisible_fails_on_every_rank_without_hanging():
    spec = dict(model="tests.models:tiny_gpt", data="tests.models:token_data", batch_size=8, max_steps=2,
                devices=2, strategy={"pipeline_parallel": 2, "micro_batches": 3, "schedule": "gpipe"})
    with pytest.raises(RuntimeError) as err:
        run(spec)
    assert ranks_reporting(str(err.value), "A batch of 8 samples does not divide into micro_batches=3") == {0, 1}


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


def test_auto_split_balances_cost_where_layer_counts_do_not():
    """Counted costs; the same splits timed on this machine: benchmarks/balance.py."""
    torch.manual_seed(0)
    model = HeavyHeadModule()
    batch = torch.randint(1024, (16, 64))
    _, chosen, plan, _ = plan_for(model, batch, 2)
    assert chosen.costs[-1] > 2 * max(chosen.costs[1:-1])  # the head is counted heavy
    assert plan.owned_modules[0].count("emb") and len(plan.owned_modules[0]) > 9  # stage 0 takes more blocks
    _, even, _, _ = plan_for(model, batch, 2, names=["blocks.8"])
    assert spread(stage_costs(chosen.costs, chosen.unit_stage, 2)) <= 0.15
    assert spread(stage_costs(even.costs, even.unit_stage, 2)) > 0.15


class HeavyHeadModule(HeavyHead):
    def training_step(self, batch, batch_idx):
        return self(batch).float().pow(2).mean()


class IdenticalBlocks(nn.Module):
    """A Llama-like trunk of four identical blocks and a small head."""

    def __init__(self, d=64):
        super().__init__()
        self.emb = nn.Embedding(128, d)
        self.blocks = nn.ModuleList([nn.Sequential(nn.LayerNorm(d), nn.Linear(d, 4 * d), nn.GELU(), nn.Linear(4 * d, d)) for _ in range(4)])
        self.norm = nn.LayerNorm(d)
        self.head = nn.Linear(d, 128)

    def forward(self, idx):
        x = self.emb(idx)
        for block in self.blocks:
            x = x + block(x)
        return self.head(self.norm(x))

    def training_step(self, batch, batch_idx):
        return self(batch).pow(2).mean()


def test_identical_blocks_split_evenly_every_time():
    batch = torch.randint(128, (8, 32))
    for _ in range(10):
        _, chosen, plan, _ = plan_for(IdenticalBlocks(), batch, 2)
        assert [m for m in plan.owned_modules[0] if m.startswith("blocks.")] == ["blocks.0", "blocks.1"], plan.owned_modules
        assert [m for m in plan.owned_modules[1] if m.startswith("blocks.")] == ["blocks.2", "blocks.3"], plan.owned_modules


def test_cuts_only_where_one_tensor_crosses():
    class Pairs(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b, self.c = nn.Linear(4, 4), nn.Linear(4, 4), nn.Linear(4, 4)

        def forward(self, x):
            pair = (self.a(x), x.shape[0])  # a tuple crosses if cut after a
            h = self.b(pair[0]) * pair[1]
            return self.c(h)

        def training_step(self, batch, batch_idx):
            return self(batch).sum()

    _, chosen, plan, _ = plan_for(Pairs(), torch.randn(8, 4), 2)
    assert plan.owned_modules == [["a", "b"], ["c"]] or plan.owned_modules[0] == ["a"]


def test_a_step_using_the_forwards_parameters_is_refused_on_every_rank():
    spec = dict(model="tests.models:penalized_gpt", data="tests.models:token_data", batch_size=8, max_steps=2,
                devices=2, strategy={"pipeline_parallel": 2, "micro_batches": 2, "schedule": "gpipe"})
    with pytest.raises(RuntimeError) as err:
        run(spec)
    message = "PenalizedGPT.training_step uses the parameter(s) ['head.weight'] itself, outside the forward"
    assert ranks_reporting(str(err.value), message) == {0, 1}


class SwinLayer(nn.Module):
    """A stage of a Swin-style model: its own list of blocks, then a downsampling merge."""

    def __init__(self, dim, depth, merge):
        super().__init__()
        self.blocks = nn.ModuleList([nn.Sequential(nn.LayerNorm(dim), nn.Linear(dim, 2 * dim), nn.GELU(), nn.Linear(2 * dim, dim))
                                     for _ in range(depth)])
        self.merge = nn.Linear(dim, 2 * dim) if merge else nn.Identity()

    def forward(self, x):
        for block in self.blocks:
            x = x + block(x)
        return self.merge(x)


class SwinStyle(nn.Module):
    def __init__(self, dim=32, depths=(2, 2, 6, 2)):
        super().__init__()
        self.embed = nn.Linear(12, dim)
        self.layers = nn.ModuleList([SwinLayer(dim * 2**i, d, i < len(depths) - 1) for i, d in enumerate(depths)])
        self.head = nn.Linear(dim * 2 ** (len(depths) - 1), 5)

    def forward(self, x):
        x = self.embed(x)
        for layer in self.layers:
            x = layer(x)
        return self.head(x.mean(1))

    def training_step(self, batch, batch_idx):
        return self(batch).pow(2).mean()


def test_hierarchical_stages_split_inside_a_container_when_whole_ones_do_not_balance():
    batch = torch.randn(8, 64, 12)
    _, chosen, plan, _ = plan_for(SwinStyle(), batch, 2)
    assert "layers.2" in chosen.opened, chosen.opened
    def layers_of(stage):  # "layers.2.blocks.0" -> "layers.2"
        return {".".join(name.split(".")[:2]) for name in plan.owned_modules[stage]}

    inside = layers_of(0) & layers_of(1)
    assert inside == {"layers.2"}, plan.owned_modules  # the cut falls inside the third stage
    auto = spread(stage_costs(chosen.costs, chosen.unit_stage, 2))
    assert auto <= 0.15
    for whole in ["layers.1", "layers.2", "layers.3", "head"]:
        _, between, _, _ = plan_for(SwinStyle(), batch, 2, names=[whole])
        assert spread(stage_costs(between.costs, between.unit_stage, 2)) > max(auto, 0.15), whole


def test_hugging_face_embeddings_tied_across_stages():
    from tests.models import TinyLlama

    model = TinyLlama(layers=4)
    model.model.lm_head.weight = model.model.model.embed_tokens.weight  # tie_word_embeddings
    assert split(model).ties == [Tie(("model.embed_tokens.weight", "lm_head.weight"), (0, 1))]
