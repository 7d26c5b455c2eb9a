"""``python train.py``: the command line is checked before anything heavy is imported or written.

An override naming a group option that does not exist, a key the config lacks, or a value the
validation refuses stops here with one line and exit code 2, in the time it takes to compose the
config (about a second, no torch or Lightning start-up), and leaves no run directory behind. Then
:func:`astraora.train.hydra_main` runs the job.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

CONFIG_DIR = str(Path(__file__).resolve().parent.parent / "conf")  # the repository's conf/ (editable install)


def fail(message: str) -> None:
    print(f"error: {message}", file=sys.stderr)
    sys.exit(2)


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


def check_single_run(argv: list[str], config_dir: str = CONFIG_DIR) -> None:
    """Compose and validate the config of a single run as Hydra will, so that an override Hydra
    cannot apply (a key the config lacks, a malformed value), a value validation refuses or an
    unusable ``resume`` checkpoint stops before Hydra makes a run directory. Multiruns (sweep
    syntax) are left to Hydra and run()."""
    if any(arg.startswith("-") for arg in argv):
        return
    from hydra import compose, initialize_config_dir
    from hydra.errors import HydraException

    try:
        with initialize_config_dir(config_dir=config_dir, version_base="1.3"):
            cfg = compose("config", overrides=argv)
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


def main() -> None:
    argv = sys.argv[1:]
    if os.environ.get("HYDRA_FULL_ERROR") != "1":
        check_group_overrides(argv)
        check_single_run(argv)
    from astraora.train import hydra_main

    hydra_main()
