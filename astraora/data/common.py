"""Helpers every DataModule shares: where data lives, the missing-dataset message, seeded splits."""

from __future__ import annotations

import os
from pathlib import Path

import torch
from torch.utils.data import DataLoader, Sampler

from astraora.errors import DatasetNotFoundError
from astraora.rng import derive_seed

DATA_DIR_ENV = "ASTRAORA_DATA_DIR"


def resolve_data_dir(data_dir: str | os.PathLike | None) -> Path:
    """The dataset root: the ``ASTRAORA_DATA_DIR`` environment variable wins over ``paths.data_dir``."""
    env = os.environ.get(DATA_DIR_ENV)
    root = Path(env) if env else Path(data_dir if data_dir is not None else "data")
    return root.expanduser()


def missing_dataset(name: str, looked_in: str | os.PathLike, how: str) -> DatasetNotFoundError:
    """One line: which dataset, where we looked, and how to provide it."""
    return DatasetNotFoundError(f"dataset {name!r} not found in {looked_in} and could not be downloaded; {how}")


def seeded_split(n: int, fractions: tuple[float, ...], seed: int) -> list[list[int]]:
    """Split range(n) into parts with the given fractions (the last part takes the remainder),
    reproducibly from ``seed``."""
    order = torch.randperm(n, generator=torch.Generator().manual_seed(int(seed))).tolist()
    parts, start = [], 0
    for fraction in fractions[:-1]:
        size = int(round(fraction * n))
        parts.append(order[start:start + size])
        start += size
    parts.append(order[start:])
    return parts


def default_num_workers() -> int:
    """A sensible DataLoader worker count: 0 on small CPU machines (no fork overhead), else up to 4."""
    cpus = os.cpu_count() or 1
    return 0 if cpus <= 2 else min(4, cpus - 1)


class ResumableSampler(Sampler[int]):
    """Indices of one epoch, in an order fixed by ``(seed, epoch)`` alone, that can start mid-epoch.

    Lightning calls :meth:`set_epoch` before every epoch. After a resume from a checkpoint taken
    in the middle of an epoch, :meth:`skip` leaves out the samples that epoch had already served,
    so the run continues exactly where the checkpoint was taken (see ``astraora.train``).

    Args:
        n: dataset size.
        seed: the run seed.
        shuffle: a fresh permutation per epoch (training) or 0..n-1 in order.
        on_epoch: called with the epoch number by :meth:`set_epoch` (e.g. to redraw text windows).
    """

    def __init__(self, n: int, seed: int, shuffle: bool = True, on_epoch=None):
        self.n, self.seed, self.shuffle, self.on_epoch = int(n), int(seed), shuffle, on_epoch
        self.epoch, self._skip = 0, 0

    def set_epoch(self, epoch: int) -> None:
        if epoch != self.epoch:
            self._skip = 0
        self.epoch = int(epoch)
        if self.on_epoch is not None:
            self.on_epoch(self.epoch)

    def skip(self, samples: int) -> None:
        """Leave out the first ``samples`` indices of the current epoch (every iteration of it)."""
        self._skip = int(samples)

    def __iter__(self):
        if self.shuffle:
            order = torch.randperm(self.n, generator=torch.Generator().manual_seed(derive_seed(self.seed, "data", str(self.epoch))))
        else:
            order = torch.arange(self.n)
        return iter(order[self._skip:].tolist())

    def __len__(self) -> int:
        return self.n


class ResumableLoader(DataLoader):
    """A DataLoader over a :class:`ResumableSampler` whose position Lightning saves in checkpoints.

    Lightning calls :meth:`state_dict` when it writes a checkpoint and :meth:`load_state_dict` when
    it resumes, before it iterates; the loader then starts at the epoch and batch the checkpoint
    was taken at. ``datamodule`` is the owning LightningDataModule (its ``trainer`` knows how many
    batches of the current epoch were trained; prefetched batches do not count).
    """

    def __init__(self, dataset, sampler: ResumableSampler, datamodule, **kwargs):
        super().__init__(dataset, sampler=sampler, **kwargs)
        self._datamodule = datamodule

    def _batches_done(self) -> int:
        trainer = getattr(self._datamodule, "trainer", None)
        return int(trainer.fit_loop.epoch_loop.batch_progress.current.processed) if trainer is not None else 0

    def state_dict(self) -> dict:
        return {"epoch": self.sampler.epoch, "batches_done": self._batches_done()}

    def load_state_dict(self, state: dict) -> None:
        self.sampler.set_epoch(state["epoch"])
        self.sampler.skip(state["batches_done"] * self.batch_size)
