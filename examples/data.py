"""Byte-level language modelling data built from Python's own standard library.

Nothing is downloaded: the corpus is the source text of a few pure-Python
stdlib modules, so every Python install can build it. Tokens are raw bytes,
which fixes the vocabulary at 256.
"""

import importlib.util

import lightning.pytorch as pl
import torch
from torch.utils.data import Dataset, Subset
from torchdata.stateful_dataloader import StatefulDataLoader

CORPUS_MODULES = sorted(
    ["argparse", "bisect", "difflib", "fractions", "heapq", "shlex", "string", "textwrap"]
)
MAX_CORPUS_BYTES = 400_000
VOCAB_SIZE = 256


def load_corpus() -> bytes:
    """Concatenated source of CORPUS_MODULES as UTF-8 bytes, capped at MAX_CORPUS_BYTES."""
    parts = []
    for name in CORPUS_MODULES:
        path = importlib.util.find_spec(name).origin
        with open(path, encoding="utf-8") as f:
            parts.append(f.read())
    return "\n".join(parts).encode("utf-8")[:MAX_CORPUS_BYTES]


class ByteDataset(Dataset):
    """Non-overlapping windows of seq_len + 1 bytes, split into (input, target)."""

    def __init__(self, data, seq_len: int):
        if isinstance(data, (bytes, bytearray)):
            data = torch.frombuffer(bytearray(data), dtype=torch.uint8)
        self.data = data.long()
        self.seq_len = seq_len

    def __len__(self):
        return (len(self.data) - 1) // (self.seq_len + 1)

    def __getitem__(self, i):
        if not 0 <= i < len(self):
            raise IndexError(i)
        start = i * (self.seq_len + 1)
        chunk = self.data[start : start + self.seq_len + 1]
        return chunk[:-1], chunk[1:]


def make_datasets(seq_len=64, val_fraction=0.1, max_train_samples=None):
    """Train on the first (1 - val_fraction) of the corpus, validate on the rest."""
    corpus = load_corpus()
    n_train = int(len(corpus) * (1 - val_fraction))
    train_ds = ByteDataset(corpus[:n_train], seq_len)
    val_ds = ByteDataset(corpus[n_train:], seq_len)
    if max_train_samples is not None:
        train_ds = _truncate(train_ds, max_train_samples)
    return train_ds, val_ds


def _truncate(ds, n):
    return Subset(ds, range(min(n, len(ds))))


class ByteDataModule(pl.LightningDataModule):
    def __init__(self, seq_len=64, batch_size=16, max_train_samples=None, max_val_samples=None, num_workers=0):
        super().__init__()
        self.save_hyperparameters()

    def setup(self, stage=None):
        hp = self.hparams
        self.train_ds, self.val_ds = make_datasets(hp.seq_len, max_train_samples=hp.max_train_samples)
        if hp.max_val_samples is not None:
            self.val_ds = _truncate(self.val_ds, hp.max_val_samples)

    def _loader(self, ds, train):
        # A DataLoader that saves its position: a run resumed from a mid-epoch checkpoint (a
        # requeued SLURM job's) goes on with the next batch instead of the epoch's first.
        return StatefulDataLoader(
            ds,
            batch_size=self.hparams.batch_size,
            shuffle=train,
            drop_last=train,
            num_workers=self.hparams.num_workers,
        )

    def train_dataloader(self):
        return self._loader(self.train_ds, train=True)

    def val_dataloader(self):
        return self._loader(self.val_ds, train=False)

    def test_dataloader(self):
        return self._loader(self.val_ds, train=False)
