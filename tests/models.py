"""Tiny models and data for the parity tests, named by import path in parity specs."""

import lightning.pytorch as pl
import torch
import torch.nn.functional as F
import torchmetrics
from torch import nn
from torch.utils.data import TensorDataset

from examples.gpt import GPT


def tiny_gpt(**overrides) -> GPT:
    config = dict(vocab_size=64, seq_len=16, d_model=32, n_heads=4, n_layers=2, lr=1e-3)
    return GPT(**{**config, **overrides})


class ScheduledGPT(GPT):
    """The example GPT with a learning rate that halves every 3 steps: resuming must restore
    the scheduler's state too."""

    def configure_optimizers(self):
        optimizer = super().configure_optimizers()
        scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=3, gamma=0.5)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}


def scheduled_gpt(**overrides) -> ScheduledGPT:
    config = dict(vocab_size=64, seq_len=16, d_model=32, n_heads=4, n_layers=2, lr=1e-3)
    return ScheduledGPT(**{**config, **overrides})


def token_data(n_train=64, n_val=16, seq_len=16, vocab=64, seed=1234):
    """Random token sequences whose target is the next token of a fixed permutation (learnable)."""
    gen = torch.Generator().manual_seed(seed)
    mapping = torch.randperm(vocab, generator=gen)

    def split(n):
        x = torch.randint(vocab, (n, seq_len), generator=gen)
        return TensorDataset(x, mapping[x])

    return split(n_train), split(n_val)


class ResidualMLP(pl.LightningModule):
    """A non-transformer: a residual MLP whose forward loops over an nn.Sequential of unequal blocks."""

    def __init__(self, d_in=12, widths=(16, 48, 24, 16), d_out=4, lr=1e-2, optimizer="sgd"):
        super().__init__()
        self.save_hyperparameters()
        self.inp = nn.Linear(d_in, 16)
        self.blocks = nn.Sequential(*[nn.Sequential(nn.LayerNorm(16), nn.Linear(16, w), nn.Tanh(), nn.Linear(w, 16)) for w in widths])
        self.out = nn.Linear(16, d_out)
        self.val_mse = torchmetrics.MeanSquaredError()

    def forward(self, x):
        h = self.inp(x)
        for block in self.blocks:
            h = h + block(h)
        return self.out(h)

    def training_step(self, batch, batch_idx):
        x, y = batch
        loss = F.mse_loss(self(x), y)
        self.log("train_loss", loss, sync_dist=True)
        return loss

    def validation_step(self, batch, batch_idx):
        x, y = batch
        pred = self(x)
        self.log("val_loss", F.mse_loss(pred, y), sync_dist=True)
        self.val_mse(pred, y)
        self.log("val_mse", self.val_mse)

    def configure_optimizers(self):
        if self.hparams.optimizer == "adamw":
            return torch.optim.AdamW(self.parameters(), lr=self.hparams.lr)
        return torch.optim.SGD(self.parameters(), lr=self.hparams.lr, momentum=0.9)


def regression_data(n_train=64, n_val=16, d_in=12, d_out=4, seed=4321):
    gen = torch.Generator().manual_seed(seed)
    w = torch.randn(d_in, d_out, generator=gen)

    def split(n):
        x = torch.randn(n, d_in, generator=gen)
        return TensorDataset(x, torch.sin(x @ w))

    return split(n_train), split(n_val)


def example_corpus(seq_len=32, n_train=64, n_val=32):
    """The main job's byte corpus (examples/data.py), cut small."""
    from torch.utils.data import Subset

    from examples.data import make_datasets

    train, val = make_datasets(seq_len=seq_len, max_train_samples=n_train)
    return train, Subset(val, range(n_val))


GPT_PLAN = {
    "tok_emb": "embedding_rowwise",
    "blocks.*.attn.q_proj": "colwise",
    "blocks.*.attn.k_proj": "colwise",
    "blocks.*.attn.v_proj": "colwise",
    "blocks.*.attn.o_proj": "rowwise",
    "blocks.*.mlp.fc1": "colwise",
    "blocks.*.mlp.fc2": "rowwise",
    "head": "colwise_gather_output",
}
# Sequence parallelism: the residual stream between tensor-parallel regions is split along the
# sequence from the first block on; norms run on sequence shards.
GPT_SP_PLAN = {
    **{k: v for k, v in GPT_PLAN.items() if k != "tok_emb"},
    "blocks.0": "shard_sequence",
    "blocks.*.ln1": "sequence_parallel",
    "blocks.*.ln2": "sequence_parallel",
    "norm": "sequence_parallel",
}


class SelfParallelGPT(GPT):
    """Written for Lightning's ModelParallelStrategy: parallelizes itself in configure_model."""

    def configure_model(self):
        from torch.distributed.tensor import DTensor

        if self.device_mesh is None or isinstance(self.head.weight, DTensor) or isinstance(self.blocks[0].mlp.fc1.weight, DTensor):
            return  # one process, or already parallelized (Lightning calls this hook again for validate)
        from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel, parallelize_module

        plan = {"attn.q_proj": ColwiseParallel(), "attn.k_proj": ColwiseParallel(), "attn.v_proj": ColwiseParallel(),
                "attn.o_proj": RowwiseParallel(), "mlp.fc1": ColwiseParallel(), "mlp.fc2": RowwiseParallel()}
        for block in self.blocks:
            parallelize_module(block, self.device_mesh["tensor_parallel"], plan)


def self_parallel_gpt(**overrides):
    config = dict(vocab_size=64, seq_len=16, d_model=32, n_heads=4, n_layers=2, lr=1e-3)
    return SelfParallelGPT(**{**config, **overrides})


class TinyLlama(pl.LightningModule):
    """A Hugging Face LlamaForCausalLM from a tiny config (random weights, nothing downloaded)."""

    def __init__(self, vocab=64, hidden=32, layers=2, heads=4, kv_heads=2, lr=1e-3):
        super().__init__()
        from transformers import LlamaConfig, LlamaForCausalLM

        self.save_hyperparameters()
        config = LlamaConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=2 * hidden,
                             num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=kv_heads,
                             max_position_embeddings=64, attn_implementation="sdpa")
        self.model = LlamaForCausalLM(config)

    def _loss(self, batch):
        x, y = batch
        logits = self.model(input_ids=x).logits
        return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), y.reshape(-1))

    def training_step(self, batch, batch_idx):
        loss = self._loss(batch)
        self.log("train_loss", loss, sync_dist=True)
        return loss

    def validation_step(self, batch, batch_idx):
        self.log("val_loss", self._loss(batch), sync_dist=True)

    def configure_optimizers(self):
        return torch.optim.AdamW(self.parameters(), lr=self.hparams.lr)


class PenalizedGPT(GPT):
    """Adds an L2 penalty on the head's weight in training_step: the step itself uses a
    parameter the forward uses too."""

    def training_step(self, batch, batch_idx):
        return super().training_step(batch, batch_idx) + 1e-3 * self.head.weight.pow(2).sum()


def penalized_gpt(**overrides) -> PenalizedGPT:
    config = dict(vocab_size=64, seq_len=16, d_model=32, n_heads=4, n_layers=4, lr=1e-3)
    return PenalizedGPT(**{**config, **overrides})


class WeightReadingGPT(GPT):
    """Reads a block's weight directly in training_step, outside the block's forward."""

    def training_step(self, batch, batch_idx):
        return super().training_step(batch, batch_idx) + 1e-3 * self.blocks[0].mlp.fc1.weight.pow(2).sum()


def weight_reading_gpt(**overrides) -> WeightReadingGPT:
    config = dict(vocab_size=64, seq_len=16, d_model=32, n_heads=4, n_layers=2, lr=1e-3)
    return WeightReadingGPT(**{**config, **overrides})


class FixedHeadsGPT(GPT):
    """Attention that reshapes by a stored head count, not by the projection's width."""

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        for block in self.blocks:
            block.attn.n_heads = kwargs["n_heads"]
            block.attn.forward = _fixed_heads_forward.__get__(block.attn)


def _fixed_heads_forward(self, x):
    B, T, _ = x.shape
    q, k, v = (p(x).view(B, T, self.n_heads, self.head_dim).transpose(1, 2) for p in (self.q_proj, self.k_proj, self.v_proj))
    y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
    return self.o_proj(y.transpose(1, 2).reshape(B, T, -1))


def fixed_heads_gpt(**overrides) -> FixedHeadsGPT:
    config = dict(vocab_size=64, seq_len=16, d_model=32, n_heads=4, n_layers=2, lr=1e-3)
    return FixedHeadsGPT(**{**config, **overrides})


class WrappedTinyLlama(TinyLlama):
    """The Hugging Face model behind the LightningModule's own forward, which the steps call."""

    def forward(self, x):
        return self.model(input_ids=x).logits

    def _loss(self, batch):
        x, y = batch
        logits = self(x)
        return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), y.reshape(-1))


class ConfiguredGPT(GPT):
    """Builds its layers in configure_model, Lightning's hook for models too large to build
    whole (under HybridParallel they are built on the meta device)."""

    def build_layers(self):
        pass

    def configure_model(self):
        if not hasattr(self, "blocks"):
            super().build_layers()


# About 98M parameters (390 MB in fp32), GPT-2-small-shaped: larger than any rank's share may allocate.
LARGE_GPT = dict(vocab_size=8192, seq_len=32, d_model=768, n_heads=12, n_layers=12, lr=1e-4)


def large_gpt(**overrides) -> GPT:
    return GPT(**{**LARGE_GPT, **overrides})


def large_configured_gpt(**overrides) -> ConfiguredGPT:
    return ConfiguredGPT(**{**LARGE_GPT, **overrides})


def configured_gpt(**overrides) -> ConfiguredGPT:
    config = dict(vocab_size=64, seq_len=16, d_model=32, n_heads=4, n_layers=2, lr=1e-3)
    return ConfiguredGPT(**{**config, **overrides})


class ScaledGPT(GPT):
    """Scales its logits by a bare parameter and has no init for it: cannot be built empty."""

    def build_layers(self):
        super().build_layers()
        self.logit_scale = nn.Parameter(torch.ones(()))

    def forward(self, idx):
        return super().forward(idx) * self.logit_scale


def scaled_gpt(**overrides) -> ScaledGPT:
    config = dict(vocab_size=64, seq_len=16, d_model=32, n_heads=4, n_layers=2, lr=1e-3)
    return ScaledGPT(**{**config, **overrides})


def pretrained_llama(path, lr=1e-3):
    """Fine-tuning as on one process: the Hugging Face model from `from_pretrained`."""
    from transformers import LlamaForCausalLM

    module = TinyLlama(lr=lr)
    module.model = LlamaForCausalLM.from_pretrained(path, attn_implementation="sdpa")
    return module


def save_pretrained_llama(path, tie=False):
    """A tiny Hugging Face Llama directory (safetensors) as `save_pretrained` writes it; returns the model."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(7)
    config = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=4, num_attention_heads=4,
                         num_key_value_heads=2, max_position_embeddings=64, tie_word_embeddings=tie)
    model = LlamaForCausalLM(config)
    with torch.no_grad():  # away from the init's values, so that init instead of the load shows
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    model.save_pretrained(path)
    return model


def llama_from_config(path, lr=1e-3):
    """The same model built from its config alone (empty, under HybridParallel); its weights
    come from HybridParallel(init_from=path)."""
    from transformers import AutoConfig, LlamaForCausalLM

    module = TinyLlama(lr=lr, layers=0)
    module.model = LlamaForCausalLM(AutoConfig.from_pretrained(path, attn_implementation="sdpa"))
    return module


class TiedGPT(GPT):
    """The example GPT with its head tied to the token embedding (as GPT-2 ships): one weight."""

    def build_layers(self):
        super().build_layers()
        self.head.weight = self.tok_emb.weight


def tied_gpt(**overrides) -> TiedGPT:
    config = dict(vocab_size=64, seq_len=16, d_model=32, n_heads=4, n_layers=2, lr=1e-3)
    return TiedGPT(**{**config, **overrides})
