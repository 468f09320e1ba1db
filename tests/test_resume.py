"""Mid-epoch resume and background saves (issue 13).

One uninterrupted run at dp=2 saves in the background every 3 steps; runs resumed from its
checkpoints under dp=4 and dp=1 (the same global batch of 8) must go on as it did. The epoch is
8 steps (64 samples): the step-3 checkpoint is 3 steps into epoch 0 (its resumed run crosses
into epoch 1), the step-9 one 1 step into epoch 1."""

import pytest

from lightning_parallel import parity
from lightning_parallel.data_position import GlobalPositionSampler
from tests.harness import run

STEPS = 10
BASE = dict(model="tests.models:tiny_gpt", model_kwargs={"n_layers": 2}, data="tests.models:token_data",
            batch_size=8, max_steps=STEPS, loader="stateful")


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    directory = tmp_path_factory.mktemp("async")
    record = run({**BASE, "devices": 2, "strategy": {"data_parallel": 2, "async_save": True},
                  "checkpoint": {"dirpath": str(directory), "every_n_train_steps": 3, "save_top_k": -1},
                  "callbacks": [["tests.probes:SlowCheckpointWrites", {"seconds": 1.0}]]})
    return record, directory


def test_background_saves_let_training_go_on(uninterrupted):
    record, directory = uninterrupted
    # Each save (after steps 3, 6 and 9) takes over a second to write; the next step begins and
    # ends while it is in flight, and a save waits for the one before it.
    assert {4, 7, 10} <= set(record["began_in_flight"]), record["began_in_flight"]
    assert {4, 7, 10} <= set(record["ended_in_flight"]), record["ended_in_flight"]
    assert record["most_writes_at_once"] == 1
    # The last save finished before fit returned; every save is complete, none left partial.
    assert sorted(p.name for p in directory.iterdir()) == [f"epoch={s // 9}-step={s}.ckpt" for s in (3, 6, 9)]
    assert all((p / ".metadata").is_file() and (p / "meta.pt").is_file() for p in directory.iterdir())


@pytest.mark.parametrize("devices, step", [(4, 3), (1, 9)], ids=["dp4_epoch0", "dp1_epoch1"])
def test_mid_epoch_resume_under_another_data_parallel_degree(uninterrupted, devices, step):
    record, directory = uninterrupted
    resumed = run({**BASE, "devices": devices, "strategy": {"data_parallel": devices},
                   "resume_from": str(directory / f"epoch={step // 8}-step={step}.ckpt")})
    assert len(resumed["losses"]) == STEPS - step
    parity.assert_parity({**record, "losses": record["losses"][step:]}, resumed)
    assert "resumes" not in resumed["output"], "no warning: the global batch is the same"


def test_a_run_killed_mid_write_keeps_the_checkpoint_it_was_replacing(uninterrupted, tmp_path):
    record, _ = uninterrupted
    # save_top_k=1 removes the step-2 checkpoint once step 4's is saved; here step 4's write is
    # held up and every rank is killed at step 5's start, while it is still in flight.
    spec = {**BASE, "devices": 2, "strategy": {"data_parallel": 2, "async_save": True},
            "checkpoint": {"dirpath": str(tmp_path), "every_n_train_steps": 2, "save_top_k": 1},
            "callbacks": [["tests.probes:KillDuringBackgroundSave", {"step": 4}]]}
    with pytest.raises(RuntimeError, match="parity run failed"):
        run(spec)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["epoch=0-step=2.ckpt", "epoch=0-step=4.ckpt.partial"]
    assert not (tmp_path / "epoch=0-step=4.ckpt.partial" / ".metadata").exists()
    resumed = run({**BASE, "devices": 2, "strategy": {"data_parallel": 2},
                   "resume_from": str(tmp_path / "epoch=0-step=2.ckpt")})
    parity.assert_parity({**record, "losses": record["losses"][2:]}, resumed)


def dealt(num_replicas, batch_size, resume_from=None, take=None):
    """Every rank's samples for one epoch (their first `take` when given), and rank 0's state."""
    from torch.utils.data import DistributedSampler

    samplers = [GlobalPositionSampler(DistributedSampler(range(24), num_replicas, rank, seed=3), batch_size)
                for rank in range(num_replicas)]
    if resume_from is not None:
        for sampler in samplers:
            sampler.load_state_dict(resume_from)
    iterators = [iter(s) for s in samplers]
    samples = [[next(it) for _ in range(take)] if take else list(it) for it in iterators]
    return samples, samplers[0].state_dict()


def global_order(samples_per_rank):
    """The samples in the order of the epoch's positions (rank r holds positions r, r + R, ...)."""
    return [s for column in zip(*samples_per_rank) for s in column]


def test_global_position_resumes_under_any_number_of_replicas():
    whole_epoch = global_order(dealt(1, 8)[0])
    _, saved = dealt(2, 4, take=8)  # two global batches of 8 read
    assert saved["global_samples"] == 16
    for replicas in (1, 2, 4):
        rest, _ = dealt(replicas, 8 // replicas, resume_from=saved)
        assert global_order(rest) == whole_epoch[16:], replicas


def test_a_save_at_an_epochs_end_resumes_at_the_next_epochs_start():
    from torch.utils.data import DistributedSampler

    saved_at_end = GlobalPositionSampler(DistributedSampler(range(24), 2, 0, seed=3), 4)
    assert len(list(saved_at_end)) == 12
    resumed = GlobalPositionSampler(DistributedSampler(range(24), 4, 1, seed=3), 2)
    resumed.load_state_dict(saved_at_end.state_dict())
    resumed.set_epoch(1)  # as Lightning does before the next epoch's first batch
    expected = DistributedSampler(range(24), 4, 1, seed=3)
    expected.set_epoch(1)
    assert list(resumed) == list(expected)


def test_resume_that_cannot_be_exact_says_what_differs():
    _, saved = dealt(2, 4, take=6)
    with pytest.warns(UserWarning, match=r"the global batch is 12 samples, it was 8") as caught:
        dealt(3, 4, resume_from=saved)
    assert "do not divide over 3 ranks" not in str(caught[0].message)  # 12 samples read: 4 per rank
    with pytest.warns(UserWarning, match=r"12 samples read so far do not divide over 5 ranks.*read again"):
        dealt(5, 4, resume_from=saved)
    with pytest.warns(UserWarning, match=r"deals 25 samples an epoch over 5 ranks, it dealt 24 over 2"):
        dealt(5, 4, resume_from=saved)


def test_the_position_is_drawn_after_the_epoch_is_set():
    # Lightning creates the loader's iterator before it sets the epoch: the order must be the new
    # epoch's all the same.
    from torch.utils.data import DistributedSampler

    sampler = GlobalPositionSampler(DistributedSampler(range(24), 1, 0, seed=3), 4)
    iterator = iter(sampler)
    sampler.set_epoch(1)
    expected = DistributedSampler(range(24), 1, 0, seed=3)
    expected.set_epoch(1)
    assert list(iterator) == list(expected)
