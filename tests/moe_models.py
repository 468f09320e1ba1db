"""Mixture-of-experts models for the expert-parallel tests, named by import path in specs: the
example GPT with each block's MLP a mixture of experts written as a user writes one (its experts
module meets the contract in lightning_parallel/expert_parallel.py: num_experts; every parameter
[experts, ...]; forward(hidden [N, H], top_k_index [N, k], top_k_weights [N, k])), and Hugging
Face MoE models trained with SGD."""

import math

import torch
import torch.nn.functional as F
from torch import nn

from examples.gpt import GPT
from tests.hf_models import HFCausalLM
from tests.models import GPT_PLAN

USER_EXPERTS = ["blocks.*.mlp.experts"]
# The example GPT's plan without the MLP, which is a mixture of experts here (experts are not split by tp).
MOE_GPT_PLAN = {glob: style for glob, style in GPT_PLAN.items() if ".mlp." not in glob}


class Experts(nn.Module):
    """Every expert's two-layer MLP, stacked on dim 0."""

    def __init__(self, num_experts: int, hidden: int, inner: int):
        super().__init__()
        self.num_experts = num_experts
        self.w_in = nn.Parameter(torch.empty(num_experts, hidden, inner))
        self.w_out = nn.Parameter(torch.empty(num_experts, inner, hidden))
        self.reset_parameters()

    def reset_parameters(self):
        nn.init.normal_(self.w_in, std=1 / math.sqrt(self.w_in.shape[1]))
        nn.init.normal_(self.w_out, std=1 / math.sqrt(self.w_out.shape[1]))

    def forward(self, hidden, top_k_index, top_k_weights):
        out = torch.zeros_like(hidden)
        for expert in range(self.num_experts):
            token, choice = torch.where(top_k_index == expert)
            if token.numel():
                y = F.gelu(hidden[token] @ self.w_in[expert]) @ self.w_out[expert]
                out = out.index_add(0, token, y * top_k_weights[token, choice, None])
        return out


class MoE(nn.Module):
    """A router choosing top_k experts per token, and the experts."""

    def __init__(self, hidden: int, num_experts: int, top_k: int, inner: int):
        super().__init__()
        self.top_k = top_k
        self.router = nn.Linear(hidden, num_experts, bias=False)
        self.experts = Experts(num_experts, hidden, inner)

    def forward(self, x):
        flat = x.reshape(-1, x.shape[-1])
        weights, chosen = torch.topk(self.router(flat).softmax(dim=-1), self.top_k, dim=-1)
        return self.experts(flat, chosen, weights / weights.sum(dim=-1, keepdim=True)).view_as(x)


def make_optimizer(module, kind: str, lr: float):
    """AdamW as users train; SGD where a test must see the gradients' scale (AdamW's steps do not
    change when a gradient is scaled by a constant)."""
    return (torch.optim.SGD if kind == "sgd" else torch.optim.AdamW)(module.parameters(), lr=lr)


class MoEGPT(GPT):
    """The example GPT whose blocks' MLPs are mixtures of experts."""

    def __init__(self, num_experts=4, top_k=2, expert_hidden=48, optimizer="adamw", **gpt):
        self.moe_shape = (num_experts, top_k, expert_hidden)
        self.optimizer_kind = optimizer
        super().__init__(**gpt)

    def build_layers(self):
        super().build_layers()
        for block in self.blocks:
            block.mlp = MoE(self.hparams.d_model, *self.moe_shape)

    def configure_optimizers(self):
        return make_optimizer(self, self.optimizer_kind, self.hparams.lr)


def moe_gpt(**overrides) -> MoEGPT:
    config = dict(vocab_size=64, seq_len=16, d_model=32, n_heads=4, n_layers=2, lr=3e-3)
    return MoEGPT(**{**config, **overrides})


class SGDCausalLM(HFCausalLM):
    """A Hugging Face causal LM (tests/hf_models.py) trained with SGD: see make_optimizer."""

    def __init__(self, family="qwen3_moe", lr=0.5, **kwargs):
        super().__init__(family, lr=lr, **kwargs)

    def configure_optimizers(self):
        return make_optimizer(self, "sgd", self.hparams.lr)


# Every Hugging Face family that declares experts (a base_model_ep_plan) and has a causal LM, built
# tiny: small experts, latent-attention and shared-expert sizes (a key a family does not know is
# kept on its config and unused), as many key/value heads as heads (latent attention needs it),
# eager attention (some families have no sdpa), lr 0.1 (at 0.5 some, deepseek_v4 and flex_olmo,
# do not descend, and one process and dp2 fully sharded drift apart by 1.5e-4).
MOE_TINY = dict(num_experts=4, num_local_experts=4, n_routed_experts=4, num_experts_per_tok=2, moe_topk=2,
                moe_intermediate_size=16, shared_expert_intermediate_size=16, expert_ffn_hidden_size=16,
                intermediate_size_mlp=64, n_shared_experts=1, n_group=1, topk_group=1, first_k_dense_replace=0,
                norm_topk_prob=True, q_lora_rank=16, kv_lora_rank=16, qk_rope_head_dim=8, qk_nope_head_dim=8,
                v_head_dim=8, qk_head_dim=16, num_key_value_heads=4, attn="eager", lr=0.1)
MOE_FAMILY_EXTRA = {
    "phimoe": dict(router_jitter_noise=0.0, input_jitter_noise=0.0),  # random in training, as dropout is
    "flex_olmo": dict(pad_token_id=0),
    "hy_v4": dict(pad_token_id=0),
    "mimo_v2_flash": dict(num_key_value_heads=2),  # its sliding-window layers' key/value heads stay at their default
    "zaya": dict(num_experts_per_tok=1),  # its only routing
}
# Families that declare experts but whose config cannot be made tiny here, and why.
MOE_NOT_BUILT = {
    **dict.fromkeys(("bailing_hybrid", "kimi_linear", "jamba"), "at 4 layers its default layer pattern has no attention "
                                                                "layer, which its mask code needs"),
    "dots3_note_text": "its config validation ties the text model to a vision adapter",
    "granitemoehybrid": "its mamba sizes must divide hidden_size times the expansion",
    "kolibri1_1": "its NVFP4 key/value rounding and indexer heads need larger heads",
    "lfm2_moe": "its config has no default layer_types",
    "qwen4_exp_text": "its config has no default token budget or compression ratio",
    **dict.fromkeys(("gemma4_text", "inkling_text", "inkling2_text", "inkling2_loop_text"),
                    "its defaults keep millions of parameters in other sizes than the tiny ones set here"),
}


def declared_moe_families() -> list[str]:
    """The installed transformers' families with a causal LM that declare experts."""
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    return sorted(family for family in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES
                  if family in CONFIG_MAPPING and getattr(CONFIG_MAPPING[family], "base_model_ep_plan", None))


def moe_family_kwargs(family: str) -> dict:
    """SGDCausalLM's arguments for `family` built tiny."""
    return {"family": family, **MOE_TINY, **MOE_FAMILY_EXTRA.get(family, {})}
