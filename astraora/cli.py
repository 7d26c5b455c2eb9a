"""``python train.py`` / ``astraora-train``: the command line is checked before anything heavy is imported
or written, then Hydra runs the job (:func:`astraora.train.hydra_main`, around :func:`astraora.train.run`).

An override naming a group option that does not exist, a key the config lacks, or a value the
validation refuses stops here with one line and exit code 2, in the time it takes to compose the
config (no torch or Lightning start-up), and leaves no run directory behind.

The checks see the configs Hydra will compose: astraora's own folder (:data:`CONFIG_DIR`, inside the
installed package or the clone's top-level ``conf/``), the folders and packages a user adds with
``hydra.searchpath`` (command line or primary config), ``--config-dir`` and Hydra's SearchPathPlugins,
in Hydra's order (:func:`hydra_for`).
"""

from __future__ import annotations

import contextlib
import itertools
import os
import re
import shutil
import sys
import warnings
from collections.abc import Iterator
from dataclasses import dataclass, replace
from pathlib import Path

from hydra.experimental.callback import Callback

from astraora.paths import CONFIG_DIR, find_config_dir  # noqa: F401 - find_config_dir: where CONFIG_DIR comes from

MULTIRUN_FLAGS = ("-m", "--multirun")
# Hydra's flags that choose where configs come from (hydra/_internal/utils.py: get_args_parser)
CONFIG_DIR_FLAGS = ("--config-dir", "-cd")
CONFIG_NAME_FLAGS = ("--config-name", "-cn")
CONFIG_PATH_FLAGS = ("--config-path", "-cp")
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
                fail(
                    f"{arg.partition('=')[0]}=... is refused: a secret on the command line would be saved in the "
                    f"run folder (.hydra/); set $ASTRAORA_DEVICE_TOKEN or device.token_file (a file holding it) "
                    f"instead."
                )


@dataclass(frozen=True)
class ConfigSources:
    """Where Hydra looks for the configs of one command line, besides its ``hydra.searchpath`` overrides
    and the SearchPathPlugins: astraora's folder, the ``--config-dir`` folder, the primary config's name."""

    config_dir: str = CONFIG_DIR
    extra_dir: str | None = None  # --config-dir, made absolute as Hydra makes it
    config_name: str = "config"


def config_sources(
    argv: list[str], config_dir: str = CONFIG_DIR, config_name: str = "config"
) -> tuple[ConfigSources | None, list[str]]:
    """The sources ``argv`` composes from and ``argv`` without the flags that chose them (``--config-dir``,
    ``--config-name``, in either of Hydra's spellings, ``FLAG VALUE`` or ``FLAG=VALUE``). None for the
    sources where ``--config-path`` replaces astraora's folder: Hydra alone checks such a command line."""
    sources, rest, i = ConfigSources(config_dir, None, config_name), [], 0
    while i < len(argv):
        flag, sep, value = argv[i].partition("=")
        if flag not in CONFIG_DIR_FLAGS + CONFIG_NAME_FLAGS + CONFIG_PATH_FLAGS:
            rest.append(argv[i])
            i += 1
            continue
        if not sep:
            if i + 1 == len(argv):
                return sources, rest + argv[i:]  # Hydra's own parser says what is missing
            value, i = argv[i + 1], i + 1
        i += 1
        if flag in CONFIG_PATH_FLAGS:
            return None, argv
        if flag in CONFIG_NAME_FLAGS:
            sources = replace(sources, config_name=value)
            continue
        extra = os.path.abspath(value)
        if not os.path.isdir(extra):
            fail(
                f"{flag} {value} is not a folder; give a folder of config groups (e.g. one holding device/<name>.yaml)."
            )
        sources = replace(sources, extra_dir=extra)
    return sources, rest


@contextlib.contextmanager
def hydra_for(sources: ConfigSources) -> Iterator:
    """Hydra initialised, for the ``with`` block, on the search path ``hydra.main`` builds for ``sources``:
    Hydra's own configs, astraora's folder, the SearchPathPlugins (``hydra_plugins.*``), ``--config-dir``
    (as initialize_config_dir does, plus that folder); ``hydra.searchpath`` then comes with the overrides
    of each compose. Yields the config loader."""
    from hydra import version
    from hydra._internal.hydra import Hydra
    from hydra._internal.utils import create_config_search_path
    from hydra.core.config_search_path import SearchPathQuery
    from hydra.core.global_hydra import GlobalHydra
    from hydra.initialize import get_gh_backup, restore_gh_from_backup

    backup = get_gh_backup()
    version.setbase("1.3")
    search_path = create_config_search_path(f"file://{sources.config_dir}")
    if sources.extra_dir:
        search_path.prepend(
            provider="command-line", path=f"file://{sources.extra_dir}", anchor=SearchPathQuery(provider="schema")
        )
    try:
        Hydra.create_main_hydra2(task_name="train", config_search_path=search_path)
        yield GlobalHydra.instance().config_loader()
    finally:
        restore_gh_from_backup(backup)


def group_options(groups: list[str], argv: list[str], sources: ConfigSources) -> dict[str, list[str]]:
    """The options Hydra offers for each of ``groups`` (empty for a name that is no config group): the
    union over its whole search path, the ``hydra.searchpath`` of ``argv`` or of the primary config
    included. A ``hydra.searchpath`` entry that is not there (no such folder, a package that cannot be
    imported) stops here in one line: Hydra would only warn, and then refuse the user's options."""
    from hydra.core.object_type import ObjectType
    from hydra.errors import HydraException

    searchpath = [arg for arg in argv if arg.lstrip("+").partition("=")[0] == "hydra.searchpath"]
    options = {}
    with hydra_for(sources) as loader, warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            for group in groups:
                options[group] = loader.get_group_options(group, ObjectType.CONFIG, sources.config_name, searchpath)
        except HydraException as err:
            lines = [line.strip() for line in str(err).splitlines() if line.strip()]
            fail(" ".join(lines[:2]))
    for warning in caught:
        found = re.search(r"provider=(.*), path=(\S+) is not available", str(warning.message))
        if found:
            fail(
                f"{found.group(1)}: {found.group(2)} is not available: no such folder, or no importable package "
                f"of that name with an __init__.py (put its folder on PYTHONPATH or pip install it)."
            )
    return options


def check_group_overrides(argv: list[str], config_dir: str = CONFIG_DIR) -> None:
    """Reject ``group=option`` overrides naming an option that does not exist, in one line and with
    exit code 2, before Hydra composes anything (Hydra's own message spans several lines). The options
    are those Hydra would find: astraora's and the user's (``hydra.searchpath``, ``--config-dir``)."""
    sources, argv = config_sources(argv, config_dir)
    if sources is None:
        return
    chosen = []  # (key, group, override) of each group=option override
    for arg in argv:
        key, sep, value = arg.lstrip("+~").partition("=")
        group = key.partition("@")[0]  # group@package=option
        if sep and value and group and "." not in group and not arg.startswith("-"):
            chosen.append((key, group, arg))
    searchpath = any(arg.lstrip("+").startswith("hydra.searchpath=") for arg in argv)
    if not chosen and not sources.extra_dir and not searchpath:
        return  # nothing to check; a user's folder is checked even so (group_options: one that is not there)
    options = group_options(sorted({group for _, group, _ in chosen}), argv, sources)
    for key, group, arg in chosen:
        if not options[group]:
            continue  # not a config group: a plain key, which the compose checks
        for option in named_options(arg):
            if option not in options[group]:
                fail(f"{key}={option} is not allowed; choose one of {options[group]}.")


def named_options(override: str) -> list[str]:
    """The options a group override names: one, a list (``[a,b]``) or a sweep (``a,b``, ``choice(a,b)``);
    none for ``null`` or where they cannot be listed (a malformed override: the compose says what is wrong)."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    try:
        parsed = OverridesParser.create().parse_override(override)
        value = list(parsed.sweep_string_iterator()) if parsed.is_sweep_override() else parsed.value()
    except Exception:  # noqa: BLE001 - not listable here
        return []
    values = value if isinstance(value, list) else [] if value is None else [value]
    return [str(v) for v in values]


def _compose_and_validate(overrides: list[str], config_dir: str | ConfigSources, hydra_config: bool = False):
    """The config ``overrides`` give, validated (one line and exit 2 where it is not usable)."""
    from hydra import compose
    from hydra.errors import HydraException

    sources = config_dir if isinstance(config_dir, ConfigSources) else ConfigSources(config_dir)
    try:
        with hydra_for(sources):
            cfg = compose(sources.config_name, overrides=overrides, return_hydra_config=hydra_config)
    except HydraException as err:
        lines = [line.strip() for line in str(err).splitlines() if line.strip()]
        fail(" ".join(lines[:2]))
    from astraora.config import validate
    from astraora.errors import AstraoraError

    try:
        validate(cfg, import_targets=False)
        if cfg.resume:
            from astraora.checkpoints import read_checkpoint  # torch: only for a resume

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
        fail(
            "launcher=slurm submits SLURM jobs in a multirun only: add -m (python train.py -m launcher=slurm ...); "
            "without it the run would train here."
        )
    missing = [command for command in ("sbatch", "srun") if shutil.which(command) is None]
    if missing:
        verb = "is" if len(missing) == 1 else "are"
        fail(
            f"launcher=slurm needs SLURM's {' and '.join(missing)} on this machine, which {verb} not found; "
            f"submit from a SLURM login node, or use launcher=basic or launcher=joblib here."
        )


def check_single_run(argv: list[str], config_dir: str = CONFIG_DIR) -> None:
    """Compose and validate the config of a single run as Hydra will, so that an override Hydra
    cannot apply (a key the config lacks, a malformed value), a value validation refuses or an
    unusable ``resume`` checkpoint stops before Hydra makes a run directory. A multirun
    (:func:`check_multirun`) and other Hydra flags (``--cfg``, ``--info``, ...) are left alone."""
    sources, argv = config_sources(argv, config_dir)
    if sources is None or any(arg.startswith("-") for arg in argv):
        return
    check_launcher(_compose_and_validate(argv, sources, hydra_config=True), multirun=False)


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
    return [fixed + first[:i] + [value] + first[i + 1 :] for i, values in enumerate(swept) for value in values]


def check_multirun(argv: list[str], config_dir: str = CONFIG_DIR) -> None:
    """Compose and validate every job of a multirun (``-m``) before Hydra makes its sweep folder."""
    sources, argv = config_sources(argv, config_dir)
    if sources is None:
        return
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
        cfg = _compose_and_validate(job, sources, hydra_config=i == 0)
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
    """``python train.py`` / ``astraora-train``: the checks above, in one line and exit code 2 where they
    refuse, then Hydra's job (:func:`astraora.train.hydra_main`)."""
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
    from astraora.train import hydra_main  # torch and Lightning: imported once the command line is checked

    try:
        hydra_main()
    finally:
        discard_empty_sweeps()


if __name__ == "__main__":
    main()
