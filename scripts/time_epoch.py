"""Estimate how long one training epoch of a task takes on this machine, from a few real steps.

    python scripts/time_epoch.py task=cifar10 device=mzi [Hydra overrides] [--steps 3] [--warmup 1]
        [--train-size N] [--model-kwargs JSON] [--with-digital]

The configuration is composed exactly as ``python train.py`` composes it and the run is built as
:func:`astraora.train.run` builds it, on synthetic data of the real shapes through the task's own
DataModule, loader and transforms (how, and what the estimate adds up: scripts/_bench.py, "epoch
estimate"). Validation, test, checkpointing and logging are not timed.

The timings are only as good as the machine is quiet: the report says how many cores other
processes kept busy meanwhile (Linux ``/proc/stat``). On a shared CPU, ``--threads 1`` gives steadier
(single-core) figures; by default torch uses one thread per core, as a real run does.

``--with-digital`` repeats everything with ``device=digital`` and prints the ratio. The timing code
is in scripts/_bench.py.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import warnings

import torch
from _bench import format_report, hours, time_training
from hydra import compose, initialize_config_dir
from omegaconf import DictConfig

from astraora.cli import check_group_overrides
from astraora.config import validate
from astraora.errors import AstraoraError
from astraora.paths import CONFIG_DIR


def parse_args(argv: list[str]) -> tuple[argparse.Namespace, list[str]]:
    """Our own options; everything else is a Hydra override."""
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="Any other argument (key=value) is a Hydra override, as for train.py.",
    )
    parser.add_argument("--steps", type=int, default=3, help="timed training steps (default 3)")
    parser.add_argument("--warmup", type=int, default=1, help="untimed steps before them (default 1)")
    parser.add_argument(
        "--train-size",
        type=int,
        default=None,
        help="training examples per epoch (default: per task, see the module docstring)",
    )
    parser.add_argument(
        "--model-kwargs",
        type=json.loads,
        default={},
        help="JSON added to the DataModule's model kwargs, e.g. '{\"num_classes\": 12}'",
    )
    parser.add_argument(
        "--input-shape",
        type=str,
        default=None,
        help="classification tasks without a synthetic source here: per-example input "
        "shape, e.g. 64 or 3,64,64 (random standard-normal float32 inputs)",
    )
    parser.add_argument(
        "--threads",
        type=int,
        default=None,
        help="torch CPU threads (default: torch's own choice, normally one per core)",
    )
    parser.add_argument("--with-digital", action="store_true", help="also time the same run with device=digital")
    args, overrides = parser.parse_known_args(argv)
    unknown = [a for a in overrides if a.startswith("-")]
    if unknown:
        parser.error(f"unrecognized arguments: {' '.join(unknown)}")
    if args.steps < 1 or args.warmup < 0:
        parser.error("--steps must be >= 1 and --warmup >= 0")
    return args, overrides


def compose_config(overrides: list[str]) -> DictConfig:
    """The composed config of ``python train.py <overrides>``, validated as run() validates it."""
    check_group_overrides(overrides)
    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        cfg = compose(config_name="config", overrides=overrides)
    validate(cfg)
    return cfg


def digital_overrides(overrides: list[str]) -> list[str]:
    """The same overrides with the device group replaced by ``digital``."""
    return [o for o in overrides if o.lstrip("+~").partition("=")[0] != "device"] + ["device=digital"]


def main(argv: list[str] | None = None) -> None:
    args, overrides = parse_args(sys.argv[1:] if argv is None else argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    logging.getLogger("lightning.pytorch").setLevel(logging.WARNING)
    logging.getLogger("lightning.fabric").setLevel(logging.WARNING)
    warnings.filterwarnings("ignore", message=".*does not have many workers.*")
    warnings.filterwarnings("ignore", message=".*GPU available but not used.*")
    runs = [overrides] + ([digital_overrides(overrides)] if args.with_digital else [])
    results = []
    try:
        for ov in runs:
            cfg = compose_config(ov)
            timing = time_training(cfg, args)
            print(format_report(timing), flush=True)
            print(flush=True)
            results.append(timing)
    except AstraoraError as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(2)
    if len(results) == 2 and results[1].epoch_s > 0:
        hybrid, digital = results
        print(
            f"hybrid / digital: {hybrid.epoch_s / digital.epoch_s:.1f}x per epoch "
            f"({hours(hybrid.epoch_s)} vs {hours(digital.epoch_s)})"
        )


if __name__ == "__main__":
    main()
