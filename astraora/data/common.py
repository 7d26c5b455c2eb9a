"""Helpers every DataModule shares: where data lives, the missing-dataset message, seeded splits."""

from __future__ import annotations

import os
from pathlib import Path

import torch

from astraora.errors import DatasetNotFoundError

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
