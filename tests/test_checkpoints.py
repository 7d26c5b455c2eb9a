"""What a resume reads first (astraora.checkpoints, and the model's shapes: astraora.rundir): a checkpoint
that is unreadable, foreign, newer or of another run is refused before anything is written."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from astraora.checkpoints import CHECKPOINT_META
from astraora.errors import AstraoraError
from astraora.train import run

FAST = ["debug=fast", "task.model.hidden=16", "surrogate.rank=4"]


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory) -> Path:
    """A short digits/mzi run to resume from (and to spoil copies of)."""
    from conftest import compose_config

    out = tmp_path_factory.mktemp("finished") / "run"
    run(compose_config([*FAST, "trainer.max_epochs=1"], out))
    return out


def spoiled_checkpoint(finished_run: Path, tmp_path: Path, how: str) -> Path:
    ckpt = tmp_path / "checkpoints" / "last.ckpt"
    ckpt.parent.mkdir(parents=True)
    data = (finished_run / "checkpoints" / "last.ckpt").read_bytes()
    if how == "truncated":
        ckpt.write_bytes(data[: len(data) // 2])
        return ckpt
    state = torch.load(finished_run / "checkpoints" / "last.ckpt", weights_only=True)
    if how == "newer":
        state[CHECKPOINT_META]["format"] += 1
    elif how == "foreign":
        del state[CHECKPOINT_META]
    torch.save(state, ckpt)
    return ckpt


@pytest.mark.slow
@pytest.mark.parametrize(
    "how, overrides, message",
    [
        ("truncated", [], "is not a readable checkpoint"),
        ("newer", [], "newer than the 2 this astraora reads"),
        ("foreign", [], "was not written by astraora"),
        ("intact", ["task=synthetic_audio"], "trained with task=digits, not task=synthetic_audio"),
        ("intact", ["device=slm"], "trained with device=mzi, not device=slm"),
        ("intact", ["device=digital"], "trained with device=mzi, not device=digital"),
        ("intact", ["task.model.hidden=24"], "the checkpoint's model.*is of shape"),
    ],
)
def test_unusable_checkpoints_are_refused_before_anything_is_written(
    make_cfg, finished_run, tmp_path, how, overrides, message
):
    ckpt = (
        finished_run / "checkpoints" / "last.ckpt"
        if how == "intact"
        else spoiled_checkpoint(finished_run, tmp_path, how)
    )
    before = {p: p.stat().st_mtime_ns for p in ckpt.parent.parent.rglob("*")}
    base = FAST if not overrides[:1] or not overrides[0].startswith("task=") else ["debug=fast", "surrogate.rank=4"]
    cfg = make_cfg(*base, *overrides, f"resume={ckpt}", out="elsewhere")
    with pytest.raises(AstraoraError, match=message):
        run(cfg)
    assert not Path(cfg.paths.output_dir).exists()
    assert {p: p.stat().st_mtime_ns for p in ckpt.parent.parent.rglob("*")} == before
