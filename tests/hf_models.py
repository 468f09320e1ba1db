"""Hugging Face models trained the way users fine-tune them: the model computes its own loss from
`labels=` (`self.model(input_ids=x, labels=y).loss`). Tiny configs, random weights, nothing
downloaded. Named by import path in parity specs."""

import lightning.pytorch as pl
import torch

# Small enough for 8 CPU processes; head counts and sizes divide by 2.
TINY = dict(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=4, num_attention_heads=4,
            num_key_value_heads=2, head_dim=8, max_position_embeddings=64)
# What a family needs beyond TINY (or names differently).
EXTRA = {
    "qwen3_moe": dict(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=16, norm_topk_prob=True),
    "mixtral": dict(num_local_experts=4, num_experts_per_tok=2),
    "gemma3_text": dict(sliding_window=4, layer_types=["sliding_attention", "full_attention"] * 2),
    "phi3": dict(pad_token_id=0, bos_token_id=1, eos_token_id=2),
    "gpt2": dict(n_embd=32, n_layer=4, n_head=4, n_positions=64, n_inner=64),
}
GPT2_DROP = dict(resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)


def hf_config(family: str, tie: bool = False, **overrides):
    from transformers import AutoConfig

    if family == "gpt2":
        values = dict(vocab_size=TINY["vocab_size"], **EXTRA["gpt2"], **GPT2_DROP)
    else:
        values = {**TINY, **EXTRA.get(family, {})}
    return AutoConfig.for_model(family, **{**values, "tie_word_embeddings": tie, **overrides})


class HFCausalLM(pl.LightningModule):
    """A Hugging Face causal LM whose loss is its own (`labels=`), as users fine-tune.

    `loss="labels"`: `self.model(input_ids=x, labels=y).loss`; `loss="logits"`: cross-entropy on
    `.logits` in the step. `optimizer="sgd"` (momentum) where a gradient's scale must show (AdamW
    hides it: clipping tests)."""

    def __init__(self, family="llama", tie=False, loss="labels", lr=1e-3, attn="sdpa", optimizer="adamw", path=None,
                 pretrained=False, **config):
        super().__init__()
        from transformers import AutoConfig, AutoModelForCausalLM

        self.save_hyperparameters()
        if pretrained:  # fine-tuning as on one process
            self.model = AutoModelForCausalLM.from_pretrained(path, attn_implementation=attn)
        else:  # built from its config alone (a directory's, for HybridParallel(init_from=path))
            config = AutoConfig.from_pretrained(path) if path else hf_config(family, tie, **config)
            self.model = AutoModelForCausalLM.from_config(config, attn_implementation=attn)

    def _loss(self, batch):
        x, y = batch
        if self.hparams.loss == "labels":
            return self.model(input_ids=x, labels=y).loss
        logits = self.model(input_ids=x).logits
        return torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), y.reshape(-1))

    def training_step(self, batch, batch_idx):
        loss = self._loss(batch)
        self.log("train_loss", loss, sync_dist=True)
        return loss

    def validation_step(self, batch, batch_idx):
        self.log("val_loss", self._loss(batch), sync_dist=True)

    def configure_optimizers(self):
        if self.hparams.optimizer == "sgd":
            return torch.optim.SGD(self.parameters(), lr=self.hparams.lr, momentum=0.9)
        return torch.optim.AdamW(self.parameters(), lr=self.hparams.lr)
