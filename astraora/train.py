"""Entry point: ``python train.py [overrides]`` (Hydra) around a plain :func:`run` that tests call.

``run(cfg)`` validates the config, builds data, model and trainer, trains, tests, and always
writes ``summary.json`` into the run directory, also when the run stops early.
"""

from __future__ import annotations

import contextlib
import csv
import json
import logging
import os
import random
import shutil
import signal
import sys
import threading
import time
import warnings
from pathlib import Path

import hydra
import lightning as L
import numpy as np
import torch
from lightning.fabric.utilities.apply_func import convert_tensors_to_scalars
from lightning.pytorch.utilities.rank_zero import rank_zero_only
from omegaconf import DictConfig, OmegaConf

from astraora.build import build_model, hybrid_layers, instantiate
from astraora.checkpoints import CHECKPOINT_FORMAT, CHECKPOINT_META, read_checkpoint, run_meta  # noqa: F401
from astraora.cli import CONFIG_DIR, check_group_overrides  # noqa: F401 - CONFIG_DIR and the check are used by scripts
from astraora.config import validate
from astraora.errors import AstraoraError, DeviceFailure
from astraora.lit import ClassificationModule, LanguageModelModule
from astraora.lit.faults import StopTogether, peer_failure, summary_status
from astraora.logs import LOG_FILE, log_into, route_library_logs
from astraora.preflight import check_memory, check_trainer

log = logging.getLogger("astraora")
# A step checkpoint holds the state after that step's update, which is what resuming needs.
warnings.filterwarnings("ignore", message="Using ModelCheckpoint with manual optimization")
# A resumed run writes into its own checkpoints/ folder again, as it should.
warnings.filterwarnings("ignore", message=r"Checkpoint directory .* exists and is not empty")
# torch deprecated an API Lightning still uses; nothing a user can act on
warnings.filterwarnings("ignore", message=r".*isinstance\(treespec, LeafSpec\)")


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
        # a run killed between the two (see truncate_metrics).
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


def truncate_metrics(metrics_csv: Path, last_step: int, pending: dict | None = None) -> None:
    """Drop rows logged after the checkpoint we resume from (they will be logged again).

    Lightning logs a batch's metrics at the step count before that batch, so the first batch
    after a checkpoint taken at ``global_step`` = k logs at step k: rows with step >= k go.
    ``pending``: the row of step k − 1, which Lightning logs just after a step checkpoint is
    written; added if the run was killed before it reached the file."""
    if not metrics_csv.exists():
        return
    with open(metrics_csv, newline="") as f:
        reader = csv.DictReader(f)
        header, rows = reader.fieldnames, [r for r in reader if r["step"] == "" or int(r["step"]) < last_step]
    if pending:
        pending = {k: str(v) for k, v in pending.items()}
        if not any(all(r.get(k) == v for k, v in pending.items()) for r in rows):
            if not set(pending) <= set(header):
                header = sorted(set(header) | set(pending))
            rows.append(pending)
    with open(metrics_csv, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=header)
        writer.writeheader()
        writer.writerows(rows)


def last_logged(metrics_csv: Path, prefix: str) -> dict[str, float]:
    """The last value of every ``prefix`` column in metrics.csv (what the run reached before)."""
    if not metrics_csv.exists():
        return {}
    with open(metrics_csv, newline="") as f:
        rows = list(csv.DictReader(f))
    found: dict[str, float] = {}
    for row in rows:
        found.update({k: float(v) for k, v in row.items() if k.startswith(prefix) and v not in ("", None)})
    return found


def check_checkpoint_fits(module: L.LightningModule, state: dict, resume: str) -> None:
    """Every parameter of the configured model has the checkpoint's shape (else a config differs)."""
    saved = state["state_dict"]
    for name, param in module.named_parameters():
        shape = tuple(saved[name].shape) if name in saved else None
        if shape != tuple(param.shape):
            found = "missing" if shape is None else f"of shape {list(shape)}"
            raise AstraoraError(
                f"resume={resume}: the checkpoint's {name} is {found}, this config's is "
                f"{list(param.shape)}; resume with the overrides the run was started with."
            )


def csv_logger(output_dir: Path) -> L.pytorch.loggers.CSVLogger:
    """metrics.csv in the run directory; rows already there (a resumed run) are kept and continued."""
    metrics_csv = output_dir / "metrics.csv"
    previous = metrics_csv.read_text() if metrics_csv.exists() else None
    logger = L.pytorch.loggers.CSVLogger(save_dir=str(output_dir), name="", version="")
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Experiment logs directory")
        writer = logger.experiment  # Lightning's writer removes an existing metrics.csv here
    if previous:
        metrics_csv.write_text(previous)
        writer.metrics_keys = sorted(next(csv.reader(previous.splitlines())))
    return logger


def wandb_group(group: str) -> str:
    """The configured group; jobs of one multirun also share the sweep's directory name."""
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    if HydraConfig.initialized() and HydraConfig.get().mode == RunMode.MULTIRUN:
        return f"{group}/{Path(HydraConfig.get().sweep.dir).name}"
    return group


def comparison_setting(cfg: DictConfig) -> dict:
    """The few settings a dashboard colours and groups runs by; what does not apply is None
    (a digital run has no mode, rank or M; ``exact`` and ``zo=colored`` have no M; ``+exact`` modes
    no surrogate)."""
    if cfg.device.family == "digital":
        return {
            "task": cfg.task.name,
            "device": "digital",
            "mode": "digital",
            "rank": None,
            "M": None,
            "integrator": None,
            "hybrid": False,
            "seed": int(cfg.seed),
        }
    surrogate = str(cfg.mode).endswith("+sm")
    return {
        "task": cfg.task.name,
        "device": cfg.device.family,
        "mode": cfg.mode,
        "rank": (cfg.surrogate.rank if cfg.surrogate.rank == "auto" else int(cfg.surrogate.rank))
        if surrogate
        else None,
        "M": zo_samples(cfg) if str(cfg.mode).startswith("zo") else None,
        "integrator": cfg.integrator.name if surrogate else None,
        "hybrid": True,
        "seed": int(cfg.seed),
    }


def zo_samples(cfg: DictConfig) -> int | None:
    """M, the random directions per estimate; None for colored finite differences (none drawn)."""
    return None if cfg.zo.direction == "colored" else int(cfg.zo.samples)


def wandb_summary(summary: dict) -> dict:
    """summary.json flattened into W&B summary keys (metric names as logged)."""
    flat = dict(summary["metrics"])
    flat.update({f"queries/{purpose}": n for purpose, n in summary["queries"].items()})
    flat["reprograms"] = summary["reprograms"]
    for key, value in (summary["surrogate"] or {}).items():
        flat[f"surrogate/{key}"] = value
    flat.update({key: summary[key] for key in ("status", "steps", "epochs", "wall_seconds")})
    return flat


WANDB_RESUME = ("new_run", "same")


def check_wandb_resume(cfg: DictConfig) -> None:
    """``logger.wandb.resume`` names one of :data:`WANDB_RESUME` (checked before anything is written)."""
    spec = cfg.logger.get("wandb")
    if spec and spec.get("resume", "new_run") not in WANDB_RESUME:
        raise AstraoraError(
            f"logger.wandb.resume={spec.get('resume')!r} is not allowed; choose one of {list(WANDB_RESUME)}."
        )


def make_loggers(cfg: DictConfig, output_dir: Path, wandb_id: str | None, module=None, resumed_step: int | None = None):
    """metrics.csv, plus a W&B run when ``logger.wandb`` is set. A resume (``resumed_step``: the
    checkpoint's step) continues the W&B history as ``logger.wandb.resume`` says: ``new_run``, a new run
    in the same group whose history starts at the checkpoint (W&B keeps a run's history only in the
    order it was logged, so the replayed steps of a resumed run would vanish from the old one), with
    ``resumed_from`` in its config and the tag ``resumed``; ``same``, the old run continued (the
    steps replayed after the checkpoint are then missing from its history)."""
    loggers = [csv_logger(output_dir)]
    if cfg.logger.get("wandb"):
        from lightning.pytorch.loggers import WandbLogger

        class QueryAxisWandbLogger(WandbLogger):
            """Every W&B row also carries the cumulative ``queries/total``, so any metric (val/acc too,
            logged in rows of its own) can be plotted against it."""

            def __init__(self, **kwargs):
                super().__init__(**kwargs)
                self._wandb_init.pop("anonymous", None)  # Lightning passes it; W&B warns it is deprecated

            def log_metrics(self, metrics, step=None):
                if module is not None and "queries/total" not in metrics:
                    metrics = {
                        "queries/total": float(module.query_totals(collective=False).get("queries/total", 0)),
                        **metrics,
                    }
                super().log_metrics(metrics, step)

        spec = cfg.logger.wandb
        setting = comparison_setting(cfg)
        tags = [
            f"device:{setting['device']}",
            f"mode:{setting['mode']}",
            f"task:{cfg.task.name}",
            "hybrid" if setting["hybrid"] else "digital",
            *spec.tags,
        ]
        name = f"{cfg.task.name}-{setting['device']}-{setting['mode']}-s{cfg.seed}"
        if wandb_id and resumed_step is not None and spec.get("resume", "new_run") == "new_run":
            wandb_id, name, tags = None, f"{name}-resumed{resumed_step}", [*tags, "resumed"]
        loggers.append(
            QueryAxisWandbLogger(
                project=spec.project,
                entity=spec.entity,
                group=wandb_group(spec.group),
                tags=tags,
                save_dir=str(output_dir),
                offline=spec.mode != "online",
                mode=spec.mode if spec.mode == "disabled" else None,
                id=wandb_id,
                resume="allow" if wandb_id else None,
                log_model=spec.log_model,
                job_type=setting["mode"],
                name=name,
            )
        )
    return loggers


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


def make_callbacks(cfg: DictConfig, output_dir: Path) -> list[L.Callback]:
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


def reached_metrics(trainer: L.Trainer) -> dict[str, float]:
    """The latest val/ and test/ scalars the trainer holds."""
    return {
        k: float(v)
        for k, v in trainer.callback_metrics.items()
        if k.startswith(("val/", "test/")) and torch.as_tensor(v).numel() == 1
    }


def summarize(cfg: DictConfig, module, trainer, metrics: dict, status: str, started: float, output_dir: Path) -> dict:
    """The summary.json contract of DESIGN.md, from what the run reached."""
    queries = {p: 0 for p in ("forward", "zo", "surrogate", "readout", "total")}
    reprograms, surrogate = 0, None
    layers = hybrid_layers(module.model) if module is not None else {}
    if layers:
        # under DDP a collective: every process gets here together only when the run completed
        totals = module.query_totals(collective=status == "completed")
        queries = {p: totals[f"queries/{p}"] for p in queries}
        reprograms = totals["reprograms"]
        diag = module.diagnostics() if cfg.mode.endswith("+sm") else {}
        ranks = sorted({layer.surrogate.rank for layer in layers.values()})  # `auto`: per layer
        surrogate = {
            "rank": ranks[0] if len(ranks) == 1 else ranks,
            "rel_error": diag.get("surrogate/rel_error"),
            "rel_error_best_rank_r": diag.get("surrogate/rel_error_best_rank_r"),
        }
    distributed = {"distributed": module.distributed_info} if getattr(module, "distributed_info", None) else {}
    return {
        "task": cfg.task.name,
        "device": cfg.device.family,
        "mode": cfg.mode if layers else "digital",
        "seed": int(cfg.seed),
        "metrics": metrics,
        "queries": queries,
        "reprograms": reprograms,
        "surrogate": surrogate,
        "steps": int(trainer.global_step) if trainer is not None else 0,
        "epochs": int(trainer.current_epoch) if trainer is not None else 0,
        "wall_seconds": round(time.time() - started, 3),
        "status": status,
        "run_dir": str(output_dir),
        "config": {
            "surrogate": {"rank": cfg.surrogate.rank if cfg.surrogate.rank == "auto" else int(cfg.surrogate.rank)},
            "zo": {"samples": zo_samples(cfg), "direction": cfg.zo.direction, "two_sided": bool(cfg.zo.two_sided)},
            "integrator": {"name": cfg.integrator.name, "samples": cfg.integrator.get("samples")},
        },
        **distributed,
    }


def write_language_sample(cfg: DictConfig, module, dm, output_dir: Path) -> None:
    spec = cfg.task.get("generate")
    if not spec:
        return
    model = module.model.eval()
    prompt = torch.tensor([dm.encode(spec.prompt)], dtype=torch.long, device=module.device)
    gen = torch.Generator(device=module.device).manual_seed(int(cfg.seed))
    with torch.no_grad():
        out = model.generate(
            prompt, max_new_tokens=int(spec.max_new_tokens), temperature=float(spec.temperature), generator=gen
        )
    (output_dir / "samples.txt").write_text(dm.decode(out[0].tolist()) + "\n", encoding="utf-8")


def build_module(
    cfg: DictConfig, dm: L.LightningDataModule, model_kwargs: dict | None = None
) -> ClassificationModule | LanguageModelModule:
    """The task's backbone with its physical layer(s), inside the LightningModule of its kind.
    ``dm`` must be set up: it supplies what only the data knows (classes, vocabulary), unless
    ``model_kwargs`` is given."""
    model_kwargs = dm.model_kwargs() if model_kwargs is None else model_kwargs
    model = build_model(cfg, model_kwargs)
    common = dict(
        optimizer=OmegaConf.to_container(cfg.task.optimizer, resolve=True),
        physical_optimizer=OmegaConf.to_container(cfg.physical_optimizer, resolve=True),
        scheduler=OmegaConf.to_container(cfg.scheduler, resolve=True),
        physical_scheduler=OmegaConf.to_container(cfg.physical_scheduler, resolve=True)
        if "physical_scheduler" in cfg
        else None,
        diagnostics_every=cfg.callbacks.diagnostics.every_n_steps,
    )
    if cfg.task.kind == "classification":
        return ClassificationModule(model, num_classes=model_kwargs["num_classes"], **common)
    return LanguageModelModule(model, char_level=dm.char_level, **common)


def uses_ddp(cfg: DictConfig) -> bool:
    """Whether the trainer runs data-parallel processes (``trainer=ddp`` or ``ddp_cpu``)."""
    return "ddp" in str(cfg.trainer.get("strategy", ""))


def check_data_parallel(cfg: DictConfig) -> None:
    """Under DDP ``task.datamodule.batch_size`` is the global batch: it must split evenly."""
    if not uses_ddp(cfg):
        return
    devices, nodes = cfg.trainer.get("devices", 1), cfg.trainer.get("num_nodes", 1)
    if not isinstance(devices, int) or devices < 1:
        return  # "auto" or -1: known only once Lightning has counted the accelerators
    world, batch = devices * int(nodes or 1), int(cfg.task.datamodule.batch_size)
    if batch % world:
        raise AstraoraError(
            f"task.datamodule.batch_size={batch} is the global batch and must be divisible by the "
            f"{world} processes (trainer.devices={devices} x trainer.num_nodes={nodes})."
        )


# Physical layers wider than this are simulated slowly on a CPU (minutes per step at a few thousand wires).
CPU_WIDE_LAYER = 512


def warn_slow_on_cpu(cfg: DictConfig, module) -> None:
    """One warning per physical layer too wide to simulate quickly on a CPU."""
    if cfg.trainer.accelerator != "cpu":
        return
    for name, layer in hybrid_layers(module.model).items():
        if max(layer.d_in, layer.d_out) > CPU_WIDE_LAYER:
            log.warning(
                "physical layer %s is %d -> %d (%s) on a CPU: expect minutes per step; README 'How long a "
                "run takes on a CPU' lists CPU-sized settings, scripts/time_epoch.py estimates this one",
                name,
                layer.d_in,
                layer.d_out,
                type(layer.device).__name__,
            )


def resume_hint(output_dir: Path) -> str:
    """What a user can do after a device failure: the step the last checkpoint holds, if any."""
    last = output_dir / "checkpoints" / "last.ckpt"
    if not last.is_file():
        return "No checkpoint was written yet (callbacks.checkpoint.every_n_train_steps); start the run again."
    try:
        step = int(torch.load(last, map_location="cpu", weights_only=True)["global_step"])
    except Exception:  # noqa: BLE001 - the hint must not hide the failure
        return f"resume={output_dir} continues from its last checkpoint."
    return f"resume={output_dir} continues exactly from the checkpoint at step {step}."


def finished_summary(cfg: DictConfig, state: dict, output_dir: Path) -> dict | None:
    """The summary of the run ``state`` (a checkpoint) belongs to, if that run finished there and this
    config would train no further: ``summary.json`` says completed at the checkpoint's step and the
    step or epoch limit is reached. None otherwise (the run is continued, or tested again)."""
    path = output_dir / "summary.json"
    try:
        summary = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    step = int(state["global_step"])
    if not isinstance(summary, dict) or summary.get("status") != "completed" or summary.get("steps") != step:
        return None
    max_steps, max_epochs = cfg.trainer.get("max_steps", -1), cfg.trainer.get("max_epochs")
    epochs = state.get("loops", {}).get("fit_loop", {}).get("epoch_progress", {}).get("current", {}).get("processed", 0)
    steps_done = max_steps is not None and max_steps >= 0 and step >= max_steps
    epochs_done = max_epochs is not None and max_epochs >= 0 and epochs >= max_epochs
    return summary if steps_done or epochs_done else None


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


def run(cfg: DictConfig, callbacks: list[L.Callback] = ()) -> dict:
    """Train and test one configuration; returns the summary (also written to summary.json).

    With ``resume`` set, training continues from that checkpoint in the original run directory
    (the one holding ``checkpoints/``), with its W&B run id and its metrics.csv.
    """
    validate(cfg)
    check_wandb_resume(cfg)
    check_trainer(cfg)  # accelerator present, Lightning accepts the trainer keys
    output_dir = Path(cfg.paths.output_dir)
    started = time.time()
    ckpt_path, state = read_checkpoint(cfg) if cfg.resume else (None, None)
    if ckpt_path is not None and ckpt_path.parent.name == "checkpoints":
        output_dir = ckpt_path.parent.parent
    check_data_parallel(cfg)
    L.seed_everything(int(cfg.seed), workers=True, verbose=False)
    if cfg.get("cpu_threads") and cfg.trainer.accelerator == "cpu":
        torch.set_num_threads(int(cfg.cpu_threads))
    # Amplitudes below ~1e-38 carry no physics, but as subnormal floats they make CPU arithmetic
    # crawl: an MZI mesh near its cross state produces them in every query (up to 1.7x slower).
    torch.set_flush_denormal(True)

    dm = instantiate(cfg.task.datamodule, _convert_="all")
    dm.prepare_data()
    dm.setup("fit")
    model_kwargs = dm.model_kwargs()
    check_memory(cfg, model_kwargs)  # before any tensor of the model is allocated
    module = build_module(cfg, dm, model_kwargs)
    if state is not None:
        check_checkpoint_fits(module, state, cfg.resume)
        finished = finished_summary(cfg, state, output_dir)
        if finished is not None:
            log.info(
                "resume=%s: this run already finished (status completed at step %d); nothing to do. Raise "
                "trainer.max_epochs or trainer.max_steps to train it longer.",
                cfg.resume,
                finished["steps"],
            )
            return finished
    warn_slow_on_cpu(cfg, module)

    # Every check has passed: from here on the run writes into its directory.
    output_dir.mkdir(parents=True, exist_ok=True)
    if rank_zero_only.rank == 0:  # DDP: the other processes do not write train.log
        log_into(output_dir)
    resumed_step = None if state is None else int(state["global_step"])
    pending_row = None if state is None else state.get("pending_log_row")
    if state is not None:
        if rank_zero_only.rank == 0:
            truncate_metrics(output_dir / "metrics.csv", int(state["global_step"]), state.get("pending_log_row"))
        log.info("resuming from %s (step %d) in %s", ckpt_path, state["global_step"], output_dir)
        del state

    wandb_id_file = output_dir / "wandb_id.txt"
    previous_wandb_id = wandb_id_file.read_text().strip() if wandb_id_file.exists() else None
    loggers = make_loggers(cfg, output_dir, previous_wandb_id, module, resumed_step)
    trainer_kwargs = OmegaConf.to_container(cfg.trainer, resolve=True)
    trainer = L.Trainer(
        **trainer_kwargs,
        logger=loggers,
        callbacks=[*make_callbacks(cfg, output_dir), *callbacks],
        default_root_dir=str(output_dir),
        enable_checkpointing=bool(cfg.callbacks.get("checkpoint")),
    )
    for lg in loggers[1:]:
        # the resolved config, plus the settings to colour and group runs by under "setting"
        resumed = {}
        if previous_wandb_id and resumed_step is not None and lg.experiment.id != previous_wandb_id:
            resumed = {"resumed_from": {"run": previous_wandb_id, "step": resumed_step}}
        lg.log_hyperparams({**OmegaConf.to_container(cfg, resolve=True), "setting": comparison_setting(cfg), **resumed})
        if resumed and pending_row:  # the checkpoint's own row, which the killed run may not have sent
            lg.log_metrics(
                {k: v for k, v in pending_row.items() if k not in ("epoch", "step")}, step=int(pending_row["step"])
            )
        wandb_id_file.write_text(lg.experiment.id)

    status, metrics = "failed", {}
    try:
        with stop_on_sigterm():
            trainer.fit(module, datamodule=dm, ckpt_path=str(ckpt_path) if ckpt_path else None, weights_only=True)
            metrics = reached_metrics(trainer)  # trainer.test replaces the val/ metrics
            if resumed_step is None and trainer.global_step == 0 and not trainer.interrupted:
                raise AstraoraError(
                    "the run trained 0 steps (no training batch reached the model); check "
                    "trainer.limit_train_batches, trainer.max_steps and the task's training data."
                )
            if resumed_step is not None and trainer.global_step == resumed_step:
                # resumed where training had ended (e.g. the test loop failed): no validation ran here
                metrics = {**last_logged(output_dir / "metrics.csv", "val/"), **metrics}
            if trainer.interrupted:
                status = "interrupted"
            else:
                trainer.test(module, datamodule=dm, verbose=False)
                if cfg.task.kind == "language_model":
                    write_language_sample(cfg, module, dm, output_dir)
                status = "completed"
    except DeviceFailure as err:
        # No checkpoint of the failing step: it holds queries whose results were never used and a
        # half-done update. The last checkpoint on disk is at a step boundary, so a resume from it
        # redoes the steps since then exactly as the uninterrupted run did them.
        status = summary_status(err)
        raise type(err)(f"{err} {resume_hint(output_dir)}") from None
    except RuntimeError as err:  # DDP: a collective failed because another process stopped
        stop = peer_failure(module, err)
        if stop is None:
            raise
        status = summary_status(stop)
        raise type(stop)(f"{stop} {resume_hint(output_dir)}") from None
    except (KeyboardInterrupt, SystemExit):
        status = "interrupted"
        raise
    finally:
        metrics.update(reached_metrics(trainer))
        summary = summarize(cfg, module, trainer, metrics, status, started, output_dir)
        if trainer.is_global_zero:  # DDP: rank 0 writes (the query totals are already summed)
            (output_dir / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
        for lg in loggers[1:]:
            lg.experiment.summary.update(wandb_summary(summary))
        if cfg.logger.get("wandb"):
            import wandb

            wandb.finish()
    return summary


def report(summary: dict) -> str:
    metrics = summary["metrics"]
    main = next((k for k in ("test/acc", "test/ppl", "test/loss") if k in metrics), None)
    shown = f"{main} = {metrics[main]:.4f}" if main else "no test metric"
    return (
        f"{summary['task']} / {summary['device']} ({summary['mode']}): {shown}; "
        f"hardware queries: {summary['queries']['total']:,}; outputs: {summary['run_dir']}"
    )


def discard_unused_run_dir(run_dir: Path) -> None:
    """Remove a run directory Hydra made for a job that wrote nothing into it (a refused start, or a
    resume that continued in the run it resumed): only ``.hydra/`` and ``train.log`` are there."""
    if not run_dir.is_dir() or not {p.name for p in run_dir.iterdir()} <= {".hydra", LOG_FILE}:
        return
    root = logging.getLogger()
    for handler in list(root.handlers):
        if (
            isinstance(handler, logging.FileHandler)
            and Path(handler.baseFilename).parent.resolve() == run_dir.resolve()
        ):
            root.removeHandler(handler)
            handler.close()
    shutil.rmtree(run_dir / ".hydra", ignore_errors=True)
    (run_dir / LOG_FILE).unlink(missing_ok=True)
    try:
        run_dir.rmdir()
    except OSError:
        pass


@hydra.main(config_path=CONFIG_DIR, config_name="config", version_base="1.3")
def hydra_main(cfg: DictConfig) -> float | None:
    from hydra.core.hydra_config import HydraConfig

    route_library_logs()
    hydra_dir = Path(HydraConfig.get().runtime.output_dir)
    summary = None
    try:
        summary = run(cfg)
    except (KeyboardInterrupt, SystemExit):  # Ctrl-C or SIGTERM: summary.json says "interrupted"
        log.warning("interrupted: the last checkpoint and summary.json are in the run directory")
        sys.exit(130)
    except AstraoraError as err:
        if os.environ.get("HYDRA_FULL_ERROR") == "1":
            raise
        discard_unused_run_dir(hydra_dir)
        log.error("error: %s", err)
        sys.exit(2 if not isinstance(err, DeviceFailure) else 3)
    finally:
        if summary is None or Path(summary["run_dir"]).resolve() != hydra_dir.resolve():
            discard_unused_run_dir(hydra_dir)
    if rank_zero_only.rank == 0:
        log.info(report(summary))
    metric = cfg.get("optimized_metric")
    return summary["metrics"].get(metric) if metric else None


def main() -> None:
    """``python train.py`` / ``astraora-train``: the command line's checks (:mod:`astraora.cli`), then Hydra."""
    from astraora.cli import main as cli_main

    cli_main()


if __name__ == "__main__":
    main()
