"""The run folder: what a run writes into it and what a resume reads back from it.

A run folder holds ``metrics.csv`` (every logged row), ``summary.json`` (what the run reached, the
contract in docs/CONTRACTS.md), ``checkpoints/``, ``train.log`` and, for a language model,
``samples.txt``. A resume continues in the folder of the checkpoint it starts from: the rows logged
after that checkpoint are dropped (:func:`truncate_metrics`) and logged again.
"""

from __future__ import annotations

import csv
import json
import logging
import shutil
import time
from pathlib import Path

import lightning as L
import torch
from lightning.pytorch.utilities.rank_zero import rank_zero_only
from omegaconf import DictConfig

from astraora.build import hybrid_layers
from astraora.errors import AstraoraError
from astraora.logs import LOG_FILE, log_into

log = logging.getLogger("astraora")
SUMMARY = "summary.json"
METRICS = "metrics.csv"


# ------------------------------------------------------------------------------------------ resuming
def run_dir_of(cfg: DictConfig, ckpt_path: Path | None) -> Path:
    """Where the run writes: the folder of the checkpoint it resumes from (the one holding
    ``checkpoints/``), else ``paths.output_dir``."""
    if ckpt_path is not None and ckpt_path.parent.name == "checkpoints":
        return ckpt_path.parent.parent
    return Path(cfg.paths.output_dir)


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


def finished_summary(cfg: DictConfig, state: dict, output_dir: Path) -> dict | None:
    """The summary of the run ``state`` (a checkpoint) belongs to, if that run finished there and this
    config would train no further: ``summary.json`` says completed at the checkpoint's step and the
    step or epoch limit is reached. None otherwise (the run is continued, or tested again)."""
    path = output_dir / SUMMARY
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


def open_run_dir(output_dir: Path, ckpt_path: Path | None, state: dict | None) -> tuple[int | None, dict | None]:
    """Make the run folder and point train.log at it; for a resume, drop the rows metrics.csv holds past
    the checkpoint. Returns the checkpoint's step and the row it kept for a killed run (None, None
    for a fresh run)."""
    output_dir.mkdir(parents=True, exist_ok=True)
    if rank_zero_only.rank == 0:  # DDP: the other processes do not write train.log
        log_into(output_dir)
    if state is None:
        return None, None
    if rank_zero_only.rank == 0:
        truncate_metrics(output_dir / METRICS, int(state["global_step"]), state.get("pending_log_row"))
    log.info("resuming from %s (step %d) in %s", ckpt_path, state["global_step"], output_dir)
    return int(state["global_step"]), state.get("pending_log_row")


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


# ---------------------------------------------------------------------------------------- metrics.csv
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


# --------------------------------------------------------------------------------------- summary.json
def reached_metrics(trainer: L.Trainer) -> dict[str, float]:
    """The latest val/ and test/ scalars the trainer holds."""
    return {
        k: float(v)
        for k, v in trainer.callback_metrics.items()
        if k.startswith(("val/", "test/")) and torch.as_tensor(v).numel() == 1
    }


def zo_samples(cfg: DictConfig) -> int | None:
    """M, the random directions per estimate; None for colored finite differences (none drawn)."""
    return None if cfg.zo.direction == "colored" else int(cfg.zo.samples)


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


def summarize(cfg: DictConfig, module, trainer, metrics: dict, status: str, started: float, output_dir: Path) -> dict:
    """The summary.json contract of docs/CONTRACTS.md, from what the run reached."""
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


def write_summary(summary: dict, output_dir: Path) -> None:
    """summary.json, indented, with a final newline."""
    (output_dir / SUMMARY).write_text(json.dumps(summary, indent=2) + "\n")


def report(summary: dict) -> str:
    """The run's last console line: its main test metric, its hardware queries, its folder."""
    metrics = summary["metrics"]
    main = next((k for k in ("test/acc", "test/ppl", "test/loss") if k in metrics), None)
    shown = f"{main} = {metrics[main]:.4f}" if main else "no test metric"
    return (
        f"{summary['task']} / {summary['device']} ({summary['mode']}): {shown}; "
        f"hardware queries: {summary['queries']['total']:,}; outputs: {summary['run_dir']}"
    )


# ---------------------------------------------------------------------------------------- samples.txt
def write_language_sample(cfg: DictConfig, module, dm, output_dir: Path) -> None:
    """A language model's continuation of ``task.generate.prompt`` (seeded by ``seed``) in samples.txt."""
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


# ------------------------------------------------------------------------------------ an unused folder
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
