"""One run: :func:`run` trains and tests one composed config and writes its run folder.

Read top to bottom, :func:`run` checks the config, builds the data and the model, opens the run folder
with its loggers and callbacks, fits, tests and writes ``summary.json`` (also when the run stops early).
The command line (``python train.py``, :mod:`astraora.cli`) checks its arguments, then Hydra composes
the config and calls :func:`run`; tests and scripts call it directly with a composed config.
"""

from __future__ import annotations

import logging
import os
import sys
import time
import warnings
from pathlib import Path

import hydra
import lightning as L
import torch
from omegaconf import DictConfig, OmegaConf

from astraora.build import build_model, hybrid_layers, instantiate
from astraora.callbacks import make_callbacks, stop_on_sigterm, uses_ddp
from astraora.checkpoints import read_checkpoint
from astraora.config import validate
from astraora.errors import AstraoraError, DeviceFailure
from astraora.lit import ClassificationModule, LanguageModelModule
from astraora.loggers import check_wandb_resume, finish_loggers, make_loggers, previous_wandb_id, start_loggers
from astraora.logs import route_library_logs
from astraora.parallel import peer_failure, summary_status
from astraora.paths import CONFIG_DIR
from astraora.preflight import check_memory, check_trainer
from astraora.rundir import (
    METRICS,
    check_checkpoint_fits,
    discard_unused_run_dir,
    finished_summary,
    last_logged,
    open_run_dir,
    reached_metrics,
    report,
    resume_hint,
    run_dir_of,
    summarize,
    write_language_sample,
    write_summary,
)

log = logging.getLogger("astraora")
# torch deprecated an API Lightning still uses; nothing a user can act on
warnings.filterwarnings("ignore", message=r".*isinstance\(treespec, LeafSpec\)")
# Physical layers wider than this are simulated slowly on a CPU (minutes per step at a few thousand wires).
CPU_WIDE_LAYER = 512


def run(cfg: DictConfig, callbacks: list[L.Callback] = ()) -> dict:
    """Train and test one configuration; returns the summary (also written to summary.json).

    With ``resume`` set, training continues from that checkpoint in the original run directory
    (the one holding ``checkpoints/``), with its W&B run id and its metrics.csv.
    """
    # The config: a refused one writes nothing.
    validate(cfg)
    check_wandb_resume(cfg)
    check_trainer(cfg)  # accelerator present, Lightning accepts the trainer keys
    started = time.time()
    ckpt_path, state = read_checkpoint(cfg) if cfg.resume else (None, None)
    output_dir = run_dir_of(cfg, ckpt_path)
    check_data_parallel(cfg)
    set_up_process(cfg)

    # Data and model.
    dm = set_up_data(cfg)
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

    # Every check has passed: from here on the run writes into its folder.
    resumed_step, pending_row = open_run_dir(output_dir, ckpt_path, state)
    del state
    wandb_id = previous_wandb_id(output_dir)
    loggers = make_loggers(cfg, output_dir, wandb_id, module, resumed_step)
    trainer = L.Trainer(
        **OmegaConf.to_container(cfg.trainer, resolve=True),
        logger=loggers,
        callbacks=[*make_callbacks(cfg, output_dir), *callbacks],
        default_root_dir=str(output_dir),
        enable_checkpointing=bool(cfg.callbacks.get("checkpoint")),
    )
    start_loggers(cfg, loggers, output_dir, wandb_id, resumed_step, pending_row)

    # Fit, test, and summary.json however the run ends.
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
                metrics = {**last_logged(output_dir / METRICS, "val/"), **metrics}
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
            write_summary(summary, output_dir)
        finish_loggers(cfg, loggers, summary)
    return summary


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


def set_up_process(cfg: DictConfig) -> None:
    """Seed every generator from ``seed``; on a CPU, ``cpu_threads`` intra-op threads."""
    L.seed_everything(int(cfg.seed), workers=True, verbose=False)
    if cfg.get("cpu_threads") and cfg.trainer.accelerator == "cpu":
        torch.set_num_threads(int(cfg.cpu_threads))
    # Amplitudes below ~1e-38 carry no physics, but as subnormal floats they make CPU arithmetic
    # crawl: an MZI mesh near its cross state produces them in every query (up to 1.7x slower).
    torch.set_flush_denormal(True)


def set_up_data(cfg: DictConfig) -> L.LightningDataModule:
    """The task's data module, downloaded or read and split for training."""
    dm = instantiate(cfg.task.datamodule, _convert_="all")
    dm.prepare_data()
    dm.setup("fit")
    return dm


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


def warn_slow_on_cpu(cfg: DictConfig, module) -> None:
    """One warning per physical layer too wide to simulate quickly on a CPU."""
    if cfg.trainer.accelerator != "cpu":
        return
    for name, layer in hybrid_layers(module.model).items():
        if max(layer.d_in, layer.d_out) > CPU_WIDE_LAYER:
            log.warning(
                "physical layer %s is %d -> %d (%s) on a CPU: expect minutes per step; docs/guide/quickstart.md "
                "lists CPU-sized settings, scripts/time_epoch.py estimates this one",
                name,
                layer.d_in,
                layer.d_out,
                type(layer.device).__name__,
            )


@hydra.main(config_path=CONFIG_DIR, config_name="config", version_base="1.3")
def hydra_main(cfg: DictConfig) -> float | None:
    """One Hydra job (its log file: ``<run dir>/train.log``, after this module's name): :func:`run`, the
    run's last line on the console, and the exit code of a refusal (2), a device failure (3) or an
    interrupt (130). Returns ``optimized_metric`` for sweepers. ``python train.py`` comes here through
    the command line's checks (:func:`astraora.cli.main`)."""
    from hydra.core.hydra_config import HydraConfig
    from lightning.pytorch.utilities.rank_zero import rank_zero_only

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


if __name__ == "__main__":  # python -m astraora.train [overrides]: the command line's checks, then Hydra
    from astraora.cli import main

    main()
