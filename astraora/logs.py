"""What a run prints, and the same lines in its run directory's ``train.log``.

Hydra configures the logging of ``python train.py`` from ``conf/hydra/default.yaml`` (``job_logging``):
info lines go to stdout, warnings and errors to stderr, and all of them to ``<run>/train.log``,
through the filters below. :func:`route_library_logs` sends Lightning's lines and Python warnings
through the same handlers; progress bars are not log lines and stay on the console only.
"""

from __future__ import annotations

import logging
from pathlib import Path

LOG_FILE = "train.log"
# Lightning's advertisements for its cloud products, printed by every Trainer
TIP_PREFIX = "💡 Tip:"


class BelowWarning(logging.Filter):
    """Passes debug and info records only (warnings and errors have their own handler, on stderr)."""

    def filter(self, record: logging.LogRecord) -> bool:
        return record.levelno < logging.WARNING


class DropTips(logging.Filter):
    """Drops Lightning's '💡 Tip: ...' lines."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith(TIP_PREFIX)


def route_library_logs() -> None:
    """Lightning's loggers and Python warnings through the root handlers (console and train.log).

    Lightning gives ``lightning.pytorch`` and ``lightning.fabric`` their own stderr handler when it is
    imported before logging is configured; those handlers are removed so that every line is shown
    once and also reaches train.log."""
    for name in ("lightning.pytorch", "lightning.fabric", "lightning"):
        logger = logging.getLogger(name)
        for handler in list(logger.handlers):
            if type(handler) is logging.StreamHandler:
                logger.removeHandler(handler)
        logger.propagate = True
    logging.captureWarnings(True)


def log_into(run_dir: Path) -> None:
    """Point the root logger's ``train.log`` file handler at ``run_dir/train.log`` (appending), e.g. when
    a resumed run continues in the directory it was started in."""
    target = (Path(run_dir) / LOG_FILE).resolve()
    root = logging.getLogger()
    for handler in list(root.handlers):
        if not isinstance(handler, logging.FileHandler) or Path(handler.baseFilename).name != LOG_FILE:
            continue
        if Path(handler.baseFilename).resolve() == target:
            continue
        target.parent.mkdir(parents=True, exist_ok=True)
        moved = logging.FileHandler(target, mode="a", encoding=handler.encoding)
        moved.setFormatter(handler.formatter)
        moved.setLevel(handler.level)
        for flt in handler.filters:
            moved.addFilter(flt)
        root.removeHandler(handler)
        handler.close()
        root.addHandler(moved)
