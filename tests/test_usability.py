"""What a new user meets: bad inputs stop in one line with exit code 2 and leave nothing behind,
a resume continues in its own run directory, train.log holds the console's lines, and a W&B run
carries what summary.json has."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from conftest import run_cli
from fixtures_vision_audio import write_audio_tree, write_image_tree
from wandb_offline import read_offline_run

from astraora.errors import AstraoraError
from astraora.train import CHECKPOINT_META, run

FAST = ["debug=fast", "task.model.hidden=16", "surrogate.rank=4"]


def one_line_exit_2(result, *needles: str) -> str:
    assert result.returncode == 2, result.stderr[-2000:]
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and "Traceback" not in result.stderr, result.stderr[-2000:]
    assert all(needle in lines[0] for needle in needles), lines[0]
    return lines[0]


def single_class(root: Path, kind: str) -> Path:
    """A class tree with one class folder."""
    (write_image_tree if kind == "image" else write_audio_tree)(root)
    for extra in sorted(p for p in root.iterdir() if p.is_dir())[1:]:
        for file in extra.iterdir():
            file.unlink()
        extra.rmdir()
    return root


@pytest.mark.parametrize("kind", ["image", "audio"])
def test_one_class_folder_is_one_line(make_cfg, tmp_path, kind):
    root = single_class(tmp_path / kind, kind)
    task = "image_folder" if kind == "image" else "audio_folder"
    cfg = make_cfg(*FAST[:1], f"task={task}", f"task.root={root}", "task.datamodule.num_workers=0")
    with pytest.raises(AstraoraError, match="has 1 class folder.*at least 2"):
        run(cfg)
    assert not Path(cfg.paths.output_dir).exists()


def test_empty_class_folder_and_empty_split_are_one_line(make_cfg, tmp_path):
    root = tmp_path / "images"
    write_image_tree(root)
    (root / "empty_class").mkdir()
    cfg = make_cfg(*FAST[:1], "task=image_folder", f"task.root={root}", "task.datamodule.num_workers=0")
    with pytest.raises(AstraoraError, match="empty_class has no readable files"):
        run(cfg)
    (root / "empty_class").rmdir()
    cfg = make_cfg(
        *FAST[:1],
        "task=image_folder",
        f"task.root={root}",
        "task.datamodule.num_workers=0",
        "task.datamodule.val_fraction=0.01",
    )
    with pytest.raises(AstraoraError, match=r"the val split .* is empty.*val_fraction"):
        run(cfg)
    assert not Path(cfg.paths.output_dir).exists()


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


def test_cli_refusals_leave_no_run_folder(tmp_path):
    """A key the config lacks, a one-class folder, a truncated checkpoint: one line, exit 2, no
    outputs/runs/<run> (bad config values: test_reliability.py)."""
    root = single_class(tmp_path / "images", "image")
    bad = tmp_path / "bad.ckpt"
    bad.write_bytes(b"PK\x03\x04 not a whole checkpoint")
    for args, needle in [
        (["debug=fast", "task.model.hiden=16"], "task.model.hiden"),
        (["debug=fast", "task=image_folder", f"task.root={root}"], "has 1 class folder"),
        ([*FAST, f"resume={bad}"], "is not a readable checkpoint"),
    ]:
        one_line_exit_2(run_cli(args, cwd=tmp_path), needle)
    assert not list((tmp_path / "outputs" / "runs").glob("*"))


@pytest.mark.slow
def test_cli_multirun_refused_in_its_first_job_leaves_no_sweep_folder(tmp_path):
    """A refusal only the data can give (run(), inside Hydra's multirun): one line, exit 2, and no
    outputs/multirun/<sweep> with a lone multirun.yaml (tests/test_preflight.py: the earlier checks)."""
    args = ["-m", "debug=fast", "task=image_folder", f"task.root={tmp_path / 'missing'}", "seed=1,2"]
    result = run_cli(args, cwd=tmp_path)
    one_line_exit_2(result, "is not a folder")
    assert not list((tmp_path / "outputs" / "multirun").glob("*"))


def test_cli_resume_continues_in_its_run_and_train_log_holds_the_console(tmp_path):
    """A run (started in-process, as the command line would lay it out) resumed from the command line:
    no second folder, and the console's lines, the resume's among them, land in its train.log."""
    from conftest import compose_config

    run_dir = tmp_path / "outputs" / "runs" / "first"
    run(compose_config([*FAST, "trainer.max_epochs=1"], run_dir))
    resumed = run_cli([*FAST, "trainer.max_epochs=2", f"resume={run_dir}"], cwd=tmp_path)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert [p.name for p in (tmp_path / "outputs" / "runs").iterdir()] == ["first"]  # no second folder
    log = (run_dir / "train.log").read_text()
    report = resumed.stdout.strip().splitlines()[-1]
    assert report.startswith("digits / mzi (zo+sm): test/acc") and report in log
    assert "resuming from" in log and "`Trainer.fit` stopped: `max_epochs=2`" in log
    assert "`Trainer.fit` stopped" in resumed.stdout and "resuming from" in resumed.stdout
    for noise in ("💡", "Tip:", "LeafSpec", "anonymous"):
        assert noise not in resumed.stdout + resumed.stderr + log
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["status"] == "completed" and summary["epochs"] == 2


def test_wandb_offline_run_carries_the_summary_and_comparison_keys(make_cfg, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    cfg = make_cfg(*FAST, "logger=wandb", "callbacks.diagnostics.every_n_steps=1")
    summary = run(cfg)
    (offline,) = (Path(cfg.paths.output_dir) / "wandb").glob("offline-run-*")
    wb = read_offline_run(offline)
    expected = {
        **summary["metrics"],
        **{f"queries/{p}": n for p, n in summary["queries"].items()},
        "reprograms": summary["reprograms"],
        "status": "completed",
        "steps": summary["steps"],
        "surrogate/rel_error": summary["surrogate"]["rel_error"],
        "surrogate/rank": 4,
    }
    assert {key: wb["summary"].get(key) for key in expected} == pytest.approx(expected)
    assert wb["config"]["setting"] == {
        "task": "digits",
        "device": "mzi",
        "mode": "zo+sm",
        "rank": 4,
        "M": 4,
        "integrator": "auto",
        "hybrid": True,
        "seed": 0,
    }
    assert wb["run"].run_group == "digits" and wb["run"].job_type == "zo+sm"
    assert {"device:mzi", "mode:zo+sm", "task:digits", "hybrid"} <= set(wb["run"].tags)
    # every row has the x axis for "metric vs queries": val/acc rows too
    val_rows = [row for row in wb["history"] if "val/acc" in row]
    assert val_rows and all(row["queries/total"] > 0 for row in val_rows)

    digital = run(make_cfg(*FAST, "logger=wandb", "device=digital", out="digital"))
    (offline,) = (Path(digital["run_dir"]) / "wandb").glob("offline-run-*")
    wb = read_offline_run(offline)
    assert wb["run"].run_group == "digits" and wb["config"]["setting"]["mode"] == "digital"
    assert wb["summary"]["queries/total"] == 0 and wb["summary"]["status"] == "completed"


def test_wide_physical_layer_on_cpu_warns(make_cfg, caplog):
    import logging

    caplog.set_level(logging.WARNING, logger="astraora")
    run(
        make_cfg(
            "debug=fast", "device=slm", "task.model.hidden=520", "surrogate.rank=4", "trainer.limit_train_batches=1"
        )
    )
    warnings = [r.getMessage() for r in caplog.records if "on a CPU: expect minutes per step" in r.getMessage()]
    assert warnings == [
        "physical layer head.physical is 520 -> 520 (SLM) on a CPU: expect minutes per step; README "
        "'How long a run takes on a CPU' lists CPU-sized settings, scripts/time_epoch.py estimates "
        "this one"
    ]
