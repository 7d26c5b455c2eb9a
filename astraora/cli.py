"""``python train.py``: the command line is checked before anything heavy is imported or written.

An override naming a group option that does not exist, a key the config lacks, or a value the
validation refuses stops here with one line and exit code 2, in the time it takes to compose the
config (about a second, no torch or Lightning start-up), and leaves no run directory behind. Then
:func:`astraora.train.hydra_main` runs the job.
"""

from __future__ import annotations

import itertools
import os
import re
import shutil
import sys
from pathlib import Path

from hydra.experimental.callback import Callback

CONFIG_DIR = str(Path(__file__).resolve().parent.parent / "conf")  # the repository's conf/ (editable install)
MULTIRUN_FLAGS = ("-m", "--multirun")
MAX_CHECKED_JOBS = 64  # a bigger sweep has each swept value checked once, not every combination
# A key naming a secret: Hydra saves every override in the run folder (.hydra/), so none may carry one.
SECRET_WORDS = ("token", "secret", "password", "passwd")


def fail(message: str) -> None:
    print(f"error: {message}", file=sys.stderr)
    sys.exit(2)


def check_secrets(argv: list[str]) -> None:
    """Refuse an override whose key names a secret (``+device.token=...``, ``hydra.job.env_set.X_PASSWORD=``):
    Hydra would write it in plain text into the run folder's .hydra/ before anything else runs.
    A key naming a file that holds one (``device.token_file``) is fine. The value is never echoed."""
    for arg in argv:
        key, sep, _ = arg.lstrip("+~").partition("=")
        if not sep or arg.startswith("-"):
            continue
        for segment in key.split("."):
            words = [w for w in re.split(r"[_\-]", segment.lower()) if w]
            if any(w in SECRET_WORDS for w in words) and words[-1] not in ("file", "path", "env"):
                fail(f"{arg.partition('=')[0]}=... is refused: a secret on the command line would be saved in the "
                     f"run folder (.hydra/); set $ASTRAORA_DEVICE_TOKEN or device.token_file (a file holding it) "
                     f"instead.")


def check_group_overrides(argv: list[str], config_dir: str = CONFIG_DIR) -> None:
    """Reject ``group=option`` overrides naming an option that does not exist, in one line and with
    exit code 2, before Hydra composes anything (Hydra's own message spans several lines)."""
    root = Path(config_dir)
    for arg in argv:
        key, sep, value = arg.lstrip("+~").partition("=")
        group = root / key
        if not sep or not group.is_dir() or not value or value == "null":
            continue
        allowed = sorted(p.stem for p in group.glob("*.yaml"))
        for option in value.split(","):
            if option not in allowed:
                fail(f"{key}={option} is not allowed; choose one of {allowed}.")


def _compose_and_validate(overrides: list[str], config_dir: str, hydra_config: bool = False):
    """The config ``overrides`` give, validated (one line and exit 2 where it is not usable)."""
    from hydra import compose, initialize_config_dir
    from hydra.errors import HydraException

    try:
        with initialize_config_dir(config_dir=config_dir, version_base="1.3"):
            cfg = compose("config", overrides=overrides, return_hydra_config=hydra_config)
    except HydraException as err:
        lines = [line.strip() for line in str(err).splitlines() if line.strip()]
        fail(" ".join(lines[:2]))
    from astraora.checkpoints import read_checkpoint
    from astraora.config import validate
    from astraora.errors import AstraoraError

    try:
        validate(cfg, import_targets=False)
        if cfg.resume:
            read_checkpoint(cfg)
    except AstraoraError as err:
        fail(str(err))
    return cfg


def check_launcher(cfg, multirun: bool) -> None:
    """``launcher=slurm`` submits jobs only in a multirun, and only where SLURM's commands are. Jobs
    that train on this machine (any other launcher) need the accelerator they name here."""
    target = str(cfg.hydra.launcher.get("_target_", ""))
    if "submitit" not in target:
        if str(cfg.trainer.get("accelerator", "cpu")) in ("gpu", "cuda", "mps", "tpu"):  # only then import torch
            from astraora.errors import AstraoraError
            from astraora.preflight import check_accelerator

            try:
                check_accelerator(cfg)
            except AstraoraError as err:
                fail(str(err))
        return
    if "Slurm" not in target:
        return
    if not multirun:
        fail("launcher=slurm submits SLURM jobs in a multirun only: add -m (python train.py -m launcher=slurm ...); "
             "without it the run would train here.")
    missing = [command for command in ("sbatch", "srun") if shutil.which(command) is None]
    if missing:
        verb = "is" if len(missing) == 1 else "are"
        fail(f"launcher=slurm needs SLURM's {' and '.join(missing)} on this machine, which {verb} not found; "
             f"submit from a SLURM login node, or use launcher=basic or launcher=joblib here.")


def check_single_run(argv: list[str], config_dir: str = CONFIG_DIR) -> None:
    """Compose and validate the config of a single run as Hydra will, so that an override Hydra
    cannot apply (a key the config lacks, a malformed value), a value validation refuses or an
    unusable ``resume`` checkpoint stops before Hydra makes a run directory. A multirun
    (:func:`check_multirun`) and other Hydra flags (``--cfg``, ``--info``, ...) are left alone."""
    if any(arg.startswith("-") for arg in argv):
        return
    check_launcher(_compose_and_validate(argv, config_dir, hydra_config=True), multirun=False)


def sweep_jobs(overrides: list[str]) -> list[list[str]]:
    """The override lists of a multirun's jobs, as Hydra's basic sweeper forms them from comma lists,
    ``range(...)`` and ``choice(...)``; a sweep that cannot be listed (``interval``, for Optuna) is
    left at the config's value. Over :data:`MAX_CHECKED_JOBS` combinations, each swept value once."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    fixed, swept = [], []
    for override in OverridesParser.create().parse_overrides(overrides):
        if not override.is_sweep_override():
            fixed.append(override.input_line)
            continue
        try:
            values = list(override.sweep_string_iterator())
        except Exception:  # noqa: BLE001 - not a listable sweep
            continue
        swept.append([f"{override.get_key_element()}={value}" for value in values])
    if not swept:
        return [fixed]
    combinations = 1
    for values in swept:
        combinations *= len(values)
    if combinations <= MAX_CHECKED_JOBS:
        return [fixed + list(job) for job in itertools.product(*swept)]
    first = [values[0] for values in swept]
    return [fixed + first[:i] + [value] + first[i + 1:] for i, values in enumerate(swept) for value in values]


def check_multirun(argv: list[str], config_dir: str = CONFIG_DIR) -> None:
    """Compose and validate every job of a multirun (``-m``) before Hydra makes its sweep folder."""
    flags = [arg for arg in argv if arg.startswith("-")]
    if not flags or any(flag not in MULTIRUN_FLAGS for flag in flags):
        return
    from hydra.errors import HydraException

    overrides = [arg for arg in argv if arg not in MULTIRUN_FLAGS]
    try:
        jobs = sweep_jobs(overrides)
    except HydraException as err:
        lines = [line.strip() for line in str(err).splitlines() if line.strip()]
        fail(" ".join(lines[:2]))
    for i, job in enumerate(jobs):
        cfg = _compose_and_validate(job, config_dir, hydra_config=i == 0)
        if i == 0:
            check_launcher(cfg, multirun=True)


class DiscardEmptySweep(Callback):
    """A Hydra callback (conf/config.yaml, ``hydra.callbacks``) that notes each multirun's sweep folder,
    so that :func:`main` removes it when the sweep stopped before any job wrote into it (a job refused
    with exit code 2 leaves only ``multirun.yaml`` there)."""

    sweep_dirs: list[Path] = []

    def on_multirun_start(self, config, **kwargs) -> None:
        DiscardEmptySweep.sweep_dirs.append(Path(str(config.hydra.sweep.dir)))


def discard_empty_sweeps() -> None:
    """Remove the noted sweep folders that hold nothing but ``multirun.yaml`` and empty folders."""
    for sweep in DiscardEmptySweep.sweep_dirs:
        if not sweep.is_dir():
            continue
        entries = list(sweep.rglob("*"))
        if all(p.is_dir() or (p.name == "multirun.yaml" and p.parent == sweep) for p in entries):
            shutil.rmtree(sweep, ignore_errors=True)
    DiscardEmptySweep.sweep_dirs.clear()


def main() -> None:
    argv = sys.argv[1:]
    from astraora import reproducible  # applied when the package was imported; a bad value is refused here

    try:
        reproducible.apply(strict=True)
    except (reproducible.ConfigError, RuntimeError) as err:
        fail(str(err))
    check_secrets(argv)  # also with HYDRA_FULL_ERROR=1: a secret never reaches .hydra/
    if os.environ.get("HYDRA_FULL_ERROR") != "1":
        check_group_overrides(argv)
        check_single_run(argv)
        check_multirun(argv)
    from astraora.train import hydra_main

    try:
        hydra_main()
    finally:
        discard_empty_sweeps()
