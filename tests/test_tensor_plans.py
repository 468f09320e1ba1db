"""Plan resolution and its checks: these run on every rank before any collective."""

import pytest
import torch
from torch import nn

from lightning_parallel import LayoutError
from lightning_parallel.tensor_parallel import resolve_plan
from lightning_parallel.tensor_parallel.infer import infer_plan
from tests.harness import run, ranks_reporting
from tests.models import GPT_PLAN, GPT_SP_PLAN, ResidualMLP, tiny_gpt


def test_auto_refuses_attention_and_shows_the_plan_to_write():
    with pytest.raises(LayoutError) as err:
        resolve_plan(tiny_gpt(), "auto", tp=2)
    message = str(err.value)
    assert "cannot prove that splitting these layers keeps the model's math" in message
    assert "blocks.*.attn.k_proj, blocks.*.attn.o_proj, blocks.*.attn.q_proj, blocks.*.attn.v_proj" in message
    for line in ("blocks.*.mlp.fc1: colwise", "blocks.*.attn.q_proj: colwise", "blocks.*.attn.o_proj: rowwise"):
        assert f"\n  {line}" in message


class GatedMLP(nn.Module):
    def __init__(self, d=8, h=16):
        super().__init__()
        self.gate, self.up, self.down = nn.Linear(d, h), nn.Linear(d, h), nn.Linear(h, d)

    def forward(self, x):
        return self.down(nn.functional.silu(self.gate(x)) * self.up(x))


class NormBetween(nn.Module):
    """A LayerNorm over the hidden features sits between the two Linears: not splittable."""

    def __init__(self, d=8, h=16):
        super().__init__()
        self.fc1, self.norm, self.fc2 = nn.Linear(d, h), nn.LayerNorm(h), nn.Linear(h, d)

    def forward(self, x):
        return self.fc2(self.norm(self.fc1(x)))


def test_inference_proves_gated_mlps_and_refuses_a_norm_in_between():
    plan = infer_plan(nn.ModuleList([GatedMLP(), GatedMLP()]))
    assert plan == {f"{i}.{name}": style for i in (0, 1) for name, style in
                    (("gate", "colwise"), ("up", "colwise"), ("down", "rowwise"))}
    assert infer_plan(ResidualMLP()) == {f"blocks.{i}.{j}": s for i in range(4) for j, s in ((1, "colwise"), (3, "rowwise"))}
    with pytest.raises(LayoutError, match=r"cannot prove .* splits nothing: \*\.fc1, \*\.fc2"):
        infer_plan(nn.ModuleList([NormBetween(), NormBetween()]))


@pytest.mark.parametrize(
    "module, plan, tp, message",
    [
        (tiny_gpt(), {"blocks.*.mlp.fc3": "colwise"}, 2,
         r"entry 'blocks.\*.mlp.fc3' matches no module of the model\. .* exactly one part of a dotted"),
        (tiny_gpt(), {"blocks.*.mlp.fc1": "diagonal"}, 2,
         r"Unknown tensor-parallel style 'diagonal' for 'blocks.\*.mlp.fc1'\. Known styles: colwise, "),
        (tiny_gpt(), GPT_PLAN, 8, r"blocks.0.attn.q_proj: 4 heads of size 8 cannot be split 8 ways"),
        (tiny_gpt(vocab_size=63), GPT_PLAN, 2,
         r"head \(colwise_gather_output\): out_features=63 is not divisible by tensor_parallel=2"),
        (tiny_gpt(), {"blocks.*.ln1": "colwise"}, 2, r"blocks.0.ln1 is a LayerNorm; style 'colwise' applies to nn.Linear"),
        (tiny_gpt(), GPT_SP_PLAN, 2, r"The plan uses \['sequence_parallel', 'shard_sequence'\], which need .*sequence_parallel=True"),
        (tiny_gpt(), 42, 2, r"tensor_plan must be 'auto', a dict of module-name globs to style names, or a callable"),
    ],
)
def test_bad_plans(module, plan, tp, message):
    with pytest.raises(LayoutError, match=message):
        resolve_plan(module, plan, tp)


def test_grouped_query_heads_must_divide():
    pytest.importorskip("transformers")
    from tests.models import TinyLlama

    with pytest.raises(LayoutError, match=r"model.config.num_key_value_heads=2 is not divisible by tensor_parallel=4"):
        resolve_plan(TinyLlama(), "auto", tp=4)


def test_loss_parallel_needs_a_vocabulary_split_head():
    plan = {k: v for k, v in GPT_PLAN.items() if k != "head"}
    with pytest.raises(LayoutError, match=r"loss_parallel=True needs the output head in the plan"):
        resolve_plan(tiny_gpt(), plan, tp=2, loss_parallel=True)


def test_bad_plan_fails_on_every_rank_without_hanging():
    spec = dict(model="tests.models:tiny_gpt", data="tests.models:token_data", batch_size=8, max_steps=2,
                devices=2, strategy={"tensor_parallel": 2, "tensor_plan": {"blocks.*.attn.q": "colwise"}})
    with pytest.raises(RuntimeError) as err:
        run(spec)
    assert ranks_reporting(str(err.value), "tensor_plan entry 'blocks.*.attn.q' matches no module") == {0, 1}
