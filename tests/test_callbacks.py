"""A run's callbacks (astraora.callbacks): which ones a config gives, the state a checkpoint carries for an
exact resume, the step checkpoint that skips an epoch's last batch, and SIGTERM in the middle of a step.
The resumes they make exact, end to end: tests/test_resume.py."""

from __future__ import annotations

import os
import random
import signal
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from conftest import compose_config
from lightning.pytorch.callbacks import EarlyStopping, ModelCheckpoint
from lightning.pytorch.utilities.exceptions import SIGTERMException

from astraora.callbacks import ResumeStateCallback, StepCheckpoint, make_callbacks, stop_on_sigterm, uses_ddp
from astraora.checkpoints import CHECKPOINT_FORMAT, CHECKPOINT_META
from astraora.lit.faults import StopTogether


def test_make_callbacks_follows_the_callbacks_group(tmp_path):
    default = make_callbacks(compose_config([]), tmp_path)
    assert [type(c) for c in default] == [ResumeStateCallback, StepCheckpoint, ModelCheckpoint]
    step, epoch = default[1:]
    assert step._every_n_train_steps == 200 and epoch._every_n_epochs == 1
    assert step.dirpath == epoch.dirpath == str(tmp_path / "checkpoints") and step.save_last and epoch.save_last
    assert default[0].meta == {"task": "digits", "device": "mzi", "mode": "zo+sm"}
    none = make_callbacks(compose_config(["callbacks=none"]), tmp_path)
    assert [type(c) for c in none] == [ResumeStateCallback]
    stopping = make_callbacks(
        compose_config(["callbacks.early_stopping={monitor: val/acc, mode: max, patience: 2}"]), tmp_path
    )
    assert isinstance(stopping[-1], EarlyStopping) and stopping[-1].patience == 2
    ddp = compose_config(["trainer=ddp_cpu"])
    assert uses_ddp(ddp) and not uses_ddp(compose_config([]))
    assert [type(c) for c in make_callbacks(ddp, tmp_path)][:2] == [ResumeStateCallback, StopTogether]


def fake_trainer(**progress) -> SimpleNamespace:
    """The few trainer attributes the callbacks read, outside a fit."""
    current = SimpleNamespace(processed=0, completed=0)
    batch_progress = SimpleNamespace(current=current, **progress)
    return SimpleNamespace(
        loggers=[],
        training=False,
        fit_loop=SimpleNamespace(epoch_loop=SimpleNamespace(batch_progress=batch_progress)),
        _logger_connector=SimpleNamespace(should_update_logs=False),
        world_size=1,
        global_rank=0,
    )


def draws() -> tuple:
    return torch.rand(3), np.random.rand(3), random.random()


def test_a_checkpoint_carries_the_generators_and_what_the_run_trains():
    callback = ResumeStateCallback({"task": "digits", "device": "mzi", "mode": "zo+sm"})
    torch.manual_seed(1)
    np.random.seed(1)
    random.seed(1)
    checkpoint = {}
    callback.on_save_checkpoint(fake_trainer(), None, checkpoint)
    expected = draws()
    assert checkpoint[CHECKPOINT_META] == {
        "format": CHECKPOINT_FORMAT,
        "task": "digits",
        "device": "mzi",
        "mode": "zo+sm",
    }
    assert "pending_log_row" not in checkpoint  # outside training no row is pending
    draws()  # the generators move on

    # an epoch-end checkpoint: the states are set when it loads
    callback.on_load_checkpoint(fake_trainer(), None, checkpoint)
    again = draws()
    assert torch.equal(again[0], expected[0]) and np.array_equal(again[1], expected[1]) and again[2] == expected[2]

    # a mid-epoch checkpoint: set when the next batch starts, after the loaders drew their seeds
    mid_epoch = {**checkpoint, "loops": {"fit_loop": {"epoch_loop.batch_progress": {"is_last_batch": False}}}}
    callback.on_load_checkpoint(fake_trainer(), None, mid_epoch)
    draws()
    callback.on_train_batch_start(fake_trainer(), None, None, 0)
    again = draws()
    assert torch.equal(again[0], expected[0]) and again[2] == expected[2]


def test_the_step_checkpoint_skips_an_epochs_last_batch(monkeypatch):
    saved = []
    monkeypatch.setattr(ModelCheckpoint, "on_train_batch_end", lambda self, *args: saved.append(args[-1]))
    callback = StepCheckpoint(every_n_train_steps=1)
    callback.on_train_batch_end(fake_trainer(is_last_batch=False), None, None, None, 3)
    callback.on_train_batch_end(fake_trainer(is_last_batch=True), None, None, None, 4)
    assert saved == [3]


def test_sigterm_raises_inside_the_run_and_the_handler_is_restored():
    before = signal.getsignal(signal.SIGTERM)
    with pytest.raises(SIGTERMException), stop_on_sigterm():
        os.kill(os.getpid(), signal.SIGTERM)
        for _ in range(10**7):  # the handler runs between bytecodes, right after the signal arrives
            pass
    assert signal.getsignal(signal.SIGTERM) is before
