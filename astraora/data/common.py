"""Helpers every DataModule shares: where data lives, the missing-dataset message, seeded splits,
resumable training loaders and seeded augmentation."""

from __future__ import annotations


import os
import socket
import threading
import urllib.parse
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import torch
from torch.utils.data import DataLoader, Dataset, Sampler

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


PROBE_TIMEOUT_S = 3.0  # how long one connection attempt may take before the network counts as unreachable


def unreachable(url: str, timeout: float | None = None) -> str | None:
    """Why ``url``'s server cannot be reached now (e.g. ``"cannot connect to huggingface.co:443 (...)"``),
    or None when a TCP connection to it (or to the proxy the environment names for it) opens.

    One attempt, bounded by ``timeout`` seconds (``PROBE_TIMEOUT_S``) in all, the name lookup
    included (it runs in a daemon thread, since ``getaddrinfo`` takes no timeout): offline, a
    download is then not even started, instead of a client retrying for half a minute.
    """
    timeout = PROBE_TIMEOUT_S if timeout is None else float(timeout)
    parts = urllib.parse.urlsplit(url)
    proxy = urllib.request.getproxies().get(parts.scheme)
    if proxy and not urllib.request.proxy_bypass(parts.hostname or ""):
        parts = urllib.parse.urlsplit(proxy if "//" in proxy else f"//{proxy}")
    host = parts.hostname or ""
    port = parts.port or (443 if parts.scheme == "https" else 80)
    outcome: list[str | None] = []

    def attempt() -> None:
        try:
            connection = socket.create_connection((host, port), timeout=timeout)
            outcome.append(None)
            if connection is not None:  # (a stand-in in tests may return none)
                connection.close()
        except OSError as exc:
            outcome.append(f"cannot connect to {host}:{port} ({type(exc).__name__}: {exc})".replace("\n", " "))

    worker = threading.Thread(target=attempt, name="astraora-network-probe", daemon=True)
    worker.start()
    worker.join(timeout)
    return outcome[0] if outcome else f"cannot connect to {host}:{port} (no answer within {timeout:g} s)"


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


def trainer_rank(datamodule) -> tuple[int, int]:
    """(rank, world size) of this process in the datamodule's trainer; (0, 1) without one."""
    trainer = getattr(datamodule, "trainer", None)
    if trainer is None:
        return 0, 1
    return int(trainer.global_rank), int(getattr(trainer, "world_size", 1) or 1)


def eval_shard(n: int, datamodule) -> list[int] | None:
    """Under DDP, this process's part of an evaluation split (samples rank, rank + W, ...; no
    sample repeated, so the metrics, summed over the processes, are those of one process);
    None when training alone."""
    rank, world = trainer_rank(datamodule)
    return list(range(rank, n, world)) if world > 1 else None


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
        keys: yield ``(epoch, index)`` keys instead of indices, for a :class:`SeededItems` dataset
            (the key carries the epoch into DataLoader workers, persistent ones included).
    """

    def __init__(self, n: int, seed: int, shuffle: bool = True, on_epoch=None, keys: bool = False):
        self.n, self.seed, self.shuffle, self.on_epoch, self.keys = int(n), int(seed), shuffle, on_epoch, bool(keys)
        self.epoch, self._skip = 0, 0
        self.rank, self.world_size, self.global_batch, self.drop_last = 0, 1, 1, False

    def shard(self, rank: int, world_size: int, global_batch: int, drop_last: bool = False) -> None:
        """Serve process ``rank``'s share of every global batch (data-parallel training).

        The epoch's order is the single-process order; global batch k is its samples
        k·B .. (k+1)·B − 1 (B = ``global_batch``), and process r takes the r-th of its
        ``world_size`` equal slices, so the processes together train on exactly the samples one
        process would. A last, partial global batch is dropped with ``drop_last``, else split as
        evenly as possible (padded from the epoch's start if it has fewer samples than processes,
        so that every process runs the same number of steps)."""
        if global_batch % world_size:
            raise ValueError(f"global batch {global_batch} is not divisible by {world_size} processes")
        self.rank, self.world_size, self.global_batch, self.drop_last = int(rank), int(world_size), int(global_batch), bool(drop_last)

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
        indices = self._share(order, self._skip).tolist()
        return iter([(self.epoch, i) for i in indices] if self.keys else indices)

    def _share(self, order, skip: int):
        """This process's indices of ``order`` from global position ``skip`` on."""
        rest = order[skip:]
        if self.world_size == 1:
            return rest
        b, w = self.global_batch, self.world_size
        full = len(rest) // b
        mine = rest[:full * b].view(full, w, b // w)[:, self.rank].reshape(-1)
        tail = rest[full * b:]
        if len(tail) and not self.drop_last:
            if len(tail) < w:
                tail = torch.cat([tail, order[:w - len(tail)]])
            mine = torch.cat([mine, tail.tensor_split(w)[self.rank]])
        return mine

    def __len__(self) -> int:
        return len(self._share(torch.arange(self.n), 0)) if self.world_size > 1 else self.n


class ResumableLoader(DataLoader):
    """A DataLoader over a :class:`ResumableSampler` whose position Lightning saves in checkpoints.

    Lightning calls :meth:`state_dict` when it writes a checkpoint and :meth:`load_state_dict` when
    it resumes, before it iterates; the loader then starts at the epoch and batch the checkpoint
    was taken at. ``datamodule`` is the owning LightningDataModule (its ``trainer`` knows how many
    batches of the current epoch were trained; prefetched batches do not count).
    """

    def __init__(self, dataset, sampler: ResumableSampler, datamodule, **kwargs):
        # Under DDP (Lightning's use_distributed_sampler off, see conf/trainer/ddp*.yaml) the
        # configured batch_size is the global batch: each process loads its 1/world_size slice.
        rank, world = trainer_rank(datamodule)
        if world > 1 and sampler.world_size == 1:
            batch = int(kwargs.get("batch_size", 1))
            sampler.shard(rank, world, batch, drop_last=bool(kwargs.get("drop_last", False)))
            kwargs["batch_size"] = batch // world
        super().__init__(dataset, sampler=sampler, **kwargs)
        self._datamodule = datamodule

    def _batches_done(self) -> int:
        trainer = getattr(self._datamodule, "trainer", None)
        return int(trainer.fit_loop.epoch_loop.batch_progress.current.processed) if trainer is not None else 0

    def state_dict(self) -> dict:
        return {"epoch": self.sampler.epoch, "batches_done": self._batches_done()}

    def load_state_dict(self, state: dict) -> None:
        self.sampler.set_epoch(state["epoch"])
        self.sampler.skip(state["batches_done"] * self.batch_size * self.sampler.world_size)  # global samples


@contextmanager
def seeded_global_rng(seed: int) -> Iterator[None]:
    """Run a block with torch's global CPU generator seeded to ``seed``, and give the generator its
    previous state back afterwards: the block's draws neither depend on nor shift anyone else's."""
    state = torch.get_rng_state()
    torch.default_generator.manual_seed(seed)
    try:
        yield
    finally:
        torch.set_rng_state(state)


class SeededItems(Dataset):
    """A training dataset whose random augmentation depends on ``(seed, epoch, index)`` alone.

    Keys are ``(epoch, index)`` pairs, as a :class:`ResumableSampler` with ``keys=True`` yields them;
    item ``index`` of ``dataset`` is built with torch's global CPU generator seeded from
    ``derive_seed(seed, "augment", epoch, index)`` (see :func:`seeded_global_rng`). Every random
    transform that draws from that generator (torchvision's and torchaudio's do) therefore gives the
    same result however the items are fetched: in order or not, one batch ahead or not, in the main
    process or in any DataLoader worker, on any DDP process, and after a resume. The distribution of
    each draw is unchanged; only where its randomness comes from is fixed. Draws from Python's
    ``random`` or NumPy are not covered.
    """

    def __init__(self, dataset: Dataset, seed: int):
        self.dataset, self.seed = dataset, int(seed)

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, key: tuple[int, int]):
        epoch, index = key
        with seeded_global_rng(derive_seed(self.seed, "augment", epoch, index)):
            return self.dataset[index]
