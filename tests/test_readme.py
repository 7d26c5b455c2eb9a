"""README's promise: its quick-start commands are the ones CI runs, and `python train.py` works as written."""

from __future__ import annotations

import json
import re

import pytest
from conftest import REPO, run_cli


def quick_start_commands() -> list[str]:
    text = (REPO / "README.md").read_text()
    section = text.split("## Quick start", 1)[1]
    block = re.search(r"```bash\n(.*?)```", section, re.S).group(1)
    return [line.split("#")[0].strip() for line in block.splitlines() if line.strip()]


def test_quick_start_is_what_ci_runs():
    install, train, test = quick_start_commands()
    assert install == 'pip install -e ".[dev]"' and train == "python train.py"
    ci = (REPO / ".ci" / "run").read_text().splitlines()
    assert test in ci and f"{test} -m slow" in ci and any('-e ".[dev]"' in line for line in ci)


@pytest.mark.slow
def test_default_run_reaches_95_percent_offline(tmp_path):
    """`python train.py` exactly as the README gives it: digits, MZI head, zo+sm, offline, CPU."""
    result = run_cli([], cwd=tmp_path, env={"ASTRAORA_DATA_DIR": str(tmp_path / "no_data")}, timeout=900)
    assert result.returncode == 0, result.stderr[-3000:]
    last = result.stdout.strip().splitlines()[-1]
    assert last.startswith("digits / mzi (zo+sm): test/acc = ") and "hardware queries" in last
    summary = json.loads(next((tmp_path / "outputs" / "runs").glob("*/summary.json")).read_text())
    assert summary["status"] == "completed" and summary["metrics"]["test/acc"] >= 0.95
