"""The random-direction estimator's error, drawn without queries: what M directions would cost.

For a linear φ (μ → 0) and Gaussian directions u_i ~ N(0, I_p), ĝ = (1/M) Σ_i (u_i · g) u_i. Split
each u_i into its part a_i along g and w_i orthogonal to it: ĝ = (‖g‖/M) (Σ a_i² ĝ₀ + Σ a_i w_i)
with ĝ₀ = g/‖g‖, and given the a_i, Σ a_i w_i ~ N(0, (Σ a_i²) (I − ĝ₀ĝ₀ᵀ)). So one χ²_M draw and
one p-vector give ĝ with exactly the estimator's distribution, at O(p) cost for any M: a training
with true gradients (``mode=exact``) whose θ-gradient is replaced by such a draw shows what the
method's ZO noise costs at M directions, for M far beyond what queries could pay for
(``scripts/zo_variance_study.py``; docs/archive/PARITY.md, "What M would close the mesh's short runs").
E[ĝ] = g and E‖ĝ − g‖² = ‖g‖² (p + 1)/M.
"""

from __future__ import annotations

import torch
from torch import Tensor


def gaussian_estimate_draw(grad: Tensor, samples: int, generator: torch.Generator) -> Tensor:
    """One draw of the M-direction Gaussian ZO estimate of ``grad`` (linear regime), same shape."""
    if int(samples) < 1:
        raise ValueError(f"samples={samples} must be >= 1")
    flat = grad.reshape(-1).to(torch.float64)
    norm = flat.norm()
    if norm == 0:
        return torch.zeros_like(grad)
    unit = flat / norm
    along = torch.randn(int(samples), generator=generator, dtype=torch.float64).square().sum()  # Σ a_i², χ²_M
    across = torch.randn(flat.numel(), generator=generator, dtype=torch.float64)
    across -= (across @ unit) * unit  # N(0, I − ĝ₀ĝ₀ᵀ)
    draw = norm / samples * (along * unit + along.sqrt() * across)
    return draw.to(grad.dtype).view_as(grad)
