"""scripts/stale_surrogate_study.py's emulation of the paper authors' loop on a tiny layer: the
``stale`` order's backward uses the factors of the update before last (fresh: those of the last
update), and ``lost`` drops exactly the one update after an evaluation pass; and its report on a
fabricated sweep folder (paired differences against ``fresh``, settings told apart by the sketch)."""

import json
import sys
from pathlib import Path

import pytest
import torch

from astraora.devices import MZIMesh
from astraora.hybrid import HybridLayer

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def study():
    sys.path.insert(0, str(REPO / "scripts"))
    try:
        import stale_surrogate_study
    finally:
        sys.path.remove(str(REPO / "scripts"))
    return stale_surrogate_study


def train(study, stale: bool, lost: bool, steps: int = 5, evaluation_after: int | None = None):
    """A 6 → 6 mesh trained a few steps (exact θ-gradients; full rank and psi_implicit with an
    orthogonal sketch of 6 rows, which track A(θ) exactly): per step G and the input gradient the
    backward returned, the factors after every update (index 0: the initial readout), and θ."""
    torch.manual_seed(0)
    layer = HybridLayer(
        MZIMesh(6, 6, seed=0),
        mode="exact+sm",
        rank=6,
        output_scale=False,
        integrator={"name": "psi_implicit", "samples": 6, "sketch": "orthogonal"},
    )
    order = study.SurrogateOrder(layer, stale=stale, lost=lost)
    opt = torch.optim.Adam([layer.theta], lr=0.05)
    factors, grads, thetas = [], [], []
    for step in range(steps):
        x = torch.randn(4, 6, requires_grad=True)
        y = layer(x)
        if step == 0:
            factors.append(tuple(t.clone() for t in (layer.surrogate.U, layer.surrogate.S, layer.surrogate.V)))
        g = torch.randn_like(y)
        opt.zero_grad()
        y.backward(g)
        grads.append((g, x.grad.clone()))
        opt.step()
        layer.after_optimizer_step()
        factors.append(tuple(t.clone() for t in (layer.surrogate.U, layer.surrogate.S, layer.surrogate.V)))
        if evaluation_after is not None and step == evaluation_after:  # an epoch's end, after its last update
            order.evaluation_pass()
        thetas.append(layer.theta.detach().clone())
    return order, layer, factors, grads, thetas


def through(g: torch.Tensor, factors) -> torch.Tensor:
    u, s, v = factors
    return g @ (u @ s @ v.T)


def test_stale_backward_uses_the_factors_before_the_last_update(study):
    order, _, factors, grads, _ = train(study, stale=True, lost=False)
    for t, (g, grad_x) in enumerate(grads):
        used = factors[max(t - 1, 0)]  # step t's backward: the surrogate before the update of θ_{t−1} → θ_t
        assert torch.allclose(grad_x, through(g, used), atol=1e-6)
        if t >= 1:
            assert not torch.allclose(grad_x, through(g, factors[t]), atol=1e-4)  # not the current one
    assert len(order.errors) == len(grads) and order.dropped == 0
    # the surrogate tracks exactly, so its error is the one step it lags: ‖A(θ_t) − A(θ_{t−1})‖ / ‖A(θ_t)‖
    assert order.errors[0] < 1e-5 and min(order.errors[1:]) > 1e-3
    assert order.errors[1:] == pytest.approx(order.moves, rel=1e-3, abs=1e-5)


def test_fresh_backward_uses_the_current_factors(study):
    order, _, factors, grads, _ = train(study, stale=False, lost=False)
    for t, (g, grad_x) in enumerate(grads):
        assert torch.allclose(grad_x, through(g, factors[t]), atol=1e-6)
    assert max(order.errors) < 1e-5 and min(order.moves) > 1e-3  # θ moved, the surrogate followed
    assert min(order.cosines) > 1 - 1e-6


def test_lost_drops_only_the_update_after_an_evaluation_pass(study):
    order, layer, factors, _, thetas = train(study, stale=True, lost=True, steps=5, evaluation_after=1)
    assert order.dropped == 1
    # the update after step 2 (the first one after the evaluation pass) left the factors as they were,
    # with their reference θ moved on; the updates before and after it changed them
    assert all(torch.equal(a, b) for a, b in zip(factors[3], factors[2], strict=True))
    assert not all(torch.equal(a, b) for a, b in zip(factors[2], factors[1], strict=True))
    assert not all(torch.equal(a, b) for a, b in zip(factors[4], factors[3], strict=True))
    assert torch.equal(layer.surrogate.theta_ref, thetas[-1]) and layer.theta_updates == 5


def fake_run(root, variant, seed, acc, loss, error, sketch="gaussian", status="completed"):
    """A run folder of the study's sweep: summary.json (with the integrator's sketch) and stale.json."""
    directory = root / variant / f"experiment=study_stale,sketch={sketch},seed={seed}"
    directory.mkdir(parents=True)
    metrics, config = {"test/acc": acc, "test/loss": loss}, {"integrator": {"sketch": sketch}}
    summary = {"task": "digits", "device": "mzi", "seed": seed, "status": status, "metrics": metrics, "config": config}
    (directory / "summary.json").write_text(json.dumps(summary))
    stats = {"variant": variant, "rel_error_mean": error, "best_rank_error_mean": 0.1, "grad_cosine_mean": 1 - error}
    stats |= {"backwards": 10, "step_move_mean": 0.05, "dropped": 2 if variant == "stale+lost" else 0}
    (directory / "stale.json").write_text(json.dumps(stats))


def test_report_pairs_variants_by_seed(study, tmp_path):
    for seed, (fresh, stale) in enumerate([(0.90, 0.88), (0.92, 0.91)]):
        fake_run(tmp_path, "fresh", seed, fresh, 1.0, 0.01)
        fake_run(tmp_path, "stale", seed, stale, 1.1, 0.05)
        fake_run(tmp_path, "stale+lost", seed, stale - 0.01, 1.2, 0.07)
    fake_run(tmp_path, "stale", 2, 0.10, 9.0, 0.5)  # no fresh run of seed 2: not paired
    fake_run(tmp_path, "fresh", 3, 0.10, 9.0, 0.5, status="failed")  # left out
    fake_run(tmp_path, "fresh", 0, 0.95, 1.0, 0.0, sketch="orthogonal")
    results = study.collect(tmp_path)
    assert len(results) == 8 and {r["setting"] for r in results} == {"tracked", "full_rank"}
    tracked = [r for r in results if r["setting"] == "tracked"]
    mean, se, n = study.paired(tracked, "stale", 100.0)
    assert n == 2 and mean == pytest.approx(-1.5) and se == pytest.approx(0.5)  # −2 and −1 pt
    assert study.paired(tracked, "stale+lost", 1.0, "test_loss", relative=True)[:2] == (pytest.approx(20.0), 0.0)
    rows = [line for line in study.table(results).splitlines() if line.startswith("| ")][1:]
    first = "| tracked | digits | mzi | acc % | 0,1,2 | 91.00 | 63.00 | 88.50 | -1.50 ± 0.50 | -2.50 ± 0.50 |"
    assert rows[0].startswith(first)
    assert rows[0].endswith("| 2.0 |") and rows[1].startswith("| full_rank | digits | mzi | acc % | 0 | 95.00 | nan |")
