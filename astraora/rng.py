"""Explicit random generators derived from the run seed and a stable name.

Every random draw in astraora (ZO directions, sketches, device noise and drift, faults) comes
from a ``torch.Generator`` made here, so adding a layer or a diagnostic never shifts the
randomness of another one, and every generator's state can be checkpointed.
"""

from __future__ import annotations

import hashlib

import torch


def derive_seed(seed: int, *names: str) -> int:
    """A 63-bit seed from the run seed and a path of names (stable across processes)."""
    key = "/".join([str(int(seed)), *map(str, names)]).encode()
    return int.from_bytes(hashlib.sha256(key).digest()[:8], "little") & ((1 << 63) - 1)


def make_generator(seed: int, *names: str, device: str | torch.device = "cpu") -> torch.Generator:
    gen = torch.Generator(device=device)
    gen.manual_seed(derive_seed(seed, *names))
    return gen
