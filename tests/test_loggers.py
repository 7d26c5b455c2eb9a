"""Where a run's metrics go (astraora.loggers): metrics.csv, continued on resume, and a W&B run (offline
here) that carries summary.json's values and the settings runs are compared by."""

from __future__ import annotations

from pathlib import Path

import pytest
from omegaconf import OmegaConf
from wandb_offline import read_offline_run

from astraora.errors import AstraoraError
from astraora.loggers import WANDB_RESUME, check_wandb_resume, csv_logger, wandb_group, wandb_summary
from astraora.train import run

FAST = ["debug=fast", "task.model.hidden=16", "surrogate.rank=4"]


def test_csv_logger_continues_the_rows_of_a_resumed_run(tmp_path):
    previous = "epoch,step,train/loss\n0,0,2.0\n0,1,1.5\n"
    (tmp_path / "metrics.csv").write_text(previous)
    logger = csv_logger(tmp_path)
    assert (tmp_path / "metrics.csv").read_text() == previous  # Lightning's writer would have removed it
    logger.log_metrics({"train/loss": 1.0, "epoch": 0}, step=2)
    logger.save()
    assert (tmp_path / "metrics.csv").read_text() == previous + "0,2,1.0\n"
    fresh = csv_logger(tmp_path / "fresh")
    fresh.log_metrics({"train/loss": 3.0}, step=0)
    fresh.save()
    assert (tmp_path / "fresh" / "metrics.csv").read_text() == "step,train/loss\n0,3.0\n"


def test_wandb_summary_flattens_summary_json():
    summary = {
        "metrics": {"test/acc": 0.9, "val/acc": 0.8},
        "queries": {"forward": 1, "zo": 2, "surrogate": 0, "readout": 3, "total": 6},
        "reprograms": 4,
        "surrogate": {"rank": 16, "rel_error": 0.1, "rel_error_best_rank_r": 0.09},
        "status": "completed",
        "steps": 19,
        "epochs": 1,
        "wall_seconds": 2.5,
        "run_dir": "unused",
    }
    assert wandb_summary(summary) == {
        "test/acc": 0.9,
        "val/acc": 0.8,
        "queries/forward": 1,
        "queries/zo": 2,
        "queries/surrogate": 0,
        "queries/readout": 3,
        "queries/total": 6,
        "reprograms": 4,
        "surrogate/rank": 16,
        "surrogate/rel_error": 0.1,
        "surrogate/rel_error_best_rank_r": 0.09,
        "status": "completed",
        "steps": 19,
        "epochs": 1,
        "wall_seconds": 2.5,
    }
    assert "surrogate/rank" not in wandb_summary({**summary, "surrogate": None})


def test_wandb_resume_modes_and_group():
    for mode in WANDB_RESUME:
        check_wandb_resume(OmegaConf.create({"logger": {"wandb": {"resume": mode}}}))
    check_wandb_resume(OmegaConf.create({"logger": {"wandb": None}}))  # no W&B: nothing to check
    with pytest.raises(AstraoraError, match=r"logger.wandb.resume='fork' is not allowed; choose one of"):
        check_wandb_resume(OmegaConf.create({"logger": {"wandb": {"resume": "fork"}}}))
    assert wandb_group("digits") == "digits"  # a single run, outside Hydra: the configured group


def test_wandb_offline_leaves_a_run_directory(make_cfg, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    cfg = make_cfg("debug=fast", "callbacks.diagnostics.every_n_steps=1", "logger=wandb", "device=digital")
    run(cfg)
    out = Path(cfg.paths.output_dir)
    assert list((out / "wandb").glob("offline-run-*"))
    assert (out / "metrics.csv").is_file()


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
