"""Pipeline parallelism with evaluation batches of other shapes than training's: another batch
size, another sequence length, sanity validation on, and validation interleaved with training
(the strategy keeps one pipeline schedule per input shape, training and evaluation apart)."""

import lightning.pytorch as pl
import pytest
import torch
from torch.utils.data import TensorDataset

from lightning_parallel import parity
from tests.harness import reference, run

# ---------------------------------------------------------------------------- named in specs


def mixed_length_data(n_train=64, n_val=16, seq_len=16, val_seq_len=8, vocab=64, seed=1234):
    """tests.models:token_data with validation sequences of another length than training's
    (with val_seq_len == seq_len it is token_data exactly)."""
    gen = torch.Generator().manual_seed(seed)
    mapping = torch.randperm(vocab, generator=gen)

    def split(n, length):
        x = torch.randint(vocab, (n, length), generator=gen)
        return TensorDataset(x, mapping[x])

    return split(n_train, seq_len), split(n_val, val_seq_len)


class _Pairs(torch.utils.data.Dataset):
    def __init__(self, pairs):
        self.pairs = pairs

    def __len__(self):
        return len(self.pairs)

    def __getitem__(self, index):
        return self.pairs[index]


def alternating_length_data(n_train=64, n_val=32, seq_len=16, val_seq_lens=(8, 16), val_block=8, vocab=64, seed=1234):
    """tests.models:token_data whose validation samples come in blocks of `val_block` with the
    sequence lengths `val_seq_lens` in turn: read unshuffled in batches of `val_block`, one
    evaluation pass meets batches of several shapes, one after another."""
    gen = torch.Generator().manual_seed(seed)
    mapping = torch.randperm(vocab, generator=gen)
    x = torch.randint(vocab, (n_train, seq_len), generator=gen)
    pairs = []
    for block in range(n_val // val_block):
        xv = torch.randint(vocab, (val_block, val_seq_lens[block % len(val_seq_lens)]), generator=gen)
        pairs += list(zip(xv, mapping[xv]))
    return TensorDataset(x, mapping[x]), _Pairs(pairs)


class ValidationLosses(pl.Callback):
    """Records the validation loss at the end of every validation run, the sanity check's
    included (flagged), so the runs interleaved with training are compared too."""

    def __init__(self):
        self.record = {"val_history": []}

    def on_validation_end(self, trainer, module):
        value = trainer.callback_metrics.get("val_loss")
        self.record["val_history"].append(
            (bool(trainer.sanity_checking), trainer.global_step, None if value is None else float(value))
        )


# ---------------------------------------------------------------------------- the tests

# 64 training samples in batches of 8 (4 micro-batches of 2); validation every 2 steps, and
# Lightning's default sanity validation (2 batches) before the first training batch.
GPT = dict(model="tests.models:tiny_gpt", model_kwargs={"n_layers": 4}, data="tests.models:token_data",
           batch_size=8, max_steps=4, trainer={"val_check_interval": 2},
           callbacks=["tests.test_pipeline_shapes:ValidationLosses"])
MIXED = dict(GPT, data="tests.test_pipeline_shapes:mixed_length_data")  # validation sequences of 8 tokens

# Validation batches of 4 (micro-batches of 1) and sequences of 8 against training's 8 x 16:
# both the batch size and the sequence length differ.
OTHER_SHAPES = dict(MIXED, val_batch_size=4)


def assert_validation_history(ref, par):
    ref_hist, par_hist = ref["val_history"], par["val_history"]
    assert [h[:2] for h in par_hist] == [h[:2] for h in ref_hist], (ref_hist, par_hist)
    assert par_hist[0][0], f"no sanity validation ran: {par_hist}"
    # steps 2 and 4 during fit, then the worker's trainer.validate after fit
    assert sum(not sanity for sanity, _, _ in par_hist) >= 3, f"validation did not interleave with training: {par_hist}"
    gap = 0.0
    for (_, _, r), (_, _, p) in zip(ref_hist, par_hist):
        assert (r is None) == (p is None), (ref_hist, par_hist)
        if r is not None:
            gap = max(gap, abs(p - r) / abs(r))
    assert gap <= parity.LOSS_RTOL, f"validation losses differ by {gap:.3g} relative:\n{ref_hist}\n{par_hist}"
    return gap


def check(case, strategy):
    ref = reference(case)
    par = run({**case, "devices": 2, "strategy": strategy})
    assert "Pipeline split (balanced by counted cost), 2 stages:" in par["output"]
    gaps = parity.assert_parity(ref, par)
    gaps["val_history_rtol"] = assert_validation_history(ref, par)
    print(f"gaps: {gaps}\nvalidation runs (sanity, step, val_loss): {par['val_history']}")
    return ref, par, gaps


@pytest.mark.parametrize("schedule", ["gpipe", "1f1b"])
def test_gpt_other_validation_shapes(schedule):
    check(OTHER_SHAPES, {"pipeline_parallel": 2, "schedule": schedule, "micro_batches": 4})


# Validation batches of 4 samples whose length alternates 8, 16, 8, 16 within every pass (the
# sanity check's two batches included), and the test stage after fit likewise: evaluation steps
# of one kind meet several shapes in a row. (torch's stages re-infer their shapes when a schedule
# switches between training and evaluation, but not between two evaluation steps: with the
# schedules patched to one per kind of step, not per shape, this case lost its gloo connection
# while the shapes above, one per kind of step, still passed.)
ALTERNATING = dict(GPT, data="tests.test_pipeline_shapes:alternating_length_data",
                   data_kwargs={"n_val": 16, "val_block": 4}, val_batch_size=4, evaluate=["test"])


@pytest.mark.parametrize("schedule", ["gpipe", "1f1b"])
def test_gpt_validation_shapes_change_within_a_pass(schedule):
    ref, par, _ = check(ALTERNATING, {"pipeline_parallel": 2, "schedule": schedule, "micro_batches": 4})
    assert par["test_loss"] == pytest.approx(ref["test_loss"], rel=1e-5)
    print(f"test_loss gap: {abs(par['test_loss'] - ref['test_loss']) / abs(ref['test_loss']):.3g}")


def test_llama_style_other_validation_lengths():
    # LlamaStyle's position table is a bare parameter sliced by the sequence length.
    spec = dict(ALTERNATING, evaluate=[], model="tests.user_models:LlamaStyle", model_kwargs={})  # (it has no test_step)
    check(spec, {"pipeline_parallel": 2, "schedule": "1f1b", "micro_batches": 4})


def test_validate_test_predict_after_fit_with_other_shapes():
    # The worker evaluates after fit on the validation loader: batches of 16 sequences of 8
    # tokens, where training ran 8 x 16 (the spec has no separate batch size for these stages).
    spec = dict(MIXED, val_batch_size=16, evaluate=["test", "predict"])
    ref, par, _ = check(spec, {"pipeline_parallel": 2, "schedule": "1f1b", "micro_batches": 4})
    assert par["test_loss"] == pytest.approx(ref["test_loss"], rel=1e-5)
    print(f"test_loss gap: {abs(par['test_loss'] - ref['test_loss']) / abs(ref['test_loss']):.3g}")
    assert par["predictions"].shape == ref["predictions"].shape == (16, 8)
    assert torch.equal(par["predictions"], ref["predictions"])
