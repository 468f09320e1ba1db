"""The user-style modules of tests/user_models.py train on one process with a plain Trainer, and
every parameter learns, so parity tests that compare them under parallel layouts mean something."""

import importlib
import math

import lightning.pytorch as pl
import pytest
import torch
from torch.utils.data import DataLoader

from tests.user_models import MODELS

CASES = [(name, {}) for name in MODELS] + [("ResNetStyle", {"stages_as": "attributes"})]


def _load(path):
    module, attr = path.split(":")
    return getattr(importlib.import_module(module), attr)


class Record(pl.Callback):
    def __init__(self):
        self.losses, self.first_grads = [], None

    def on_after_backward(self, trainer, module):
        if self.first_grads is None:
            self.first_grads = {n: p.grad.abs().max().item() for n, p in module.named_parameters() if p.grad is not None}

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx):
        self.losses.append(float(trainer.callback_metrics["train_loss"]))


def fit(name, model_kwargs=(), seed=0, steps=3):
    model_path, data_path, data_kwargs = MODELS[name]
    pl.seed_everything(seed, verbose=False)
    model = _load(model_path)(**dict(model_kwargs))
    train, val = _load(data_path)(**data_kwargs)
    assert (len(train), len(val)) == (64, 16)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    record = Record()
    trainer = pl.Trainer(accelerator="cpu", devices=1, max_steps=steps, logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False, callbacks=[record])
    trainer.fit(model, DataLoader(train, batch_size=8), DataLoader(val, batch_size=8))
    val_metrics = trainer.validate(model, DataLoader(val, batch_size=8), verbose=False)[0]
    return model, before, record, val_metrics


@pytest.mark.parametrize(("name", "kwargs"), CASES, ids=[n + "".join(f"-{v}" for v in kw.values()) for n, kw in CASES])
def test_trains_and_every_parameter_learns(name, kwargs):
    model, before, record, val_metrics = fit(name, kwargs)

    assert len(record.losses) == 3 and all(math.isfinite(x) for x in record.losses), record.losses
    assert math.isfinite(val_metrics["val_loss"]), val_metrics

    # A gradient that is mathematically zero (a key bias, a conv bias before a norm) shows up as
    # float noise (~1e-9) that AdamW would blow up into full-size steps; real ones are far larger.
    assert record.first_grads.keys() == before.keys(), before.keys() - record.first_grads.keys()
    tiny = {n: g for n, g in record.first_grads.items() if g < 1e-6}
    assert not tiny, f"parameters with no real gradient: {tiny}"

    # Each parameter moved by more than AdamW's weight decay alone could move it (1e-5 * |p| a step).
    lr = model.hparams.lr
    unmoved = {n: (p.detach() - before[n]).abs().max().item() for n, p in model.named_parameters()}
    unmoved = {n: d for n, d in unmoved.items() if d < 0.1 * lr}
    assert not unmoved, f"parameters that did not learn: {unmoved}"


def test_loss_only_parameters_are_outside_the_forward():
    """LearnedNoise's point: two parameters that the forward never touches and the loss trains."""
    model, _, record, _ = fit("LearnedNoise", steps=1)
    names, params = zip(*model.named_parameters())
    grads = torch.autograd.grad(model(torch.randn(4, model.hparams.d_in)).sum(), params, allow_unused=True)
    assert {n for n, g in zip(names, grads) if g is None} == {"log_sigma", "criterion.scale"}
    assert record.first_grads["log_sigma"] > 1e-6 and record.first_grads["criterion.scale"] > 1e-6


def test_resnet_stage_layouts_are_the_same_model():
    """`stages_as` changes only where the stages are held: same initialization, same training."""
    seq, _, seq_record, _ = fit("ResNetStyle", {"stages_as": "sequential"}, steps=2)
    attr, _, attr_record, _ = fit("ResNetStyle", {"stages_as": "attributes"}, steps=2)
    assert seq_record.losses == attr_record.losses
    renamed = {}
    for key, value in seq.state_dict().items():
        if key.startswith("stages."):
            _, index, rest = key.split(".", 2)
            key = f"layer{int(index) + 1}.{rest}"
        renamed[key] = value
    attr_state = attr.state_dict()
    assert renamed.keys() == attr_state.keys()
    assert all(torch.equal(renamed[k], attr_state[k]) for k in renamed)
