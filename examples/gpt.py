"""A small decoder-only transformer written as plain Lightning code.

There is deliberately no parallelism code here: this is the model a parallel
strategy must be able to run unchanged.
"""

import lightning.pytorch as pl
import torch
import torch.nn.functional as F
from torch import nn


class Attention(nn.Module):
    def __init__(self, d_model, n_heads, dropout=0.0):
        super().__init__()
        assert d_model % n_heads == 0
        self.head_dim = d_model // n_heads
        self.dropout = dropout
        self.q_proj = nn.Linear(d_model, d_model)
        # No key bias: it adds the same score to every key of a query, which softmax ignores, so
        # its gradient is exactly zero and an optimizer would only chase rounding noise.
        self.k_proj = nn.Linear(d_model, d_model, bias=False)
        self.v_proj = nn.Linear(d_model, d_model)
        self.o_proj = nn.Linear(d_model, d_model)

    def forward(self, x):
        B, T, _ = x.shape
        q, k, v = self.q_proj(x), self.k_proj(x), self.v_proj(x)
        # Derive the head count from the projection width rather than storing it,
        # so the module still works when q/k/v are split column-wise across ranks.
        n_local_heads = q.shape[-1] // self.head_dim
        q, k, v = (t.view(B, T, -1, self.head_dim).transpose(1, 2) for t in (q, k, v))
        y = F.scaled_dot_product_attention(
            q, k, v, dropout_p=self.dropout if self.training else 0.0, is_causal=True
        )
        y = y.transpose(1, 2).reshape(B, T, n_local_heads * self.head_dim)
        return self.o_proj(y)


class MLP(nn.Module):
    def __init__(self, d_model, d_ff, dropout=0.0):
        super().__init__()
        self.fc1 = nn.Linear(d_model, d_ff)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(d_ff, d_model)
        self.drop = nn.Dropout(dropout)

    def forward(self, x):
        return self.drop(self.fc2(self.act(self.fc1(x))))


class Block(nn.Module):
    def __init__(self, d_model, n_heads, d_ff, dropout=0.0):
        super().__init__()
        self.ln1 = nn.LayerNorm(d_model)
        self.attn = Attention(d_model, n_heads, dropout)
        self.ln2 = nn.LayerNorm(d_model)
        self.mlp = MLP(d_model, d_ff, dropout)

    def forward(self, x):
        x = x + self.attn(self.ln1(x))
        x = x + self.mlp(self.ln2(x))
        return x


class GPT(pl.LightningModule):
    def __init__(
        self,
        vocab_size=256,
        seq_len=64,
        d_model=64,
        n_heads=4,
        n_layers=4,
        d_ff=None,
        dropout=0.0,
        lr=3e-3,
        weight_decay=0.0,
    ):
        super().__init__()
        self.save_hyperparameters()
        self.build_layers()

    def build_layers(self):
        h = self.hparams
        d_ff = h.d_ff or 4 * h.d_model
        self.tok_emb = nn.Embedding(h.vocab_size, h.d_model)
        self.pos_emb = nn.Embedding(h.seq_len, h.d_model)
        self.drop = nn.Dropout(h.dropout)
        self.blocks = nn.ModuleList([Block(h.d_model, h.n_heads, d_ff, h.dropout) for _ in range(h.n_layers)])
        self.norm = nn.LayerNorm(h.d_model)
        self.head = nn.Linear(h.d_model, h.vocab_size, bias=False)

    def forward(self, idx):
        pos = torch.arange(idx.shape[1], device=idx.device)
        x = self.drop(self.tok_emb(idx) + self.pos_emb(pos))
        for block in self.blocks:
            x = block(x)
        return self.head(self.norm(x))

    def _loss(self, batch):
        x, y = batch
        logits = self(x)
        return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), y.reshape(-1))

    def training_step(self, batch, batch_idx):
        loss = self._loss(batch)
        self.log("train_loss", loss, prog_bar=True, sync_dist=True)
        return loss

    def validation_step(self, batch, batch_idx):
        loss = self._loss(batch)
        self.log("val_loss", loss, prog_bar=True, sync_dist=True)
        return loss

    def test_step(self, batch, batch_idx):
        loss = self._loss(batch)
        self.log("test_loss", loss, sync_dist=True)
        return loss

    def predict_step(self, batch, batch_idx):
        x = batch[0] if isinstance(batch, (list, tuple)) else batch
        return self(x).argmax(-1)

    def configure_optimizers(self):
        return torch.optim.AdamW(
            self.parameters(), lr=self.hparams.lr, weight_decay=self.hparams.weight_decay
        )
