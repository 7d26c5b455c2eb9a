"""What a resume reads first: the checkpoint, checked before anything is written (torch only, no
Lightning, so the command line can check it before Hydra makes a run directory)."""

from __future__ import annotations

import os
from pathlib import Path

import torch
from omegaconf import DictConfig

from astraora.errors import AstraoraError

# What astraora writes into every checkpoint beside Lightning's state, under this key: the format
# version (a newer one is refused, not misread) and what the run trained (task, device, mode).
CHECKPOINT_META = "astraora"
CHECKPOINT_FORMAT = 2
# Format 2: mzi_classical keeps each cell's phases in the order (φ, θ); format 1 stored (θ, φ), which the
# same numbers would now read as another device (astraora.devices.mzi.swap_cell_phases converts a θ).


def find_checkpoint(resume: str | os.PathLike) -> Path:
    """A .ckpt file, or a run directory (its checkpoints/last.ckpt)."""
    path = Path(resume)
    if path.is_dir():
        path = path / "checkpoints" / "last.ckpt"
    if not path.is_file():
        raise AstraoraError(f"resume={resume} has no checkpoint (looked for {path}).")
    return path


def run_meta(cfg: DictConfig) -> dict:
    """What a checkpoint records about its run, and a resume must match."""
    digital = cfg.device.family == "digital"
    return {
        "task": str(cfg.task.name),
        "device": str(cfg.device.family),
        "mode": "digital" if digital else str(cfg.mode),
    }


def read_checkpoint(cfg: DictConfig) -> tuple[Path, dict]:
    """The checkpoint ``cfg.resume`` names and its contents, checked before anything is written:
    readable, written by astraora in a format this version knows, of this task, device and mode."""
    resume = cfg.resume
    path = find_checkpoint(resume)
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - truncated zip, not a torch file, foreign pickled objects
        reason = (str(exc).strip().splitlines() or [type(exc).__name__])[0].split(". ")[0]
        raise AstraoraError(
            f"resume={resume}: {path} is not a readable checkpoint (truncated or not written by "
            f"torch.save: {reason}); resume from another .ckpt in its checkpoints/ folder."
        ) from None
    meta = state.get(CHECKPOINT_META) if isinstance(state, dict) else None
    if not isinstance(meta, dict) or "global_step" not in state or "state_dict" not in state:
        raise AstraoraError(
            f"resume={resume}: {path} was not written by astraora (no '{CHECKPOINT_META}' entry); "
            "resume from a run directory or a .ckpt in its checkpoints/ folder."
        )
    if int(meta.get("format", 0)) > CHECKPOINT_FORMAT:
        raise AstraoraError(
            f"resume={resume}: {path} has checkpoint format {meta['format']}, newer than the "
            f"{CHECKPOINT_FORMAT} this astraora reads; upgrade astraora to resume it."
        )
    if int(meta.get("format", 0)) < 2 and meta.get("device") == "mzi_classical":
        raise AstraoraError(
            f"resume={resume}: {path} stores mzi_classical's cell phases in the order of format "
            f"{meta.get('format', 0)} (θ, φ), which this astraora reads as (φ, θ); convert θ with "
            "astraora.devices.mzi.swap_cell_phases or start the run again."
        )
    for key, value in run_meta(cfg).items():
        if meta.get(key) != value:
            raise AstraoraError(
                f"resume={resume}: the checkpoint was trained with {key}={meta.get(key)}, not "
                f"{key}={value}; resume with the overrides the run was started with."
            )
    return path, state
