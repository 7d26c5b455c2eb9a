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
import torch
from conftest import REPO, RESUMABLE, TINY_MODEL

from astraora.errors import AstraoraError, DeviceFailure, DeviceFault
from astraora.train import run

SHORT = [*RESUMABLE, "callbacks.diagnostics.every_n_steps=2"]  # any task
RUN = [*SHORT, *TINY_MODEL]


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


@pytest.mark.slow
def test_mid_epoch_resume_with_dropout_equals_uninterrupted(make_cfg):
    """Dropout draws from torch's global generator: a resume from a mid-epoch checkpoint (step 6
    of 4-batch epochs) gives the next batch the masks the uninterrupted run drew."""
    tiny = [
        "task=pydoc_text",
        "task.model.dropout=0.2",
        "task.model.n_layer=1",
        "task.model.n_embd=32",
        "task.model.n_head=2",
        "task.model.block_size=16",
        "task.datamodule.samples_per_epoch=256",
        "task.generate.max_new_tokens=5",
        *SHORT,
        "surrogate.rank=4",
    ]
    assert_mid_epoch_resume_is_exact(make_cfg, tiny)


@pytest.mark.slow
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
    proc = subprocess.Popen(
        [*train, *args, f"hydra.run.dir={run_dir}"], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    deadline = time.time() + 300

    def saved_steps():
        return [int(p.stem[4:]) for p in (run_dir / "checkpoints").glob("step*.ckpt")]

    while not any(step >= 9 for step in saved_steps()) and time.time() < deadline and proc.poll() is None:
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL, "the run finished before it could be killed"
    assert not (run_dir / "summary.json").exists()
    resumed = subprocess.run(
        [*train, *args, f"resume={run_dir}", f"hydra.run.dir={tmp_path / 'new'}"],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert not (tmp_path / "new").exists() and "resuming from" in (run_dir / "train.log").read_text()
    ref, got = (json.loads((d / "summary.json").read_text()) for d in (ref_dir, run_dir))
    assert got["status"] == "completed"
    assert comparable(got) | {"run_dir": None} == comparable(ref) | {"run_dir": None}
    assert (run_dir / "metrics.csv").read_text() == (ref_dir / "metrics.csv").read_text()


@pytest.mark.slow
@pytest.mark.parametrize("how", ["new_run", "same"])
def test_a_resumed_run_continues_its_wandb_history_without_holes(make_cfg, monkeypatch, how):
    """W&B keeps a run's rows in the order they were logged, so steps replayed after a resume would
    vanish from the old run: by default the resume is a new run of the same group whose history
    starts at the checkpoint and says what it resumes; ``same`` continues the old run."""
    monkeypatch.setenv("WANDB_MODE", "offline")
    args = [*RUN, "logger=wandb", "trainer.max_epochs=2", f"logger.wandb.resume={how}"]
    crashed_cfg = make_cfg(*args, out="crashed")
    with pytest.raises(RuntimeError):
        run(crashed_cfg, callbacks=[Crash(step=5)])
    out = Path(crashed_cfg.paths.output_dir)
    run_id = (out / "wandb_id.txt").read_text().strip()
    summary = run(make_cfg(*args, f"resume={out}", out="elsewhere"))
    assert summary["status"] == "completed"
    runs = sorted((out / "wandb").glob("offline-run-*"))
    new_id = (out / "wandb_id.txt").read_text().strip()
    assert len(runs) == 2
    if how == "same":
        assert new_id == run_id and all(f"-{run_id}" in r.name for r in runs)  # W&B adds "-1" within one second
        return
    assert new_id != run_id and sum(f"-{new_id}" in r.name for r in runs) == 1
    resumed_run = next(r for r in runs if f"-{new_id}" in r.name)
    record_file, deadline = resumed_run / f"run-{new_id}.wandb", time.time() + 30
    while b"resumed_from" not in record_file.read_bytes() and time.time() < deadline:
        time.sleep(0.2)  # W&B's service writes the offline records behind the run
    record = record_file.read_bytes()  # offline: config and tags in the run's records
    assert b"resumed_from" in record and run_id.encode() in record and b"resumed" in record


def test_an_unknown_wandb_resume_mode_is_refused(make_cfg):
    with pytest.raises(AstraoraError, match=r"logger.wandb.resume='fork' is not allowed; choose one of"):
        run(make_cfg(*RUN, "logger=wandb", "logger.wandb.resume=fork"))


@pytest.mark.slow
@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_ctrl_c_or_sigterm_still_writes_summary(tmp_path, sig):
    """The run cannot end before the signal (10^5 epochs), which is sent once a checkpoint exists;
    SIGTERM stops it in the middle of a step (a large M), not at the step's end."""
    run_dir = tmp_path / "run"
    env = {**os.environ, "PYTHONPATH": str(REPO), "WANDB_MODE": "offline"}
    proc = subprocess.Popen(
        [sys.executable, str(REPO / "train.py"), *RUN, "trainer.max_epochs=100000", f"hydra.run.dir={run_dir}"],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    deadline = time.time() + 300
    while not list((run_dir / "checkpoints").glob("step*.ckpt")) and time.time() < deadline and proc.poll() is None:
        time.sleep(0.05)
    assert proc.poll() is None, "the run stopped before it was signalled"
    proc.send_signal(sig)
    assert proc.wait(timeout=120) != 0
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["status"] == "interrupted" and summary["steps"] >= 3


@pytest.mark.slow
def test_sigterm_stops_a_long_step_at_once(tmp_path):
    """A step at M = 10^6 directions takes minutes; SIGTERM ends the run within seconds of arriving,
    with summary.json saying interrupted (nothing is checkpointed from the middle of the step)."""
    run_dir = tmp_path / "run"
    env = {**os.environ, "PYTHONPATH": str(REPO), "WANDB_MODE": "offline"}
    proc = subprocess.Popen(
        [sys.executable, str(REPO / "train.py"), *RUN, "zo.samples=1000000", f"hydra.run.dir={run_dir}"],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    deadline = time.time() + 120
    log = run_dir / "train.log"
    while not (log.exists() and "TPU available" in log.read_text(errors="replace")):  # the trainer is built
        assert time.time() < deadline and proc.poll() is None, "the run did not start training"
        time.sleep(0.1)
    time.sleep(3)  # inside the first step's estimate
    proc.send_signal(signal.SIGTERM)
    sent = time.time()
    proc.wait(timeout=120)
    assert time.time() - sent < 30, "SIGTERM waited for the step to end"
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["status"] == "interrupted" and summary["steps"] == 0
    assert not (run_dir / "checkpoints").exists() or not list((run_dir / "checkpoints").glob("*.ckpt"))


def test_resuming_a_finished_run_says_so_and_changes_nothing(make_cfg, caplog):
    cfg = make_cfg(*RUN, "trainer.max_epochs=2", out="finished")
    first = run(cfg)
    out = Path(first["run_dir"])
    rows = (out / "metrics.csv").read_text()
    with caplog.at_level("INFO", logger="astraora"):
        again = run(make_cfg(*RUN, "trainer.max_epochs=2", f"resume={out}", out="elsewhere"))
    assert again == json.loads((out / "summary.json").read_text()) and comparable(again) == comparable(first)
    assert "already finished" in caplog.text and "trainer.max_epochs" in caplog.text
    assert (out / "metrics.csv").read_text() == rows


def test_resuming_after_a_failure_in_the_test_loop_tests_again(make_cfg):
    """Training ended (its last checkpoint is at the end), the test loop failed: a resume trains
    nothing and tests again, in a fresh process's order: evaluation first, under inference mode,
    whose cached buffers the diagnostics then reuse outside it."""
    reference = run(make_cfg(*RUN, "trainer.max_epochs=2", out="reference"))
    cfg = make_cfg(*RUN, "trainer.max_epochs=2", out="failed")

    class FailInTest(L.Callback):
        def on_test_batch_start(self, *args) -> None:
            raise DeviceFailure("device 'head.physical': a forward query failed 4 times")

    with pytest.raises(DeviceFailure, match="continues exactly from the checkpoint at step 8"):
        run(cfg, callbacks=[FailInTest()])
    out = Path(cfg.paths.output_dir)
    assert json.loads((out / "summary.json").read_text())["status"] == "device_failure"
    resumed = run(make_cfg(*RUN, "trainer.max_epochs=2", f"resume={out}", out="elsewhere"))
    assert comparable(resumed) | {"wall_seconds": None} == comparable(reference) | {"wall_seconds": None}


class FailMidStep(L.Callback):
    """From step ``step`` on, every ZO query of the physical layer raises DeviceFault: the step's
    forward queries have been made and counted, the estimate fails (the ledger's retries too)."""

    def __init__(self, step: int):
        self.step = step

    def on_train_batch_start(self, trainer, pl_module, *args) -> None:
        if trainer.global_step != self.step:
            return
        device = pl_module.model.head.physical.device
        query = device.query

        def failing(x, theta=None, *, purpose="forward"):
            if purpose == "zo":
                raise DeviceFault("injected: the chip stopped answering")
            return query(x, theta, purpose=purpose)

        device.query = failing


@pytest.mark.slow
def test_device_failure_mid_step_then_resume_equals_uninterrupted(make_cfg):
    """A device that fails in the middle of step 7 (last checkpoint: step 6, noisy device): the run
    stops with a DeviceFailure and writes no checkpoint of the half-done step; resumed, it ends
    equal to the uninterrupted run: steps, every metrics.csv row, test metrics, queries by purpose
    and reprograms (the forward queries of the failed step are counted once)."""
    noisy = [*RUN, "device.nonideal.output_noise=0.01"]
    reference = run(make_cfg(*noisy, out="reference"))
    cfg = make_cfg(*noisy, out="failed")
    with pytest.raises(DeviceFailure, match="continues exactly from the checkpoint at step 6"):
        run(cfg, callbacks=[FailMidStep(step=7)])
    out = Path(cfg.paths.output_dir)
    failed = json.loads((out / "summary.json").read_text())
    assert failed["status"] == "device_failure" and failed["steps"] == 7
    assert torch.load(out / "checkpoints" / "last.ckpt", weights_only=True)["global_step"] == 6
    resumed = run(make_cfg(*noisy, f"resume={out}", out="elsewhere"))
    assert comparable(resumed) == comparable(reference)
    assert (out / "metrics.csv").read_text() == (Path(reference["run_dir"]) / "metrics.csv").read_text()


@pytest.mark.slow
@pytest.mark.parametrize("workers", [0, 2])
def test_mid_epoch_resume_with_augmentation_equals_uninterrupted(make_cfg, workers):
    """Training items are augmented (SpecAugment masks) as the loader fetches them, a batch ahead of
    the step and, with workers, in other processes: a resume from a mid-epoch checkpoint (step 6 of
    4-batch epochs) gives every later item the augmentation the uninterrupted run drew."""
    tiny = [
        "task=synthetic_audio",
        f"task.datamodule.num_workers={workers}",
        "task.datamodule.clips_per_class=24",
        "task.datamodule.batch_size=8",
        "task.datamodule.n_mels=16",
        "task.model.channels=8",
        "task.model.embedding_dim=8",
        "task.model.attention_channels=8",
        *SHORT,
        "surrogate.rank=4",
    ]
    assert_mid_epoch_resume_is_exact(make_cfg, tiny)


def test_an_mzi_classical_checkpoint_of_the_old_phase_order_is_refused(make_cfg, tmp_path):
    """Format 1 stored mzi_classical's cell phases as (θ, φ): the same numbers would now be another
    device, so such a checkpoint is refused in one line instead of resumed silently wrong."""
    args = [*RUN, "device=mzi_classical", "trainer.max_epochs=1"]
    first = run(make_cfg(*args, out="old"))
    ckpt = Path(first["run_dir"]) / "checkpoints" / "last.ckpt"
    state = torch.load(ckpt, weights_only=True)
    state["astraora"]["format"] = 1
    torch.save(state, ckpt)
    with pytest.raises(AstraoraError, match=r"stores mzi_classical's cell phases in the order of format 1"):
        run(make_cfg(*args, f"resume={first['run_dir']}", out="elsewhere"))


class CrashInValidation(L.Callback):
    """Stops the process during the validation that ends the epoch whose last step is ``step``."""

    def __init__(self, step: int):
        self.step = step

    def on_validation_start(self, trainer, *args) -> None:
        if trainer.global_step == self.step and not trainer.sanity_checking:
            raise RuntimeError("simulated crash")


@pytest.mark.slow
def test_a_run_stopped_during_an_epochs_validation_resumes_exactly(make_cfg):
    """Steps 4 and 8 are the last batches of their epochs and multiples of every_n_train_steps: no step
    checkpoint is written there (the epoch's follows its validation), so a run stopped during that
    validation resumes from step 2 and redoes steps 3-4 and the validation, instead of resuming as if
    the epoch had ended (its validation and queries would be missing)."""
    args = [*RUN, "callbacks.checkpoint.every_n_train_steps=2"]
    reference = run(make_cfg(*args, out="reference"))
    crashed_cfg = make_cfg(*args, out="crashed")
    with pytest.raises(RuntimeError, match="simulated crash"):
        run(crashed_cfg, callbacks=[CrashInValidation(step=4)])
    crashed = Path(crashed_cfg.paths.output_dir)
    assert sorted(p.name for p in (crashed / "checkpoints").glob("*.ckpt")) == ["last.ckpt", "step2.ckpt"]
    resumed = run(make_cfg(*args, f"resume={crashed}", out="elsewhere"))
    assert comparable(resumed) == comparable(reference)
    assert (crashed / "metrics.csv").read_text() == (Path(reference["run_dir"]) / "metrics.csv").read_text()
