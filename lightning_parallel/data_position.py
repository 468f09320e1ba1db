"""Where the training data stands, kept as global samples so that a mid-epoch resume continues
exactly, also under another data-parallel degree.

Lightning deals each data-parallel rank its share of an epoch with a DistributedSampler: rank r
of R reads positions r, r + R, r + 2R, ... of the epoch's order, so once every rank has read p
samples, positions [0, pR) are consumed, and global batch k is positions [kG, (k+1)G) whatever
R is (G = per-rank batch x R). A stateful loader (torchdata's StatefulDataLoader) saves its
sampler's state when the sampler has one; the sampler Lightning injects has none, so the loader
saves p and replays p samples per rank on resume, which under another R lands elsewhere.
`keep_global_position` gives such a loader a sampler that saves pR and resumes each rank at
pR / R'. Loaders without a state (a plain DataLoader) restart their epoch: `lost_position_warning`
says so when the save is made, not when it is too late.
"""

from __future__ import annotations

import itertools
from typing import Any, Iterator, Optional

from lightning.fabric.utilities.distributed import DistributedSamplerWrapper
from lightning.pytorch.trainer.states import RunningStage
from lightning.pytorch.utilities.combined_loader import CombinedLoader
from lightning.pytorch.utilities.data import _update_dataloader
from lightning.pytorch.utilities.rank_zero import rank_zero_warn
from torch.utils.data import DistributedSampler, Sampler


class GlobalPositionSampler(Sampler[int]):
    """Deals what `sampler` (a DistributedSampler) deals; its state is the epoch's position in
    global samples, so it resumes under any number of replicas."""

    def __init__(self, sampler: DistributedSampler, batch_size: Optional[int]) -> None:
        self.sampler = sampler
        self.batch_size = batch_size  # per rank, to tell whether the global batch changed
        self.yielded = 0  # samples this rank has read in the current epoch
        self._resume: Optional[tuple[int, int]] = None  # (epoch, samples already read by this rank)

    def __iter__(self) -> Iterator[int]:
        # A generator: its body runs at the first sample, after Lightning has set the epoch. A
        # checkpoint saved at an epoch's last batch resumes in the next epoch, from its start.
        resume, self._resume = self._resume, None
        start = resume[1] if resume is not None and resume[0] == self.sampler.epoch else 0
        self.yielded = start
        for index in itertools.islice(iter(self.sampler), start, None):
            self.yielded += 1
            yield index

    def __len__(self) -> int:
        return len(self.sampler)

    def set_epoch(self, epoch: int) -> None:
        self.sampler.set_epoch(epoch)

    @property
    def global_batch(self) -> Optional[int]:
        return None if self.batch_size is None else self.batch_size * self.sampler.num_replicas

    def state_dict(self) -> dict[str, Any]:
        return {
            "global_samples": self.yielded * self.sampler.num_replicas,
            "replicas": self.sampler.num_replicas,
            "global_batch": self.global_batch,
            "epoch_size": self.sampler.total_size,
            "epoch": self.sampler.epoch,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        replicas = self.sampler.num_replicas
        consumed = state["global_samples"]
        self._resume = (state["epoch"], consumed // replicas)
        differences = []
        if state["global_batch"] != self.global_batch:
            differences.append(
                f"the global batch is {self.global_batch} samples, it was {state['global_batch']}: from here on the "
                "batches differ from the interrupted run's (no sample is skipped or read twice)")
        if consumed % replicas:
            differences.append(
                f"{consumed} samples read so far do not divide over {replicas} ranks: each rank resumes at "
                f"{consumed // replicas}, so {consumed % replicas} samples are read again")
        if state["epoch_size"] != self.sampler.total_size:
            differences.append(
                f"the sampler deals {self.sampler.total_size} samples an epoch over {replicas} ranks, it dealt "
                f"{state['epoch_size']} over {state['replicas']} (padded or cut to a multiple of the ranks): the "
                "epoch's last batches differ")
        if differences:
            rank_zero_warn(
                f"The training data resumes {consumed} samples into the epoch (saved with {state['replicas']} "
                f"data-parallel ranks, resumed with {replicas}), but not exactly as the uninterrupted run would go "
                f"on: {'; '.join(differences)}. Keep the global batch (batch size x data-parallel degree) and a dataset "
                "size divisible by it to resume exactly."
            )


def keep_global_position(dataloader: Any, stage: Optional[RunningStage], saved_dp: Optional[int], dp: int) -> Any:
    """The training loader with its position saved in global samples, when it is a stateful
    loader fed by the distributed sampler Lightning injects; any other loader as it is (with a
    warning when its per-rank position is resumed under another data-parallel degree)."""
    if stage != RunningStage.TRAINING or not is_stateful(dataloader):
        return dataloader
    sampler = _distributed_sampler(dataloader)
    if sampler is None:
        if saved_dp is not None and saved_dp != dp:
            rank_zero_warn(
                f"The training loader resumes its own position under data_parallel={dp} (saved under {saved_dp}). Its "
                "sampler is not the distributed sampler Lightning injects, so that position is counted per rank and "
                "the resumed run does not read the batches the uninterrupted run would. Resume under "
                f"data_parallel={saved_dp}, or let Lightning inject its sampler (use_distributed_sampler=True)."
            )
        return dataloader
    if _wraps_default_shuffle(sampler):
        # StatefulDataLoader(shuffle=True): dealt as DataLoader(shuffle=True) is, by a seeded
        # DistributedSampler whose order depends on the epoch alone (so any epoch resumes).
        sampler = DistributedSampler(dataloader.dataset, sampler.num_replicas, sampler.rank, shuffle=True,
                                     seed=sampler.seed, drop_last=sampler.drop_last)
    batch_size = getattr(getattr(dataloader, "batch_sampler", None), "batch_size", None)
    return _update_dataloader(dataloader, GlobalPositionSampler(sampler, batch_size), RunningStage.TRAINING)


def _distributed_sampler(dataloader: Any) -> Optional[DistributedSampler]:
    # A loader with its own batch sampler class (StatefulDataLoader's) holds it there, and a
    # default SequentialSampler as `sampler`.
    for holder in (getattr(dataloader, "batch_sampler", None), dataloader):
        sampler = getattr(holder, "sampler", None)
        if isinstance(sampler, DistributedSampler):
            return sampler
    return None


def _wraps_default_shuffle(sampler: DistributedSampler) -> bool:
    """Whether `sampler` is Lightning's wrapper around the sampler StatefulDataLoader(shuffle=True)
    makes: a permutation of the whole dataset drawn from a generator whose state the wrapper does
    not save. Lightning replaces torch's RandomSampler, but does not recognize torchdata's."""
    try:
        from torchdata.stateful_dataloader.sampler import RandomSampler
    except ImportError:
        return False
    wrapped = getattr(sampler.dataset, "_sampler", None) if isinstance(sampler, DistributedSamplerWrapper) else None
    return (isinstance(wrapped, RandomSampler) and not wrapped.replacement
            and wrapped.num_samples == len(wrapped.data_source))


def is_stateful(loader: Any) -> bool:
    return callable(getattr(loader, "state_dict", None)) and callable(getattr(loader, "load_state_dict", None))


def lost_position_warning(trainer) -> Optional[str]:
    """Why a checkpoint saved now resumes elsewhere in the data, if it does: it is saved
    mid-epoch and a training loader keeps no position."""
    done = trainer.fit_loop.epoch_loop.batch_progress.current.processed
    if not 0 < done < trainer.num_training_batches:
        return None
    plain = [type(dl).__name__ for dl in _training_loaders(trainer) if not is_stateful(dl)]
    if not plain:
        return None
    return (f"A checkpoint is saved {done} batches into an epoch, but the training {plain[0]} keeps no position: a "
            "run resumed from it starts the epoch again and reads its first batches twice. Use "
            "torchdata.stateful_dataloader.StatefulDataLoader (same arguments as DataLoader), whose position "
            "Lightning saves and HybridParallel resumes exactly, also under another data-parallel degree.")


def _training_loaders(trainer) -> list[Any]:
    loaders = trainer.train_dataloader
    return [] if loaders is None else CombinedLoader(loaders).flattened
