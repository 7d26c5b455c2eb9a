"""Shared fixtures: compose configs with Hydra's compose API into a temporary output directory."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir
from omegaconf import open_dict

from astraora.train import CONFIG_DIR

REPO = Path(__file__).resolve().parent.parent

os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("WANDB_SILENT", "true")


@pytest.fixture(autouse=True)
def one_thread():
    """Tests use tiny tensors: one intra-op thread is faster than several spinning on 2 shared cores."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def compose_config(overrides: list[str], output_dir: Path | None = None):
    """The config ``python train.py <overrides>`` would run, writing into ``output_dir``."""
    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        cfg = compose("config", overrides=list(overrides))
    with open_dict(cfg):
        cfg.paths.output_dir = str(output_dir) if output_dir else "unused"
    return cfg


@pytest.fixture
def make_cfg(tmp_path):
    def _make(*overrides: str, out: str = "run"):
        return compose_config(list(overrides), tmp_path / out)

    return _make


def run_cli(args: list[str], cwd: Path, env: dict | None = None, timeout: int = 300):
    """``python train.py ARGS`` in a subprocess, from the repository."""
    import subprocess

    full_env = {**os.environ, "PYTHONPATH": str(REPO), "WANDB_MODE": "offline", **(env or {})}
    return subprocess.run([sys.executable, str(REPO / "train.py"), *args], cwd=cwd, env=full_env,
                          capture_output=True, text=True, timeout=timeout)
