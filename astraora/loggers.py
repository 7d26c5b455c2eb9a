"""Where a run's metrics go: ``metrics.csv`` in the run folder always, a W&B run when ``logger.wandb`` is set.

A resumed run continues its metrics.csv, and its W&B history as ``logger.wandb.resume`` says
(:func:`make_loggers`); ``wandb_id.txt`` in the run folder remembers the W&B run of the folder.
"""

from __future__ import annotations

import csv
import warnings
from pathlib import Path

import lightning as L
from omegaconf import DictConfig, OmegaConf

from astraora.errors import AstraoraError
from astraora.rundir import METRICS, comparison_setting

WANDB_RESUME = ("new_run", "same")
WANDB_ID = "wandb_id.txt"


def check_wandb_resume(cfg: DictConfig) -> None:
    """``logger.wandb.resume`` names one of :data:`WANDB_RESUME` (checked before anything is written)."""
    spec = cfg.logger.get("wandb")
    if spec and spec.get("resume", "new_run") not in WANDB_RESUME:
        raise AstraoraError(
            f"logger.wandb.resume={spec.get('resume')!r} is not allowed; choose one of {list(WANDB_RESUME)}."
        )


def csv_logger(output_dir: Path) -> L.pytorch.loggers.CSVLogger:
    """metrics.csv in the run directory; rows already there (a resumed run) are kept and continued."""
    metrics_csv = output_dir / METRICS
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


def wandb_summary(summary: dict) -> dict:
    """summary.json flattened into W&B summary keys (metric names as logged)."""
    flat = dict(summary["metrics"])
    flat.update({f"queries/{purpose}": n for purpose, n in summary["queries"].items()})
    flat["reprograms"] = summary["reprograms"]
    for key, value in (summary["surrogate"] or {}).items():
        flat[f"surrogate/{key}"] = value
    flat.update({key: summary[key] for key in ("status", "steps", "epochs", "wall_seconds")})
    return flat


def previous_wandb_id(output_dir: Path) -> str | None:
    """The W&B run id a run folder was logged to before (a resume), if any."""
    path = output_dir / WANDB_ID
    return path.read_text().strip() if path.exists() else None


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


def start_loggers(
    cfg: DictConfig,
    loggers: list,
    output_dir: Path,
    wandb_id: str | None,
    resumed_step: int | None,
    pending_row: dict | None,
) -> None:
    """The W&B run's config: the resolved config, the settings to colour and group runs by under
    ``setting``, and for a resume as a new run what it resumes (and the checkpoint's own row, which the
    killed run may not have sent); its id goes to wandb_id.txt."""
    for lg in loggers[1:]:
        resumed = {}
        if wandb_id and resumed_step is not None and lg.experiment.id != wandb_id:
            resumed = {"resumed_from": {"run": wandb_id, "step": resumed_step}}
        lg.log_hyperparams({**OmegaConf.to_container(cfg, resolve=True), "setting": comparison_setting(cfg), **resumed})
        if resumed and pending_row:
            lg.log_metrics(
                {k: v for k, v in pending_row.items() if k not in ("epoch", "step")}, step=int(pending_row["step"])
            )
        (output_dir / WANDB_ID).write_text(lg.experiment.id)


def finish_loggers(cfg: DictConfig, loggers: list, summary: dict) -> None:
    """The W&B run's summary: summary.json's values (:func:`wandb_summary`); then the run is closed."""
    for lg in loggers[1:]:
        lg.experiment.summary.update(wandb_summary(summary))
    if cfg.logger.get("wandb"):
        import wandb

        wandb.finish()
