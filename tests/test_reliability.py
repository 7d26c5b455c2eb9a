"""Reproducibility, device faults, numerical faults and bad input (the surrogate's health: test_surrogate_health.py)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from conftest import run_cli

from astraora.devices import SLM, MRRBank
from astraora.errors import ConfigError
from astraora.hybrid import HybridLayer
from astraora.rng import make_generator
from astraora.train import run
from astraora.zo import ZOEstimator

SHORT = ["debug=fast", "trainer.max_epochs=2", "task.model.hidden=16", "surrogate.rank=4"]


def test_same_seed_same_metrics(make_cfg):
    first = make_cfg(*SHORT, out="a")
    second = make_cfg(*SHORT, out="b")
    run(first)
    run(second)
    a = (Path(first.paths.output_dir) / "metrics.csv").read_text()
    assert a == (Path(second.paths.output_dir) / "metrics.csv").read_text()
    other = make_cfg(*SHORT, "seed=1", out="c")
    run(other)
    assert (Path(other.paths.output_dir) / "metrics.csv").read_text() != a


def test_layer_randomness_is_keyed_by_name():
    """Adding a layer elsewhere does not shift another layer's draws: streams depend on (seed, name)."""
    a = SLM(6, 4, seed=3, name="head.physical", nonideal={"output_noise": 0.1})
    SLM(6, 4, seed=3, name="other.layer", nonideal={"output_noise": 0.1}).query(torch.ones(2, 6))  # a neighbour draws
    b = SLM(6, 4, seed=3, name="head.physical", nonideal={"output_noise": 0.1})
    torch.testing.assert_close(a.query(torch.ones(2, 6)), b.query(torch.ones(2, 6)))
    assert not torch.equal(
        make_generator(3, "x", "zo").initial_seed() * torch.ones(1),
        make_generator(3, "y", "zo").initial_seed() * torch.ones(1),
    )


def test_transient_faults_are_retried_and_counted(make_cfg):
    cfg = make_cfg(
        *SHORT, "device.faults.raise_prob=0.05", "device.faults.nonfinite_prob=0.05", "device.driver.max_retries=10"
    )
    summary = run(cfg)
    assert summary["status"] == "completed"
    header = (Path(cfg.paths.output_dir) / "metrics.csv").read_text().splitlines()
    rows = [dict(zip(header[0].split(","), line.split(","), strict=True)) for line in header[1:]]
    retries = [float(r["queries/retries"]) for r in rows if r.get("queries/retries")]
    assert retries and retries[-1] > 0


def test_slow_queries_time_out_and_are_retried():
    device = MRRBank(4, 3, seed=0, name="d", faults={"slow_prob": 0.5, "slow_seconds": 0.05})
    layer = HybridLayer(
        device, zo=ZOEstimator(2, generator=make_generator(0, "zo")), rank=2, timeout_s=0.02, max_retries=30
    )
    for _ in range(5):
        layer(torch.randn(2, 4))
    assert layer.ledger.retries > 0


@pytest.mark.slow
def test_persistent_device_failure_checkpoints_and_stops(tmp_path):
    out = tmp_path / "run"
    result = run_cli(
        [
            *SHORT,
            "trainer.max_epochs=3",
            "device.faults.raise_prob=0.3",
            "device.driver.max_retries=1",
            f"hydra.run.dir={out}",
        ],
        cwd=tmp_path,
    )
    assert result.returncode == 3, result.stderr[-2000:]
    last = [line for line in result.stderr.splitlines() if line.strip()][-1]
    assert last.startswith("error: device 'head.physical'") and "failed 2 times" in last
    assert (out / "checkpoints" / "last.ckpt").is_file()
    assert json.loads((out / "summary.json").read_text())["status"] == "device_failure"


def test_nonfinite_zo_estimate_is_skipped_not_written():
    device = SLM(6, 4, seed=0, name="d")
    zo = ZOEstimator(4, generator=make_generator(0, "zo"))
    layer = HybridLayer(device, zo=zo, rank=2)
    zo.estimate = lambda *args, **kwargs: torch.full_like(device.theta, float("nan"))
    opt = torch.optim.Adam([device.theta], lr=0.1)
    before = device.theta.detach().clone()
    layer(torch.randn(3, 6)).sum().backward()
    assert device.theta.grad is None
    opt.step()
    assert torch.equal(device.theta.detach(), before)
    assert layer.ledger.skipped["zo"] == 1


def test_nonfinite_surrogate_update_is_skipped():
    device = SLM(6, 4, seed=0, name="d")
    layer = HybridLayer(device, zo=ZOEstimator(4, generator=make_generator(0, "zo")), rank=2)
    layer(torch.randn(3, 6))
    layer.surrogate.U[0, 0] = float("nan")  # a corrupted factor makes the K-step non-finite
    factors = [layer.surrogate.U.clone(), layer.surrogate.S.clone(), layer.surrogate.V.clone()]
    with torch.no_grad():
        device.theta.add_(0.01)
    layer.after_optimizer_step()
    assert layer.ledger.skipped["surrogate"] == 1
    for kept, now in zip(factors, [layer.surrogate.U, layer.surrogate.S, layer.surrogate.V], strict=True):
        torch.testing.assert_close(kept, now, equal_nan=True, rtol=0, atol=0)


def test_exact_mode_needs_a_simulator():
    class Hardware(SLM):
        has_simulator = False

    with pytest.raises(ConfigError, match="mode='exact'.*no simulator"):
        HybridLayer(Hardware(4, 4, name="d"), mode="exact")


# One command line per place a bad value is caught: a group option and a validated value before Hydra
# starts (astraora.cli), a device option when the network is built (run(); the rank is checked there
# too, in-process in test_train.py, as is every key's own check).
@pytest.mark.slow
@pytest.mark.parametrize(
    "args, key",
    [
        (["task=nonexistent"], "task=nonexistent"),
        (["zo.samples=0", "zo.two_sided=true"], "zo.samples=0"),
        (["device.nonideal.phase_bits=1"], "device.nonideal.phase_bits"),
    ],
)
def test_bad_config_exit_code_two(tmp_path, args, key):
    result = run_cli([*args, f"hydra.run.dir={tmp_path / 'r'}"], cwd=tmp_path)
    assert result.returncode == 2, result.stderr[-2000:]
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and key in lines[0] and "Traceback" not in result.stderr
    assert not (tmp_path / "r").exists()  # a refused start leaves no run directory


def test_finite_check_is_exact_where_the_sum_overflows():
    """The ledger's check sums the readings first: a finite sum proves every reading finite; an
    overflowing sum of finite readings must still pass, NaN and ±Inf anywhere must not."""
    from astraora.ledger import _finite

    big = torch.full((4, 3), 3e38)
    assert not bool(torch.isfinite(big.sum())) and _finite(big)
    assert _finite(torch.randn(5, 7)) and _finite(torch.empty(0))
    for bad in (float("nan"), float("inf"), -float("inf")):
        y = torch.randn(5, 7)
        y[3, 2] = bad
        assert not _finite(y)
    y = torch.randn(5, 7)
    y[0, 0], y[1, 1] = float("inf"), -float("inf")  # their sum is NaN; each alone is caught too
    assert not _finite(y)
