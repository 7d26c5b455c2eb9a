"""The studies as Hydra experiment configs (conf/experiment/study_*.yaml) and their report drivers
(scripts/parity_study.py, scripts/query_study.py): every study config composes with the study's
settings, the query report's variants, ratios and paired differences on fabricated sweep folders,
and (slow) a tiny multirun of each study followed by its driver."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

REPO = Path(__file__).resolve().parents[1]
CONFIG_DIR = str(REPO / "conf")
STUDIES = sorted(path.stem for path in (REPO / "conf" / "experiment").glob("study_*.yaml"))


def load_script(name: str):
    spec = importlib.util.spec_from_file_location(name, REPO / "scripts" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def composed(*overrides: str):
    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        return compose("config", overrides=list(overrides), return_hydra_config=True)


SWEEP_DIRS = {"parity": "outputs/parity", "query": "outputs/query_study", "stale": "outputs/stale_surrogate"}
TASKS = ("image_folder", "synthetic_audio", "pydoc_text")  # study_<name>[_<setting>][_<task>]; digits without


@pytest.mark.slow
@pytest.mark.parametrize("study", STUDIES)
def test_every_study_config_composes(study):
    cfg = composed(f"experiment={study}", "seed=2")
    prefix = study.split("_")[1]
    assert cfg.hydra.sweep.dir == SWEEP_DIRS[prefix] and cfg.seed == 2
    assert OmegaConf.to_container(cfg.hydra.sweep)["subdir"] == "${hydra:job.override_dirname}"
    assert cfg.task.name == next((task for task in TASKS if study.endswith(task)), "digits")
    if prefix == "query":
        assert cfg.device.family == "mzi"
    if prefix == "stale":  # the full_rank setting: full rank and an orthogonal sketch of n rows
        assert (cfg.mode, cfg.integrator.name, cfg.callbacks.checkpoint) == ("zo+sm", "psi_implicit", None)
        rows = {"digits": 64, "synthetic_audio": 192, "pydoc_text": 128}[cfg.task.name]
        sketch = (rows, "orthogonal") if "full_rank" in study else (100, "gaussian")
        assert (cfg.integrator.samples, cfg.integrator.sketch) == sketch


def test_study_task_settings():
    """The CPU sizes the studies train at (the docs' tables come from them)."""
    images = composed("experiment=study_parity_image_folder", "device=digital").task
    assert (images.max_epochs, images.root) == (8, "textures")
    dm = images.datamodule
    assert (dm.image_size, dm.batch_size, dm.test_fraction, dm.num_workers) == (32, 32, 0.2, 0)
    assert composed("experiment=study_query_image_folder").task == images
    for study, clips in (("study_parity_synthetic_audio", 64), ("study_query_synthetic_audio", 128)):
        dm = composed(f"experiment={study}").task.datamodule
        assert (dm.noise, dm.num_classes, dm.clips_per_class) == (1.5, 8, clips)
    assert composed("experiment=study_parity_pydoc_text").task.max_epochs == 1
    assert composed("experiment=study_parity", "mode=exact").task == composed("mode=exact").task


def fake(
    root: Path,
    task: str,
    seed: int,
    acc: float,
    total: float,
    samples=100,
    every=1,
    reuse=False,
    status="completed",
    rank=None,
    device="mzi",
):
    directory = root / f"task={task},device={device},M={samples},every={every},reuse={reuse},r={rank},seed={seed}"
    directory.mkdir(parents=True)
    config = {"zo": {"samples": samples, "every": every, "batch_rank": rank}, "integrator": {"reuse_sketch": reuse}}
    summary = {
        "task": task,
        "device": device,
        "mode": "zo+sm",
        "seed": seed,
        "status": status,
        "metrics": {"test/acc": acc},
        "queries": {"total": total},
        "config": config,
    }
    (directory / "summary.json").write_text(json.dumps(summary))


def test_query_report_ratios_and_paired_differences(tmp_path):
    query = load_script("query_study")
    fake(tmp_path, "digits", 0, 0.90, 1000)
    fake(tmp_path, "digits", 1, 0.92, 1000)
    fake(tmp_path, "digits", 0, 0.905, 250, samples=50, every=2)
    fake(tmp_path, "digits", 1, 0.915, 250, samples=50, every=2)
    fake(tmp_path, "digits", 5, 0.0, 250, samples=50, every=2)  # not among the reported seeds
    fake(tmp_path, "digits", 0, 0.80, 500, samples=50)
    fake(tmp_path, "digits", 1, 0.10, 500, samples=50, status="failed")  # left out
    fake(tmp_path, "digits", 0, 0.91, 600, every=4, reuse=True)
    fake(tmp_path, "digits", 0, 0.93, 90, rank=2)  # the preset (the sketched batch)
    fake(tmp_path, "digits", 0, 0.95, 1000, device="mrr")  # another device: its own paper
    fake(tmp_path, "digits", 0, 0.96, 100, device="mrr", rank=4)
    assert query.main([str(tmp_path), "--seeds", "0", "1"]) == 0
    every_row = query.collect([tmp_path], [0, 1])
    rows = {r["variant"]: r for r in every_row if r["device"] == "mzi"}
    assert list(rows) == [
        "paper",
        "M50",
        "M50+every2",
        "every4+reuse_sketch",
        "query_efficient",
    ]
    assert rows["query_efficient"]["query_ratio"] == pytest.approx(0.09)
    assert rows["query_efficient"]["difference"] == pytest.approx(0.03)
    mrr = {r["variant"]: r for r in every_row if r["device"] == "mrr"}
    assert list(mrr) == ["paper", "r4"] and mrr["r4"]["difference"] == pytest.approx(0.01)
    assert rows["M50"]["seeds"] == 1 and rows["M50"]["query_ratio"] == pytest.approx(0.5)
    assert rows["M50"]["difference"] == pytest.approx(-0.10)
    assert rows["every4+reuse_sketch"]["query_ratio"] == pytest.approx(0.6)
    table = (tmp_path / "query_study.md").read_text()
    assert "| M50+every2 | 2 | 91.00 ± 0.71 | 250 | 0.250 | +0.00 ± 0.50 |" in table  # paired +0.5, −0.5 pt
    assert "**digits** (device=mrr)" in table
    assert "| paper | 2 | 91.00 ± 1.41 | 1,000 | 1.000 | +0.00 ± 0.00 |" in table
    assert (tmp_path / "query_study.png").stat().st_size > 0 and (tmp_path / "query_study.csv").is_file()
    assert query.main([str(tmp_path / "empty")]) == 2


def sweep(tmp_path: Path, *overrides: str) -> Path:
    """A two-job multirun with the joblib launcher, a few batches each; returns the sweep folder."""
    out = tmp_path / "sweep"
    tiny = [
        "trainer.max_epochs=1",
        "trainer.limit_train_batches=2",
        "trainer.limit_val_batches=1",
        "trainer.limit_test_batches=1",
        "callbacks=none",
        "trainer.enable_progress_bar=false",
    ]
    cmd = [sys.executable, "train.py", "-m", *overrides, *tiny, "launcher=joblib", f"hydra.sweep.dir={out}"]
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert len(list(out.glob("*/summary.json"))) == 2
    return out


@pytest.mark.slow
def test_parity_multirun_and_report(tmp_path):
    out = sweep(tmp_path, "experiment=study_parity", "device=digital,mzi", "mode=exact", "seed=0")
    assert load_script("parity_study").main([str(out)]) == 0
    table = (out / "parity.md").read_text()
    assert "### digits (test/acc" in table and table.count("| mzi | 0 |") == 1
    assert (out / "parity_digits.png").is_file()


@pytest.mark.slow
def test_query_multirun_and_report(tmp_path):
    out = sweep(tmp_path, "experiment=study_query", "zo.samples=100,50", "seed=0")
    assert load_script("query_study").main([str(out)]) == 0
    table = (out / "query_study.md").read_text()
    assert "| paper | 1 |" in table and "| M50 | 1 |" in table


def test_pareto_front_keeps_the_points_nothing_beats():
    from astraora.report.compare import pareto_front

    points = [(100, 0.9), (50, 0.85), (200, 0.88), (10, 0.5), (50, 0.80), (300, 0.95)]
    assert pareto_front(points, higher_is_better=True) == [(10, 0.5), (50, 0.85), (100, 0.9), (300, 0.95)]
    losses = [(100, 2.0), (50, 2.5), (200, 2.1), (400, 1.9)]
    assert pareto_front(losses, higher_is_better=False) == [(50, 2.5), (100, 2.0), (400, 1.9)]
