"""Shared fixtures: compose configs with Hydra's compose API into a temporary output directory."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir
from omegaconf import open_dict

from astraora.paths import CONFIG_DIR

REPO = Path(__file__).resolve().parent.parent

os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("WANDB_SILENT", "true")

# End-to-end checks are marked ``slow``: training runs and command lines in a subprocess, the README's
# default run to 95 %, SIGKILL and resume, data-parallel runs, every config composed and built.
# `python -m pytest -q` deselects them (the marker expression "not slow" where none is given),
# `python -m pytest -q -m slow` runs them (CI, .ci/run, runs both commands).
SLOW = "slow"


# A short run that checkpoints mid-epoch (every 3 of its 4 steps per epoch) and is reproducible: what the
# resume tests interrupt and compare against, in one process or two (test_resume, test_ddp), on any task.
RESUMABLE = [
    "trainer.max_epochs=3",
    "trainer.limit_train_batches=4",
    "trainer.limit_val_batches=2",
    "trainer.limit_test_batches=2",
    "trainer.enable_progress_bar=false",
    "trainer.enable_model_summary=false",
    "trainer.deterministic=true",
    "trainer.log_every_n_steps=1",
    "callbacks.checkpoint.every_n_train_steps=3",
    "zo.samples=8",
    "integrator.samples=8",
]
TINY_MODEL = ["task.model.hidden=16", "surrogate.rank=4"]  # for the tasks whose model has a hidden width


def pytest_configure(config):
    config.addinivalue_line("markers", f"{SLOW}: long end-to-end check, run with -m {SLOW} (CI runs it)")
    if not config.option.markexpr:
        config.option.markexpr = f"not {SLOW}"


def pytest_terminal_summary(terminalreporter, exitstatus, config):
    slow = [item for item in terminalreporter.stats.get("deselected", []) if item.get_closest_marker(SLOW)]
    if slow:
        terminalreporter.write_line(
            f"{len(slow)} slow end-to-end tests not run here; run them with: python -m pytest -q -m {SLOW}"
        )


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
    return subprocess.run(
        [sys.executable, str(REPO / "train.py"), *args],
        cwd=cwd,
        env=full_env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def single_class(root: Path, kind: str) -> Path:
    """A class tree (tests/fixtures_vision_audio.py) of images or audio clips with one class folder."""
    from fixtures_vision_audio import write_audio_tree, write_image_tree

    (write_image_tree if kind == "image" else write_audio_tree)(root)
    for extra in sorted(p for p in root.iterdir() if p.is_dir())[1:]:
        for file in extra.iterdir():
            file.unlink()
        extra.rmdir()
    return root


@pytest.fixture
def float64():
    """Run a test with float64 as torch's default dtype (gradient checks against the oracle)."""
    dtype = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    yield
    torch.set_default_dtype(dtype)


def random_batch(batch: int, n: int, m: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Inputs x (batch, n) and upstream gradients g (batch, m), standard normal."""
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(batch, n, generator=gen), torch.randn(batch, m, generator=gen)
