"""Smoke test of scripts/benchmark_core.py at --quick sizes: it runs, prints the table, and the
ledger's queries per training step match ALGORITHM.md §5."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_benchmark_core_quick(tmp_path):
    out = tmp_path / "bench.json"
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    # One thread: on a shared CPU, oversubscribed OpenMP threads make this 10x slower.
    cmd = [
        sys.executable,
        str(REPO / "scripts" / "benchmark_core.py"),
        "--quick",
        "--repeats",
        "1",
        "--devices",
        "slm,mzi",
        "--threads",
        "1",
        "--json",
        str(out),
    ]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout + proc.stderr

    table = [line for line in proc.stdout.splitlines() if line.startswith("|")]
    assert table[0].startswith("| device") and "queries/step" in table[0] and "formula" in table[0]
    rows = {line.split("|")[1].strip(): line for line in table[2:]}
    assert set(rows) == {"slm", "mzi"}
    assert all("| yes " in row for row in rows.values())

    result = json.loads(out.read_text())
    q = min(32, 128)
    expected = 32 + 100 * q + 2 * 10 + 2 * 100  # B + M·min(B,m) + 2r + 2·M_sm
    for family in ("slm", "mzi"):
        step = result["devices"][family]["step"]
        assert step["match"] and step["total"] == step["expected_total"] == expected
        assert step["measured"] == {"forward": 32, "zo": 100 * q, "surrogate": 220, "readout": 0}


@pytest.mark.slow
def test_time_epoch_with_its_digital_twin():
    """scripts/time_epoch.py --with-digital: the digital twin has no physical layer and so no query
    counters (it stopped with a KeyError after timing the hybrid)."""
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    cmd = [
        sys.executable,
        str(REPO / "scripts" / "time_epoch.py"),
        "task=audio_folder",
        "device=mzi",
        "--with-digital",
        "--steps",
        "2",
        "--warmup",
        "1",
        "--train-size",
        "200",
        "--model-kwargs",
        '{"num_classes": 4}',
    ]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=180)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert "hybrid / digital:" in proc.stdout and "per epoch" in proc.stdout


def test_surrogate_tracking_script(capsys):
    """scripts/surrogate_tracking.py at a small size: a readout every step tracks exactly, the
    implicit update with a sketch thinner than the layer drifts, and health_growth holds it."""
    sys.path.insert(0, str(REPO / "scripts"))
    try:
        import surrogate_tracking
    finally:
        sys.path.remove(str(REPO / "scripts"))
    assert (
        surrogate_tracking.main(
            [
                "--device",
                "slm",
                "--d-in",
                "96",
                "--d-out",
                "32",
                "--rank",
                "8",
                "--samples",
                "8",
                "--growth",
                "off",
                "0.1",
                "--steps",
                "60",
            ]
        )
        == 0
    )
    lines = [
        [cell.strip() for cell in line.split("|")[1:]]
        for line in capsys.readouterr().out.splitlines()
        if line.startswith("|") and not line.startswith("|---")
    ]
    header, rows = lines[0], {tuple(cells[:3]): dict(zip(lines[0], cells, strict=True)) for cells in lines[1:]}
    assert "mean" in header and "health rebuilds" in header
    assert float(rows[("rebuild", "—", "—")]["mean"]) == 1.0
    drifting, held = rows[("psi_implicit", "8", "off")], rows[("psi_implicit", "8", "0.1")]
    assert float(drifting["max"]) > 1.2 and float(held["max"]) < float(drifting["max"])
    assert float(held["mean"]) < float(drifting["mean"]) and int(held["health rebuilds"]) > 0
