"""Checkpoint and resume: a crashed or killed run continues exactly where its checkpoint was taken."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import lightning as L
import pytest

from astraora.train import run
from conftest import REPO

RUN = ["trainer.max_epochs=3", "trainer.limit_train_batches=4", "trainer.limit_val_batches=2",
       "trainer.limit_test_batches=2", "trainer.enable_progress_bar=false", "trainer.enable_model_summary=false",
       "trainer.deterministic=true", "trainer.log_every_n_steps=1", "callbacks.checkpoint.every_n_train_steps=3",
       "callbacks.diagnostics.every_n_steps=2", "zo.samples=8", "integrator.samples=8", "task.model.hidden=16",
       "surrogate.rank=4"]


class Crash(L.Callback):
    """Stops the process's training abruptly after the given step (no checkpoint is written)."""

    def __init__(self, step: int):
        self.step = step

    def on_train_batch_end(self, trainer, *args) -> None:
        if trainer.global_step == self.step:
            raise RuntimeError("simulated crash")


def comparable(summary: dict) -> dict:
    return {k: v for k, v in summary.items() if k not in ("wall_seconds", "run_dir")}


def test_resume_after_crash_equals_uninterrupted(make_cfg):
    reference = run(make_cfg(*RUN, out="reference"))
    crashed_cfg = make_cfg(*RUN, out="crashed")
    with pytest.raises(RuntimeError, match="simulated crash"):
        run(crashed_cfg, callbacks=[Crash(step=7)])
    crashed = Path(crashed_cfg.paths.output_dir)
    assert json.loads((crashed / "summary.json").read_text())["status"] == "failed"
    resumed = run(make_cfg(*RUN, f"resume={crashed}", out="elsewhere"))
    assert resumed["run_dir"] == str(crashed)  # the run keeps its output directory
    assert comparable(resumed) == comparable(reference)
    ref_rows = (Path(reference["run_dir"]) / "metrics.csv").read_text()
    assert (crashed / "metrics.csv").read_text() == ref_rows


def assert_mid_epoch_resume_is_exact(make_cfg, overrides: list[str]) -> None:
    """A run crashed at step 7 (last checkpoint: step 6, mid-epoch) and resumed ends exactly like
    the uninterrupted run: summary metrics and every metrics.csv row."""
    reference = run(make_cfg(*overrides, out="reference"))
    crashed_cfg = make_cfg(*overrides, out="crashed")
    with pytest.raises(RuntimeError, match="simulated crash"):
        run(crashed_cfg, callbacks=[Crash(step=7)])
    crashed = Path(crashed_cfg.paths.output_dir)
    resumed = run(make_cfg(*overrides, f"resume={crashed}", out="elsewhere"))
    assert comparable(resumed) == comparable(reference)
    assert (crashed / "metrics.csv").read_text() == (Path(reference["run_dir"]) / "metrics.csv").read_text()


def test_mid_epoch_resume_with_dropout_equals_uninterrupted(make_cfg):
    """Dropout draws from torch's global generator: a resume from a mid-epoch checkpoint (step 6
    of 4-batch epochs) gives the next batch the masks the uninterrupted run drew."""
    tiny = ["task=pydoc_text", "task.model.dropout=0.2", "task.model.n_layer=1", "task.model.n_embd=32",
            "task.model.n_head=2", "task.model.block_size=16", "task.datamodule.samples_per_epoch=256",
            "task.generate.max_new_tokens=5", *RUN[:-2], "surrogate.rank=4"]
    assert_mid_epoch_resume_is_exact(make_cfg, tiny)


def test_resume_from_epoch_checkpoint_file(make_cfg):
    reference = run(make_cfg(*RUN, out="reference"))
    crashed_cfg = make_cfg(*RUN, out="crashed")
    with pytest.raises(RuntimeError):
        run(crashed_cfg, callbacks=[Crash(step=9)])
    ckpt = Path(crashed_cfg.paths.output_dir) / "checkpoints" / "epoch1.ckpt"
    assert ckpt.is_file()
    resumed = run(make_cfg(*RUN, f"resume={ckpt}", out="elsewhere"))
    assert comparable(resumed) == comparable(reference)


@pytest.mark.slow
def test_sigkill_mid_epoch_then_resume(tmp_path):
    args = [*RUN, "trainer.max_epochs=4", "trainer.limit_train_batches=6"]
    env = {**os.environ, "PYTHONPATH": str(REPO), "WANDB_MODE": "offline"}
    train = [sys.executable, str(REPO / "train.py")]
    ref_dir, run_dir = tmp_path / "reference", tmp_path / "killed"
    subprocess.run([*train, *args, f"hydra.run.dir={ref_dir}"], env=env, check=True, capture_output=True, timeout=600)
    proc = subprocess.Popen([*train, *args, f"hydra.run.dir={run_dir}"], env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    deadline = time.time() + 300
    def saved_steps():
        return [int(p.stem[4:]) for p in (run_dir / "checkpoints").glob("step*.ckpt")]

    while not any(step >= 9 for step in saved_steps()) and time.time() < deadline and proc.poll() is None:
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL, "the run finished before it could be killed"
    assert not (run_dir / "summary.json").exists()
    resumed = subprocess.run([*train, *args, f"resume={run_dir}", f"hydra.run.dir={tmp_path / 'new'}"], env=env,
                             capture_output=True, text=True, timeout=600)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert not (tmp_path / "new").exists() and "resuming from" in (run_dir / "train.log").read_text()
    ref, got = (json.loads((d / "summary.json").read_text()) for d in (ref_dir, run_dir))
    assert got["status"] == "completed"
    assert comparable(got) | {"run_dir": None} == comparable(ref) | {"run_dir": None}
    assert (run_dir / "metrics.csv").read_text() == (ref_dir / "metrics.csv").read_text()


def test_resume_keeps_the_wandb_run_id(make_cfg, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    args = [*RUN, "logger=wandb", "trainer.max_epochs=2"]
    crashed_cfg = make_cfg(*args, out="crashed")
    with pytest.raises(RuntimeError):
        run(crashed_cfg, callbacks=[Crash(step=5)])
    out = Path(crashed_cfg.paths.output_dir)
    run_id = (out / "wandb_id.txt").read_text().strip()
    summary = run(make_cfg(*args, f"resume={out}", out="elsewhere"))
    assert summary["status"] == "completed"
    runs = sorted((out / "wandb").glob("offline-run-*"))
    assert len(runs) == 2 and all(f"-{run_id}" in r.name for r in runs)  # W&B adds "-1" within one second


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_ctrl_c_or_sigterm_still_writes_summary(tmp_path, sig):
    run_dir = tmp_path / "run"
    env = {**os.environ, "PYTHONPATH": str(REPO), "WANDB_MODE": "offline"}
    proc = subprocess.Popen([sys.executable, str(REPO / "train.py"), *RUN, "trainer.max_epochs=50",
                             f"hydra.run.dir={run_dir}"], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 300
    while not list((run_dir / "checkpoints").glob("step*.ckpt")) and time.time() < deadline and proc.poll() is None:
        time.sleep(0.05)
    proc.send_signal(sig)
    assert proc.wait(timeout=120) != 0
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["status"] == "interrupted" and summary["steps"] >= 3


@pytest.mark.parametrize("workers", [0, 2])
def test_mid_epoch_resume_with_augmentation_equals_uninterrupted(make_cfg, workers):
    """Training items are augmented (SpecAugment masks) as the loader fetches them, a batch ahead of
    the step and, with workers, in other processes: a resume from a mid-epoch checkpoint (step 6 of
    4-batch epochs) gives every later item the augmentation the uninterrupted run drew."""
    tiny = ["task=synthetic_audio", f"task.datamodule.num_workers={workers}", "task.datamodule.clips_per_class=24", "task.datamodule.batch_size=8",
            "task.datamodule.n_mels=16", "task.model.channels=8", "task.model.embedding_dim=8",
            "task.model.attention_channels=8", *RUN[:-2], "surrogate.rank=4"]
    assert_mid_epoch_resume_is_exact(make_cfg, tiny)
