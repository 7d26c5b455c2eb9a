"""The Lightning callbacks of a run (:func:`make_callbacks`): the state a resume needs beyond Lightning's,
the step and epoch checkpoints, early stopping, and the data-parallel processes stopping together."""

from __future__ import annotations

import contextlib
import random
import signal
import threading
import warnings
from pathlib import Path

import lightning as L
import numpy as np
import torch
from lightning.fabric.utilities.apply_func import convert_tensors_to_scalars
from omegaconf import DictConfig

from astraora.checkpoints import CHECKPOINT_FORMAT, CHECKPOINT_META, run_meta
from astraora.lit.faults import StopTogether

# A step checkpoint holds the state after that step's update, which is what resuming needs.
warnings.filterwarnings("ignore", message="Using ModelCheckpoint with manual optimization")
# A resumed run writes into its own checkpoints/ folder again, as it should.
warnings.filterwarnings("ignore", message=r"Checkpoint directory .* exists and is not empty")


class ResumeStateCallback(L.Callback):
    """What a checkpoint needs beyond Lightning's own state, so a resumed run continues exactly.

    * the global RNG states (dropout, augmentation), stored as plain tensors and lists so that
      checkpoints load with ``weights_only=True``;
    * the CSV log is flushed whenever a checkpoint is written, so metrics.csv holds every row up to
      the checkpoint (rows after it are dropped on resume and logged again);
    * ``meta``: the checkpoint format and what the run trains (see :data:`CHECKPOINT_META`).
    """

    def __init__(self, meta: dict | None = None):
        self.meta = dict(meta or {})

    def on_save_checkpoint(self, trainer, pl_module, checkpoint) -> None:
        checkpoint[CHECKPOINT_META] = {"format": CHECKPOINT_FORMAT, **self.meta}
        kind, keys, pos, has_gauss, gauss = np.random.get_state()
        checkpoint["rng_states"] = {
            "torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
            "numpy": [kind, torch.from_numpy(keys.astype(np.int64)), pos, has_gauss, gauss],
            "python": [random.getstate()[0], list(random.getstate()[1]), random.getstate()[2]],
        }
        for lg in trainer.loggers:
            lg.save()
        # A step checkpoint is written before Lightning logs that step's row: keep the row in it, for
        # a run killed between the two (see astraora.rundir.truncate_metrics).
        progress, connector = trainer.fit_loop.epoch_loop.batch_progress.current, trainer._logger_connector
        if trainer.training and progress.processed > progress.completed and connector.should_update_logs:
            row = {k: float(v) for k, v in convert_tensors_to_scalars(connector.metrics["log"]).items()}
            if row:
                checkpoint["pending_log_row"] = {
                    **row,
                    "epoch": trainer.current_epoch,
                    "step": trainer.fit_loop.epoch_loop._batches_that_stepped,
                }

    def on_load_checkpoint(self, trainer, pl_module, checkpoint) -> None:
        states = checkpoint.get("rng_states")
        per_rank = checkpoint.get("per_rank")  # DDP: every process's own generators (astraora.lit)
        if per_rank and trainer.world_size == len(per_rank) and per_rank[trainer.global_rank].get("rng_states"):
            states = per_rank[trainer.global_rank]["rng_states"]
        if not states:
            return
        progress = checkpoint.get("loops", {}).get("fit_loop", {}).get("epoch_loop.batch_progress", {})
        if not progress.get("is_last_batch", True):
            # Taken in the middle of an epoch: the uninterrupted run went on to the next batch
            # without drawing from the generators, whereas the resumed run first starts the epoch's
            # loaders (each DataLoader iterator draws a seed from torch's generator): the states
            # are set when that batch starts, so its dropout masks are the uninterrupted run's.
            self._pending = states
            return
        self._set_states(states)

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        states, self._pending = getattr(self, "_pending", None), None
        if states is not None:
            self._set_states(states)

    @staticmethod
    def _set_states(states: dict) -> None:
        torch.set_rng_state(states["torch"])
        if states["cuda"] and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(states["cuda"])
        kind, keys, pos, has_gauss, gauss = states["numpy"]
        np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, gauss))
        version, internal, gauss_next = states["python"]
        random.setstate((version, tuple(internal), gauss_next))


class StepCheckpoint(L.pytorch.callbacks.ModelCheckpoint):
    """The every-N-steps checkpoint, except at an epoch's last batch: the epoch's own checkpoint follows
    its validation there. A step checkpoint at that batch would be one Lightning resumes as a finished
    epoch whose validation never ran (a run stopped during it would skip that validation and its
    queries on resume); without it, such a run resumes from the step checkpoint before and redoes the
    epoch's last steps, exactly."""

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if trainer.fit_loop.epoch_loop.batch_progress.is_last_batch:
            return
        super().on_train_batch_end(trainer, pl_module, outputs, batch, batch_idx)


def uses_ddp(cfg: DictConfig) -> bool:
    """Whether the trainer runs data-parallel processes (``trainer=ddp`` or ``ddp_cpu``)."""
    return "ddp" in str(cfg.trainer.get("strategy", ""))


def make_callbacks(cfg: DictConfig, output_dir: Path) -> list[L.Callback]:
    """The run's callbacks, as ``callbacks`` (conf/callbacks) configures them; checkpoints go to
    ``output_dir/checkpoints``."""
    callbacks: list[L.Callback] = [ResumeStateCallback(run_meta(cfg))]
    if uses_ddp(cfg):
        callbacks.append(StopTogether())
    ckpt = cfg.callbacks.get("checkpoint")
    if ckpt:
        from lightning.pytorch.callbacks import ModelCheckpoint

        dirpath = output_dir / "checkpoints"
        # one callback saves every N steps, one at every epoch end; both refresh the same last.ckpt
        common = dict(
            dirpath=dirpath,
            auto_insert_metric_name=False,
            save_top_k=1,
            save_last=ckpt.save_last,
            enable_version_counter=False,
        )
        callbacks.append(StepCheckpoint(filename="step{step}", every_n_train_steps=ckpt.every_n_train_steps, **common))
        callbacks.append(
            ModelCheckpoint(filename="epoch{epoch}", every_n_epochs=1, save_on_train_epoch_end=True, **common)
        )
    stop = cfg.callbacks.get("early_stopping")
    if stop:
        from lightning.pytorch.callbacks import EarlyStopping

        callbacks.append(EarlyStopping(**stop))
    return callbacks


@contextlib.contextmanager
def stop_on_sigterm():
    """SIGTERM stops the run at once, not at the end of the step (a step at a large M takes minutes).

    Lightning's own handler only sets a flag that its loops read between steps; this one, which
    Lightning calls after its own, raises its SIGTERM exception wherever the run is. Nothing is
    checkpointed from the middle of a step: the last checkpoint on disk stays the one to resume."""
    from lightning.pytorch.utilities.exceptions import SIGTERMException

    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def handler(signum, frame):
        raise SIGTERMException()

    previous = signal.signal(signal.SIGTERM, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)
