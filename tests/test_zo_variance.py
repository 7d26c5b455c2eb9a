"""The no-query draw of the Gaussian ZO estimate has the estimator's distribution (linear φ)."""

from __future__ import annotations

import pytest
import torch
from conftest import random_batch

from astraora.devices import MatVec
from astraora.ledger import QueryLedger
from astraora.rng import make_generator
from astraora.zo import ZOEstimator
from astraora.zo.variance import gaussian_estimate_draw

pytestmark = pytest.mark.usefixtures("float64")


def test_draws_match_the_estimator_in_mean_and_spread():
    """On a matvec φ is linear in θ, so the real estimator's M-direction estimates and the draws
    share mean g and relative mean square error (p + 1)/M (p = 12, M = 4: 3.25)."""
    device = MatVec(4, 3, seed=0)
    x, g = random_batch(5, 4, 3)
    exact = g.T @ x  # ∇_θ Σ_b ⟨θ x_b, g_b⟩ for A = θ
    samples, repeats, p = 4, 3000, 12
    zo = ZOEstimator(samples=samples, mu=1e-3, generator=make_generator(0, "zo"))
    ledger = QueryLedger(device)
    real = torch.stack([zo.estimate(ledger, x, g, x @ device.theta.detach().T) for _ in range(repeats)])
    gen = torch.Generator().manual_seed(0)
    drawn = torch.stack([gaussian_estimate_draw(exact, samples, gen) for _ in range(repeats)])
    theory = (p + 1) / samples
    for estimates in (real, drawn):
        mse = float(((estimates - exact) ** 2).sum((1, 2)).mean() / exact.square().sum())
        assert mse == pytest.approx(theory, rel=0.1)
        assert float((estimates.mean(0) - exact).norm() / exact.norm()) < 4 * (theory / repeats) ** 0.5


def test_zero_gradient_and_bad_samples():
    gen = torch.Generator().manual_seed(0)
    assert torch.equal(gaussian_estimate_draw(torch.zeros(3, 2), 10, gen), torch.zeros(3, 2))
    with pytest.raises(ValueError, match="samples=0"):
        gaussian_estimate_draw(torch.ones(2), 0, gen)
