"""The run folder (astraora.rundir): metrics.csv surgery on resume, what a resume reads back, the one-line
report, summary.json, and a folder left unused."""

from __future__ import annotations

import csv
import json
import logging
from pathlib import Path

import pytest
import torch
from conftest import compose_config
from omegaconf import OmegaConf

from astraora.logs import LOG_FILE
from astraora.rundir import (
    comparison_setting,
    discard_unused_run_dir,
    finished_summary,
    last_logged,
    report,
    resume_hint,
    run_dir_of,
    truncate_metrics,
    write_summary,
    zo_samples,
)

HEADER = ["epoch", "step", "train/loss", "val/acc"]


def write_rows(path: Path, rows: list[dict], header: list[str] = HEADER) -> None:
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=header)
        writer.writeheader()
        writer.writerows(rows)


def read_rows(path: Path) -> tuple[list[str], list[dict]]:
    with open(path, newline="") as f:
        reader = csv.DictReader(f)
        return reader.fieldnames, list(reader)


def test_truncate_metrics_drops_the_rows_a_resume_logs_again(tmp_path):
    """Rows of steps >= the checkpoint's go; rows without a step (none here) and earlier rows stay."""
    path = tmp_path / "metrics.csv"
    write_rows(path, [{"epoch": 0, "step": s, "train/loss": 1.0 / (s + 1), "val/acc": ""} for s in range(6)])
    truncate_metrics(path, 4)
    header, rows = read_rows(path)
    assert header == HEADER and [r["step"] for r in rows] == ["0", "1", "2", "3"]
    truncate_metrics(tmp_path / "absent.csv", 4)  # a run without rows yet: nothing to do
    assert not (tmp_path / "absent.csv").exists()


def test_truncate_metrics_adds_the_checkpoints_pending_row_once(tmp_path):
    """The row Lightning logs just after a step checkpoint: added where a killed run never wrote it,
    with a new column where it brings one, and not twice where it is there already."""
    path = tmp_path / "metrics.csv"
    write_rows(path, [{"epoch": 0, "step": s, "train/loss": 0.5, "val/acc": ""} for s in range(3)])
    pending = {"train/loss": 0.25, "queries/total": 640.0, "epoch": 0, "step": 3}
    truncate_metrics(path, 4, pending)
    header, rows = read_rows(path)
    assert header == sorted(set(HEADER) | set(pending)) and len(rows) == 4
    assert {k: rows[-1][k] for k in pending} == {k: str(v) for k, v in pending.items()}
    truncate_metrics(path, 4, pending)
    assert len(read_rows(path)[1]) == 4


def test_last_logged_takes_each_columns_last_value(tmp_path):
    path = tmp_path / "metrics.csv"
    write_rows(
        path,
        [
            {"epoch": 0, "step": 1, "train/loss": 2.0, "val/acc": 0.5},
            {"epoch": 0, "step": 2, "train/loss": 1.0, "val/acc": ""},
            {"epoch": 1, "step": 3, "train/loss": 0.5, "val/acc": 0.75},
        ],
    )
    assert last_logged(path, "val/") == {"val/acc": 0.75}
    assert last_logged(path, "train/") == {"train/loss": 0.5}
    assert last_logged(tmp_path / "absent.csv", "val/") == {}


def checkpoint_state(step: int, epochs: int) -> dict:
    return {"global_step": step, "loops": {"fit_loop": {"epoch_progress": {"current": {"processed": epochs}}}}}


def test_finished_summary_only_for_a_completed_run_at_its_limit(tmp_path):
    cfg = OmegaConf.create({"trainer": {"max_epochs": 2, "max_steps": -1}})
    summary = {"status": "completed", "steps": 8}
    assert finished_summary(cfg, checkpoint_state(8, 2), tmp_path) is None  # no summary.json
    write_summary(summary, tmp_path)
    assert (tmp_path / "summary.json").read_text() == json.dumps(summary, indent=2) + "\n"
    assert finished_summary(cfg, checkpoint_state(8, 2), tmp_path) == summary
    assert finished_summary(cfg, checkpoint_state(6, 2), tmp_path) is None  # another checkpoint of the run
    longer = OmegaConf.create({"trainer": {"max_epochs": 3, "max_steps": -1}})
    assert finished_summary(longer, checkpoint_state(8, 2), tmp_path) is None  # trains further
    by_steps = OmegaConf.create({"trainer": {"max_epochs": -1, "max_steps": 8}})
    assert finished_summary(by_steps, checkpoint_state(8, 2), tmp_path) == summary
    write_summary({"status": "failed", "steps": 8}, tmp_path)
    assert finished_summary(cfg, checkpoint_state(8, 2), tmp_path) is None
    (tmp_path / "summary.json").write_text("{not json")
    assert finished_summary(cfg, checkpoint_state(8, 2), tmp_path) is None


def test_a_resume_writes_into_the_folder_of_its_checkpoint(tmp_path):
    cfg = OmegaConf.create({"paths": {"output_dir": str(tmp_path / "new")}})
    assert run_dir_of(cfg, None) == tmp_path / "new"
    assert run_dir_of(cfg, tmp_path / "old" / "checkpoints" / "step6.ckpt") == tmp_path / "old"
    assert run_dir_of(cfg, tmp_path / "copied.ckpt") == tmp_path / "new"  # a lone file: the new folder


def test_resume_hint_names_the_last_checkpoints_step(tmp_path):
    assert "No checkpoint was written yet" in resume_hint(tmp_path)
    (tmp_path / "checkpoints").mkdir()
    torch.save({"global_step": 6}, tmp_path / "checkpoints" / "last.ckpt")
    assert resume_hint(tmp_path) == f"resume={tmp_path} continues exactly from the checkpoint at step 6."
    (tmp_path / "checkpoints" / "last.ckpt").write_bytes(b"not a checkpoint")
    assert resume_hint(tmp_path) == f"resume={tmp_path} continues from its last checkpoint."


def test_an_unused_run_folder_is_discarded_and_a_used_one_kept(tmp_path):
    unused, used = tmp_path / "unused", tmp_path / "used"
    for folder in (unused, used):
        (folder / ".hydra").mkdir(parents=True)
        (folder / ".hydra" / "config.yaml").write_text("{}\n")
    handler = logging.FileHandler(unused / LOG_FILE)
    logging.getLogger().addHandler(handler)
    try:
        (used / "metrics.csv").write_text("step\n")
        discard_unused_run_dir(unused)
        discard_unused_run_dir(used)
        assert not unused.exists() and (used / ".hydra" / "config.yaml").exists()
        assert handler not in logging.getLogger().handlers  # its train.log handler is closed with it
    finally:
        logging.getLogger().removeHandler(handler)
        handler.close()


def test_report_is_the_runs_last_line():
    summary = {
        "task": "digits",
        "device": "mzi",
        "mode": "zo+sm",
        "metrics": {"val/acc": 0.5, "test/acc": 0.97034, "test/loss": 0.1},
        "queries": {"total": 3729393},
        "run_dir": "outputs/runs/x",
    }
    assert report(summary) == (
        "digits / mzi (zo+sm): test/acc = 0.9703; hardware queries: 3,729,393; outputs: outputs/runs/x"
    )
    assert "no test metric" in report({**summary, "metrics": {}})
    assert "test/ppl = 2.0000" in report({**summary, "metrics": {"test/ppl": 2.0, "test/loss": 0.7}})


@pytest.mark.parametrize(
    "overrides, expected",
    [
        ([], {"device": "mzi", "mode": "zo+sm", "rank": "auto", "M": 100, "integrator": "auto", "hybrid": True}),
        (["device=digital"], {"device": "digital", "mode": "digital", "rank": None, "M": None, "hybrid": False}),
        (["mode=exact+sm", "surrogate.rank=4"], {"mode": "exact+sm", "rank": 4, "M": None}),
        (["mode=zo+exact"], {"mode": "zo+exact", "rank": None, "M": 100, "integrator": None}),
        (["zo=colored", "device=mrr"], {"device": "mrr", "M": None}),
    ],
)
def test_comparison_setting_leaves_out_what_does_not_apply(overrides, expected):
    cfg = compose_config(overrides)
    setting = comparison_setting(cfg)
    assert set(setting) == {"task", "device", "mode", "rank", "M", "integrator", "hybrid", "seed"}
    assert {k: setting[k] for k in expected} == expected and setting["task"] == "digits" and setting["seed"] == 0
    assert zo_samples(cfg) == (None if "zo=colored" in overrides else 100)
