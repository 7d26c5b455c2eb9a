"""A served noisy chip killed and restarted again and again in one run: every cycle ends in exit 3,
``resume=`` picks the run up, and the finished run equals one that was never interrupted (steps,
every metrics.csv row, test metrics, queries by purpose and reprograms)."""

from __future__ import annotations

import csv
import json
import os
import random
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import REPO

from astraora.remote.token import TOKEN_ENV

TOKEN = "soak-token-0123456789"
DEVICE = ["device=mzi", "device.nonideal.output_noise=0.01"]
RUN = [
    "task.model.hidden=16",
    "surrogate.rank=4",
    "trainer.max_epochs=10",
    "trainer.limit_train_batches=8",
    "trainer.limit_val_batches=2",
    "trainer.limit_test_batches=2",
    "trainer.enable_progress_bar=false",
    "trainer.enable_model_summary=false",
    "trainer.deterministic=true",
    "trainer.log_every_n_steps=1",
    "callbacks.checkpoint.every_n_train_steps=2",
    "zo.samples=8",
    "integrator.samples=8",
    "device=remote",
    "device.timeout_s=5",
    "device.open_timeout_s=20",
    "device.driver.max_retries=1",
]
KILLS = 5


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def environment() -> dict:
    return {**os.environ, "PYTHONPATH": str(REPO), "WANDB_MODE": "offline", TOKEN_ENV: TOKEN}


def start_server(endpoint: str) -> subprocess.Popen:
    """``astraora-device-server`` on ``endpoint``; returns once it says it is serving."""
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "astraora.remote",
            *DEVICE,
            f"server.address={endpoint}",
            "server.delay_s=0.01",
        ],  # a slower chip: the run lasts long enough to be killed often
        env=environment(),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    seen = []
    for line in proc.stdout:
        if "serving" in line:
            return proc
        seen.append(line)
    raise AssertionError("the server did not start: " + "".join(seen))


def train(args: list[str], run_dir: Path) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, str(REPO / "train.py"), *args, f"hydra.run.dir={run_dir}"],
        env=environment(),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )


def checkpoint_steps(run_dir: Path) -> list[int]:
    return [int(p.stem[4:]) for p in (run_dir / "checkpoints").glob("step*.ckpt")]


def comparable(summary: dict) -> dict:
    return {k: v for k, v in summary.items() if k not in ("wall_seconds", "run_dir")}


@pytest.mark.slow
def test_served_noisy_chip_killed_five_times_ends_equal_to_the_uninterrupted_run(tmp_path):
    rng = random.Random(23)
    endpoint = f"tcp://127.0.0.1:{free_port()}"
    args = [*RUN, f"device.address={endpoint}"]
    ref_dir, run_dir = tmp_path / "reference", tmp_path / "killed"

    server = start_server(endpoint)
    try:
        reference = train(args, ref_dir)
        assert reference.wait(timeout=600) == 0, reference.stderr.read()[-2000:]

        kills, resumes, restarted_at_once = 0, 0, 0
        proc = train(args, run_dir)
        while True:
            # wait for a checkpoint later than the one this cycle started from, then kill after a random delay
            start_step = max(checkpoint_steps(run_dir), default=-1)
            deadline = time.time() + 300
            while (
                max(checkpoint_steps(run_dir), default=-1) <= start_step
                and proc.poll() is None
                and time.time() < deadline
            ):
                time.sleep(0.02)
            if proc.poll() is not None or kills == KILLS:
                break
            time.sleep(rng.uniform(0.0, 0.6))
            server.send_signal(signal.SIGKILL)
            server.wait()
            kills += 1
            if rng.random() < 0.5:  # back at once: the client finds a fresh server that lost its layer
                server = start_server(endpoint)
                restarted_at_once += 1
            stderr = proc.communicate(timeout=300)[1]
            if proc.returncode == 0:
                break  # the kill came after the last query
            assert proc.returncode == 3, stderr[-2000:]
            lines = [line for line in stderr.splitlines() if line.strip()]
            assert lines[-1].startswith("error: ") and "resume=" in lines[-1], lines[-1]
            assert TOKEN not in stderr
            if server.poll() is not None:
                server = start_server(endpoint)
            proc = train([*args, f"resume={run_dir}"], tmp_path / f"resume{resumes}")
            resumes += 1
        assert proc.wait(timeout=600) == 0, proc.stderr.read()[-2000:]
    finally:
        server.kill()
        server.wait()
        if "proc" in locals() and proc.poll() is None:
            proc.kill()

    assert kills >= KILLS and resumes >= KILLS - 1, (kills, resumes)
    ref, got = (json.loads((d / "summary.json").read_text()) for d in (ref_dir, run_dir))
    assert got["status"] == "completed"
    assert comparable(got) | {"run_dir": None} == comparable(ref) | {"run_dir": None}
    assert metrics_rows(run_dir) == metrics_rows(ref_dir)


def metrics_rows(run_dir: Path) -> list[dict]:
    """metrics.csv without ``device/wait_seconds`` (wall time spent waiting for the server)."""
    with open(run_dir / "metrics.csv", newline="") as f:
        return [{k: v for k, v in row.items() if k != "device/wait_seconds"} for row in csv.DictReader(f)]
