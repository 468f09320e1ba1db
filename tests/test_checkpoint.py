"""Sharded checkpoints: written under one layout, resumed under another."""

import pytest

from lightning_parallel import parity
from tests.harness import reference, run
from tests.models import GPT_PLAN

GPT = dict(model="tests.models:tiny_gpt", model_kwargs={"n_layers": 4}, data="tests.models:token_data",
           batch_size=8, max_steps=4)
# 64 samples in batches of 8: an epoch is 8 steps. The learning rate follows a step schedule.
EPOCHS = dict(GPT, model="tests.models:scheduled_gpt", max_steps=-1, callbacks=["tests.probes:LearningRates"])


def interrupted(tmp_path, name, devices, strategies):
    """One epoch under the first layout, saved; the second epoch resumed under the second."""
    path = str(tmp_path / f"{name}.ckpt")
    first = run({**EPOCHS, "trainer": {"max_epochs": 1}, "devices": devices[0], "strategy": strategies[0],
                 "save_to": path})
    second = run({**EPOCHS, "trainer": {"max_epochs": 2}, "devices": devices[1], "strategy": strategies[1],
                  "resume_from": path})
    return first, second


@pytest.mark.parametrize(
    "name, devices, strategies",
    [
        pytest.param("dp2_to_tp2", (2, 2), ({"data_parallel": 2, "sharding": "full"},
                                            {"tensor_parallel": 2, "tensor_plan": GPT_PLAN}),
                     marks=pytest.mark.slow),  # pp2_to_dp2tp2 and hybrid_to_tp2 resume sharded states into tp
        ("pp2_to_dp2tp2", (2, 4), ({"pipeline_parallel": 2, "micro_batches": 2},
                                   {"data_parallel": 2, "tensor_parallel": 2, "tensor_plan": GPT_PLAN})),
        pytest.param("dp2_to_hybrid", (2, 4), ({"data_parallel": 2}, {"data_parallel": 4, "sharding": "hybrid",
                                                                       "data_parallel_shard": 2}),
                     marks=pytest.mark.slow),  # hybrid_to_tp2 reads a hybrid-sharded checkpoint back
        ("hybrid_to_tp2", (4, 2), ({"data_parallel": 4, "sharding": "hybrid", "data_parallel_shard": 2},
                                   {"tensor_parallel": 2, "tensor_plan": GPT_PLAN})),
        pytest.param("3d_to_one", (8, 1), ({"pipeline_parallel": 2, "data_parallel": 2, "tensor_parallel": 2,
                                            "sharding": "full", "tensor_plan": GPT_PLAN, "micro_batches": 2}, {}),
                     marks=pytest.mark.slow),  # test_learned_noise_3d_to_one resumes 3-D on one process too
    ],
)
def test_resume_under_another_layout_continues_the_uninterrupted_run(tmp_path, name, devices, strategies):
    # Saved at an epoch's end, where Lightning resumes exactly (mid-epoch, a plain DataLoader
    # restarts its epoch; see the platform notes).
    uninterrupted = reference({**EPOCHS, "trainer": {"max_epochs": 2}})
    first, second = interrupted(tmp_path, name, devices, strategies)
    assert len(first["losses"]) == len(second["losses"]) == 8
    parity.assert_losses_close(uninterrupted["losses"][:8], first["losses"])
    parity.assert_parity({**uninterrupted, "losses": uninterrupted["losses"][8:]}, second)
    assert second["learning_rates"] == uninterrupted["learning_rates"][8:]
    written = sorted(p.name for p in tmp_path.iterdir())
    assert f"{name}.ckpt" in written and not any(n.endswith(".partial") for n in written), written


def test_model_checkpoint_writes_complete_directories(tmp_path, monkeypatch):
    monkeypatch.setenv("LP_TEST_CKPT_DIR", str(tmp_path))
    case = {**GPT, "callbacks": ["tests.probes:CheckpointEveryTwoSteps"], "trainer": {"enable_checkpointing": True}}
    record = run({**case, "devices": 2, "strategy": {"pipeline_parallel": 2, "micro_batches": 2}})
    assert sorted(p.name for p in tmp_path.iterdir()) == ["epoch=0-step=2.ckpt", "epoch=0-step=4.ckpt"]
    # Saved mid-epoch from a plain DataLoader: said once, at the first save.
    assert record["output"].count("A checkpoint is saved 2 batches into an epoch, but the training DataLoader "
                                  "keeps no position") == 1, record["output"][-3000:]
    assert "batches into an epoch" in record["output"] and "StatefulDataLoader" in record["output"]
    for ckpt in tmp_path.iterdir():
        assert (ckpt / "meta.pt").is_file() and (ckpt / ".metadata").is_file()


def test_save_top_k_removes_worse_checkpoints(tmp_path, monkeypatch):
    monkeypatch.setenv("LP_TEST_CKPT_DIR", str(tmp_path))
    case = {**GPT, "callbacks": ["tests.probes:KeepBestCheckpoint"], "trainer": {"enable_checkpointing": True}}
    par = run({**case, "devices": 2, "strategy": {"data_parallel": 2, "sharding": "full"}})
    best_step = 2 + 2 * min(range(2), key=lambda i: par["losses"][1 + 2 * i])  # losses fall: step 4
    assert sorted(p.name for p in tmp_path.iterdir()) == [f"epoch=0-step={best_step}.ckpt"]


def test_consolidated_file_loads_on_one_process(tmp_path):
    import subprocess
    import sys

    import torch
    import torch.nn.functional as F

    from tests.harness import REPO
    from tests.models import token_data

    sharded, single = tmp_path / "3d.ckpt", tmp_path / "one.ckpt"
    strategy = {"pipeline_parallel": 2, "data_parallel": 2, "tensor_parallel": 2, "sharding": "full",
                "tensor_plan": GPT_PLAN, "micro_batches": 2}
    par = run({**GPT, "devices": 8, "strategy": strategy, "save_to": str(sharded)})
    cmd = [sys.executable, "-m", "lightning_parallel.cli", "consolidate", str(sharded), str(single)]
    subprocess.run(cmd, check=True, cwd=REPO, timeout=120)

    from examples.gpt import GPT as Model

    module = Model.load_from_checkpoint(single, map_location="cpu").eval()
    for name, value in module.state_dict().items():
        torch.testing.assert_close(value, par["params"][name], rtol=0, atol=0)
    x, y = token_data()[1].tensors
    with torch.no_grad():
        logits = module(x)
    val_loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), y.reshape(-1)).item()
    assert val_loss == pytest.approx(par["val_loss"], rel=1e-5)


# ---------------------------------------------------------------------------- user-style modules
#
# Saved at the first epoch's end under one layout, the second epoch resumed under another, against
# the uninterrupted run on one process (as above; these modules have no learning-rate schedule).

LLAMA_EPOCHS = dict(model="tests.user_models:LlamaStyle", data="tests.user_models:token_data", batch_size=8, max_steps=-1)
NOISE_EPOCHS = dict(model="tests.user_models:LearnedNoise", data="tests.user_models:regression_data", batch_size=8,
                    max_steps=-1)
# LearnedNoise's hidden Linears (blocks.N.0, 32 -> 32, each followed by a Tanh) in column/row pairs;
# the automatic pipeline split puts blocks 0-1 on stage 0 and blocks 2-3 on stage 1, a pair per stage.
NOISE_PLAN = {"blocks.0.0": "colwise", "blocks.1.0": "rowwise", "blocks.2.0": "colwise", "blocks.3.0": "rowwise"}


def resumed_under_another_layout(tmp_path, name, spec, devices, strategies):
    uninterrupted = reference({**spec, "trainer": {"max_epochs": 2}})
    path = str(tmp_path / f"{name}.ckpt")
    first = run({**spec, "trainer": {"max_epochs": 1}, "devices": devices[0], "strategy": strategies[0], "save_to": path})
    second = run({**spec, "trainer": {"max_epochs": 2}, "devices": devices[1], "strategy": strategies[1],
                  "resume_from": path})
    assert len(first["losses"]) == len(second["losses"]) == 8
    first_gap = parity.assert_losses_close(uninterrupted["losses"][:8], first["losses"])
    gaps = parity.assert_parity({**uninterrupted, "losses": uninterrupted["losses"][8:]}, second)
    print(f"{name}: first epoch loss_rtol {first_gap:.3g}; resumed epoch {gaps}")
    written = sorted(p.name for p in tmp_path.iterdir())
    assert f"{name}.ckpt" in written and not any(n.endswith(".partial") for n in written), written
    return first, second


@pytest.mark.slow  # pp2_to_dp2tp2 resumes a pipeline's checkpoint in make test
def test_llama_style_pp2_to_dp2(tmp_path):
    # The bare position table and the hand-written RMSNorms' weights are saved from their pipeline
    # stages and land on the data-parallel model under their own names.
    first, second = resumed_under_another_layout(
        tmp_path, "llama_pp2_to_dp2", LLAMA_EPOCHS, (2, 2),
        ({"pipeline_parallel": 2, "micro_batches": 2}, {"data_parallel": 2, "sharding": "full"}),
    )
    assert "Pipeline split (balanced by counted cost), 2 stages:" in first["output"]
    assert {"pos", "tok.weight", "norm.weight", "blocks.0.attention_norm.weight"} <= second["params"].keys()


def test_learned_noise_3d_to_one(tmp_path):
    # log_sigma and criterion.scale (used only by the loss) train on the last stage under the
    # 3-D layout and must come back with their optimizer state on one process.
    strategy = {"pipeline_parallel": 2, "data_parallel": 2, "tensor_parallel": 2, "sharding": "full",
                "tensor_plan": NOISE_PLAN, "micro_batches": 2}
    first, second = resumed_under_another_layout(tmp_path, "noise_3d_to_one", NOISE_EPOCHS, (8, 1), (strategy, {}))
    assert "HybridParallel layout pp=2 x dp=2 x tp=2 on 8 processes" in first["output"]
    assert "stage 0: inp, blocks.0-1 (" in first["output"], first["output"][-3000:]
    assert "Tensor-parallel plan (given), tp=2:\n  blocks.0.0: colwise\n  blocks.1.0: rowwise\n" in first["output"]
    print(f"elements held per rank under the 3-D layout: {first['elements_held']}")
    assert {"log_sigma", "criterion.scale"} <= second["params"].keys()
