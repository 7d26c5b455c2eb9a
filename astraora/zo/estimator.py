"""Zeroth-order estimate of ∇_θ φ(θ), φ(θ) = Σ_b ⟨A(θ) x_b, g_b⟩ = ⟨A(θ), Gᵀ X⟩_F (ALGORITHM.md §3).

    one-sided (paper):  ĝ = (1/M) Σ_i [(φ(θ + μ u_i) − φ(θ)) / μ] u_i
    two-sided:          ĝ = (1/M) Σ_i [(φ(θ + μ u_i) − φ(θ − μ u_i)) / (2μ)] u_i

Each φ(θ') is measured with q = min(B, m) queries at θ': the batch X itself when B ≤ m, or the
m rows of C = Gᵀ X when B > m (the compressed batch, φ = tr(C A(θ')ᵀ)). The M perturbed settings
are evaluated as batched tensor work in chunks of ``chunk_size`` settings, through the ledger.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from astraora.errors import ConfigError
from astraora.ledger import QueryLedger

DIRECTIONS = ("gaussian", "rademacher", "sphere")
AUTO_CHUNK_FLOATS = 2**22  # ≈ 16 MB of float32 work memory per batched call with chunk_size="auto"


class ZOEstimator:
    """Stochastic zeroth-order VJP estimator.

    Args:
        samples: M, number of random directions.
        mu: finite-difference step μ (paper: 1e-4 for phase devices).
        direction: ``gaussian`` (N(0, I), paper), ``rademacher`` (±1) or ``sphere`` (uniform on the
            sphere of radius √p); all satisfy E[u uᵀ] = I.
        two_sided: central differences (2M settings) instead of one-sided (M settings).
        reuse_forward: take φ(θ) from the forward pass output instead of re-querying it
            (one-sided only; False reproduces the paper's query count). Only where that output is
            exactly what the ZO queries at θ measure (:meth:`phi0_from_forward`); otherwise φ(θ)
            is re-queried and counted.
        chunk_size: perturbed settings simulated per batched call, or ``"auto"``: as many as fit
            in about ``AUTO_CHUNK_FLOATS`` numbers of work memory (θ copies and outputs). Big
            chunks pay for small layers and on GPUs; for layers of 512 × 1024 on a CPU, chunks of
            a few settings are fastest (cache).
        generator: draws the directions.
    """

    def __init__(self, samples: int = 100, mu: float = 1e-4, direction: str = "gaussian", two_sided: bool = False,
                 reuse_forward: bool = True, chunk_size: int | str = "auto", *, generator: torch.Generator):
        if int(samples) < 1:
            raise ConfigError(f"zo.samples={samples} must be >= 1.")
        if not mu > 0:
            raise ConfigError(f"zo.mu={mu} must be > 0.")
        if direction not in DIRECTIONS:
            raise ConfigError(f"zo.direction={direction!r} is not allowed; choose one of {DIRECTIONS}.")
        if chunk_size != "auto" and (isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1):
            raise ConfigError(f"zo.chunk_size={chunk_size!r} must be 'auto' or an integer >= 1.")
        self.samples, self.mu, self.direction = int(samples), float(mu), direction
        self.two_sided, self.reuse_forward, self.chunk_size = bool(two_sided), bool(reuse_forward), chunk_size
        self.generator = generator

    def chunk_for(self, p: int, rows: int, d_in: int, d_out: int) -> int:
        """Settings per batched call: the configured size, or for ``auto`` as many as keep θ copies
        (p each) and the rows in and out (rows · (n + m) each) within ``AUTO_CHUNK_FLOATS``."""
        if self.chunk_size != "auto":
            return int(self.chunk_size)
        return max(1, min(self.samples, AUTO_CHUNK_FLOATS // (p + rows * (d_in + d_out))))

    def directions(self, k: int, p: int, dtype: torch.dtype) -> Tensor:
        """k directions u (k, p) with E[u uᵀ] = I, drawn one per row so that the stream does not
        depend on how the M samples are chunked."""
        if self.direction == "rademacher":
            u = torch.stack([torch.randint(0, 2, (p,), generator=self.generator) for _ in range(k)]).to(dtype) * 2 - 1
        else:
            u = torch.stack([torch.randn(p, generator=self.generator, dtype=dtype) for _ in range(k)])
        if self.direction == "sphere":
            u = u / u.norm(dim=1, keepdim=True) * math.sqrt(p)
        return u

    def phi0_from_forward(self, device, batch: int, d_out: int, forward_output: bool) -> bool:
        """Whether φ(θ) is taken from the forward output: one-sided, ``reuse_forward``, a forward
        output given, and that output exactly what the ZO queries at θ measure
        (:meth:`Device.forward_output_gives_phi`; ``device`` None: an ideal device)."""
        if self.two_sided or not self.reuse_forward or not forward_output:
            return False
        return device is None or device.forward_output_gives_phi(batch > d_out)

    def queries_per_step(self, batch: int, d_out: int, device=None, forward_output: bool = True) -> int:
        """ZO queries for one estimate, as in ALGORITHM.md §5 (``forward_output``: whether the
        forward output y is passed to :meth:`estimate`)."""
        q = min(batch, d_out)
        settings = 2 * self.samples if self.two_sided else self.samples
        requery = not self.two_sided and not self.phi0_from_forward(device, batch, d_out, forward_output)
        return q * (settings + int(requery))

    @torch.no_grad()
    def estimate(self, ledger: QueryLedger, x: Tensor, g: Tensor, y: Tensor | None = None) -> Tensor:
        """ĝ ≈ ∇_θ Σ_b ⟨A(θ) x_b, g_b⟩ for inputs x (B, n), upstream gradients g (B, m) and the
        forward output y = x A(θ)ᵀ (B, m) (used for φ(θ) when ``reuse_forward``). Shape of θ."""
        theta = ledger.device.theta.detach()
        batch, d_out = g.shape
        compressed = batch > d_out
        probes = g.T @ x if compressed else x  # (q, n)

        def phi(outputs: Tensor) -> Tensor:  # outputs (K, q, m) → φ per setting (K,)
            if compressed:
                return outputs.diagonal(dim1=-2, dim2=-1).sum(-1)
            return (outputs * g).sum((-2, -1))

        if not self.two_sided:
            if self.phi0_from_forward(ledger.device, batch, d_out, y is not None):
                phi0 = (y * g).sum()
            else:
                phi0 = phi(ledger.query(probes, "zo", theta=theta).unsqueeze(0))[0]

        flat = theta.reshape(-1)
        ghat = torch.zeros_like(flat)
        chunk = self.chunk_for(flat.numel(), probes.shape[0], x.shape[1], d_out)
        for start in range(0, self.samples, chunk):
            k = min(chunk, self.samples - start)
            u = self.directions(k, flat.numel(), flat.dtype).to(flat.device)
            plus = phi(ledger.query_settings(probes, (flat + self.mu * u).view(k, *theta.shape), "zo"))
            if self.two_sided:
                minus = phi(ledger.query_settings(probes, (flat - self.mu * u).view(k, *theta.shape), "zo"))
                coef = (plus - minus) / (2 * self.mu)
            else:
                coef = (plus - phi0) / self.mu
            ghat += coef @ u
        return (ghat / self.samples).view_as(theta)

    def state_dict(self) -> dict:
        return {"generator": self.generator.get_state()}

    def load_state_dict(self, state: dict) -> None:
        self.generator.set_state(state["generator"])
