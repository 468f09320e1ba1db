"""Manual optimization (`automatic_optimization = False`; a GAN with a generator and a
discriminator optimizer, toggle_optimizer, manual_backward) matches one process under data and
tensor parallelism, and is refused under pipeline parallelism on every rank."""

import lightning.pytorch as pl
import pytest
import torch

from lightning_parallel import LayoutError, parity
from lightning_parallel.manual_optimization import check_manual_optimization
from tests.harness import defaults_on, reference, run
from tests.user_models import GAN as GANModule

# Two optimizer steps per batch: 8 steps are 4 batches (8 with accumulate=2).
GAN = defaults_on(dict(model="tests.user_models:GAN", data="tests.user_models:gan_data", batch_size=8, max_steps=8),
                  batches=4)
GAN_PLAN = {"generator.model.0": "colwise", "generator.model.2": "rowwise",
            "discriminator.model.0": "colwise", "discriminator.model.2": "rowwise"}
# Clipping by norm inside the step (small enough to bind) and stepping every second batch. SGD,
# not Adam: Adam's update hardly depends on the gradients' scale, so clipping would barely show.
SGD = {"optimizer": "sgd", "lr": 0.05, "accumulate": 2}
CLIPPED = defaults_on({**GAN, "model_kwargs": {**SGD, "clip": 0.1}}, batches=8)


def test_dp2_replicated_matches_one_process_and_reduces_each_gradient_once():
    case = {**GAN, "callbacks": ["tests.probes:ReductionsPerBackward"]}
    ref = reference(case)
    par = run({**case, "devices": 2, "strategy": {"data_parallel": 2, "sharding": "none"}})
    parity.assert_parity(ref, par)
    # Every parameter trains (the bare ones too), so parity means something.
    pl.seed_everything(0, verbose=False)
    gan = GANModule()
    for name, initial in gan.state_dict().items():
        assert not torch.equal(ref["params"][name], initial), f"{name} did not train"
    # Each manual backward reduces the gradients it produced, once: the discriminator's
    # parameters and the temperature only its loss uses, then the generator's and the bare
    # noise scale (the toggled-off discriminator gets none).
    d = sum(p.numel() for p in gan.discriminator.parameters()) + gan.temperature.numel()
    g = sum(p.numel() for p in gan.generator.parameters()) + gan.noise_scale.numel()
    assert par["reduced_per_backward"] == [d, g] * 4


def test_dp2_sharded_with_clipping_and_accumulation_by_hand():
    ref = reference(CLIPPED)
    par = run({**CLIPPED, "devices": 2, "strategy": {"data_parallel": 2, "sharding": "full"}})
    parity.assert_parity(ref, par)
    # The clip value binds: without it the same run trains differently.
    unclipped = reference({**CLIPPED, "model_kwargs": SGD})
    assert unclipped["losses"][-1] != pytest.approx(ref["losses"][-1], rel=1e-3)


@pytest.mark.slow
def test_hybrid_sharding_matches_one_process():
    case = {**GAN, "batch_size": 16}
    ref = reference(case)
    par = run({**case, "devices": 4, "strategy": {"data_parallel": 4, "sharding": "hybrid", "data_parallel_shard": 2}})
    parity.assert_parity(ref, par)


@pytest.mark.slow  # tensor parallelism alone already ran manual optimization; dp x tp below is the new path
def test_tp2_matches_one_process():
    ref = reference(GAN)
    par = run({**GAN, "devices": 2, "strategy": {"tensor_parallel": 2, "tensor_plan": GAN_PLAN}})
    parity.assert_parity(ref, par)


@pytest.mark.slow
def test_dp2_tp2_sharded_matches_one_process():
    ref = reference(CLIPPED)
    par = run({**CLIPPED, "devices": 4,
               "strategy": {"data_parallel": 2, "tensor_parallel": 2, "sharding": "full", "tensor_plan": GAN_PLAN}})
    parity.assert_parity(ref, par)


PIPELINE_REFUSAL = "GAN sets automatic_optimization = False, which pipeline_parallel=2 cannot run"


def test_refused_under_pipeline_parallelism():
    with pytest.raises(LayoutError, match=PIPELINE_REFUSAL + r": .* Use automatic optimization \(return the loss "
                       r"from training_step\), or pipeline_parallel=1 with data and tensor parallelism"):
        check_manual_optimization(GANModule(), 2, "given")
    with pytest.raises(LayoutError, match=r"which layout='auto' cannot plan for: .* Give the layout"):
        check_manual_optimization(GANModule(), 1, "auto")
    check_manual_optimization(GANModule(), 1, "given")


def test_refused_under_pipeline_parallelism_on_every_rank():
    with pytest.raises(RuntimeError) as err:
        run({**GAN, "devices": 2, "strategy": {"pipeline_parallel": 2}})
    # Raised before the process group exists, so without a rank prefix: both ranks' lines in stderr.
    stderr = str(err.value).split("--- stderr ---")[1]
    assert stderr.count(PIPELINE_REFUSAL) == 2, stderr[-3000:]


def test_a_backward_around_manual_backward_is_refused_at_the_next_step():
    """`loss.backward()` in a manual step leaves the replicated parameters' gradients unaveraged."""
    from torch import nn

    from lightning_parallel.manual_optimization import ReplicatedGradients

    module = nn.Linear(3, 1)
    replicated = ReplicatedGradients(list(module.parameters()), group=None, reduce_dtype=None)
    replicated.set_aside()
    module(torch.ones(2, 3)).sum().backward()  # inside manual_backward's window
    replicated.average()
    replicated.check_averaged(module)
    module(torch.ones(2, 3)).sum().backward()
    with pytest.raises(LayoutError, match=r"\['bias', 'weight'\] got gradients from a backward that did not go "
                                          r"through self.manual_backward\(loss\) .* Call self.manual_backward\(loss\)"):
        replicated.check_averaged(module)
