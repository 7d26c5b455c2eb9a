"""The projector-splitting step (astraora.surrogate.integrators.psi_step) against the best rank-r
matrix, on small matrices with an exact sketch (ZᵀZ/M_sm = I). The integrator classes around it
(queries, schedule, sketch reuse) are tested in test_core.py and test_query_efficiency.py."""

from __future__ import annotations

import pytest
import torch

from astraora.surrogate.integrators import psi_step
from astraora.surrogate.lowrank import truncated_svd

M, N, R = 9, 12, 3


def _step(a0: torch.Tensor, a1: torch.Tensor) -> torch.Tensor:
    """One psi_step from the best rank-R factors of a0 towards a1, reading ΔA only through the
    products the integrator measures (ΔA V and Z ΔAᵀ), with Z = √n I (ZᵀZ/n = I exactly)."""
    u, s, v = truncated_svd(a0, R)
    delta = a1 - a0
    z = N**0.5 * torch.eye(N, dtype=a0.dtype)
    u1, s1, v1 = psi_step(u, s, v, delta @ v, z, z @ delta.T)
    for factor in (u1, v1):  # the factors stay orthonormal
        torch.testing.assert_close(factor.T @ factor, torch.eye(R, dtype=a0.dtype))
    return u1 @ s1 @ v1.T


def _best(a: torch.Tensor) -> torch.Tensor:
    u, s, v = truncated_svd(a, R)
    return u @ s @ v.T


def _rank_r(gen: torch.Generator) -> torch.Tensor:
    return torch.randn(M, R, generator=gen, dtype=torch.float64) @ torch.randn(R, N, generator=gen, dtype=torch.float64)


def test_psi_step_is_exact_where_the_matrix_stays_rank_r():
    """Exactness of projector splitting (Lubich & Oseledets 2014): from A₀ = U S Vᵀ of rank r to an
    A₁ of rank r (here A₁ = W A₀ Q, a large change), one step gives A₁ itself, its own best rank-r
    matrix, to rounding."""
    gen = torch.Generator().manual_seed(0)
    a0 = _rank_r(gen)
    w = torch.eye(M, dtype=torch.float64) + 0.2 * torch.randn(M, M, generator=gen, dtype=torch.float64)
    q = torch.eye(N, dtype=torch.float64) + 0.2 * torch.randn(N, N, generator=gen, dtype=torch.float64)
    a1 = w @ a0 @ q
    assert (a1 - a0).norm() > 0.3 * a0.norm()
    torch.testing.assert_close(_step(a0, a1), a1, rtol=0, atol=1e-12 * float(a1.norm()))


def test_psi_step_follows_the_best_rank_r_matrix_to_second_order():
    """From a rank-r A₀ along a full-rank increment h·ΔA: the step's result agrees with the best
    rank-r matrix of A₀ + h·ΔA to first order, so the distance between them falls as h²
    (halving h divides it by 4), while both stay about h·‖ΔA‖ from A₀ + h·ΔA."""
    gen = torch.Generator().manual_seed(1)
    a0 = _rank_r(gen)
    delta = torch.randn(M, N, generator=gen, dtype=torch.float64)
    gaps = []
    for h in (0.1, 0.05, 0.025):
        a1 = a0 + h * delta
        got, best = _step(a0, a1), _best(a1)
        gaps.append(float((got - best).norm()))
        assert gaps[-1] < 0.05 * float((a1 - best).norm())
    for coarse, fine in zip(gaps, gaps[1:], strict=False):
        assert coarse / fine == pytest.approx(4.0, rel=0.1)


def test_psi_step_keeps_a_surrogate_where_the_increment_is_zero():
    gen = torch.Generator().manual_seed(2)
    a0 = _rank_r(gen)
    torch.testing.assert_close(_step(a0, a0.clone()), a0, rtol=0, atol=1e-12 * float(a0.norm()))
