"""Zeroth-order estimate of ∇_θ φ(θ), φ(θ) = Σ_b ⟨A(θ) x_b, g_b⟩ = ⟨A(θ), Gᵀ X⟩_F (ALGORITHM.md §3).

    one-sided (paper):  ĝ = (1/M) Σ_i [(φ(θ + μ u_i) − φ(θ)) / μ] u_i
    two-sided:          ĝ = (1/M) Σ_i [(φ(θ + μ u_i) − φ(θ − μ u_i)) / (2μ)] u_i

Each φ(θ') is measured with q = min(B, m) queries at θ': the batch X itself when B ≤ m, or the
m rows of C = Gᵀ X when B > m (the compressed batch, φ = tr(C A(θ')ᵀ)). The M perturbed settings
are evaluated as batched tensor work in chunks of ``chunk_size`` settings, through the ledger.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import Tensor

from astraora.errors import ConfigError
from astraora.ledger import QueryLedger

DIRECTIONS = ("gaussian", "rademacher", "sphere")
AUTO_CHUNK_FLOATS = 2**22  # ≈ 16 MB of float32 work per batched call with chunk_size="auto" on a CPU
AUTO_CHUNK_FLOATS_ACCELERATOR = 2**28  # ≈ 1 GB on a GPU: all M settings in one call for most layers


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

    Data-parallel training (several processes, each with its own shard of the batch) sets
    :attr:`reducer`: a callable that returns the mean over the processes of a tensor. φ is a sum
    over the batch, so the per-process finite-difference coefficients average to the ones of the
    whole batch (each process's upstream gradient is that of its shard's mean loss). With a
    reducer the M coefficients are measured first, reduced in one collective of M floats (2M
    settings two-sided still give M coefficients), and the same directions are then redrawn from
    the saved generator state to form ĝ, so every process ends with the same ĝ (MeZO's shared
    seed: no p-sized vector is exchanged). Without one (a single process) nothing changes.
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
        self._device_generator: torch.Generator | None = None  # directions on a GPU (generator_for)
        self._pending_device_state: Tensor | None = None  # its checkpointed state, until first used
        self.reducer: Callable[[Tensor], Tensor] | None = None  # mean over data-parallel processes

    def chunk_for(self, p: int, rows: int, d_in: int, d_out: int, device: torch.device | str = "cpu") -> int:
        """Settings per batched call: the configured size, or for ``auto`` as many as keep one
        p-sized copy of θ and the rows in and out (rows · (n + m) each) per setting within the
        work budget of the device (``AUTO_CHUNK_FLOATS`` on a CPU, ``AUTO_CHUNK_FLOATS_ACCELERATOR``
        elsewhere)."""
        if self.chunk_size != "auto":
            return int(self.chunk_size)
        budget = AUTO_CHUNK_FLOATS if torch.device(device).type == "cpu" else AUTO_CHUNK_FLOATS_ACCELERATOR
        return max(1, min(self.samples, budget // (p + rows * (d_in + d_out))))

    def generator_for(self, device: torch.device | str) -> torch.Generator:
        """The generator that draws directions on ``device``: the configured (CPU) one, or for
        another device one of its own, seeded once from the CPU generator and checkpointed with it,
        so that p-sized directions are drawn where they are used."""
        device = torch.device(device)
        if device.type == "cpu":
            return self.generator
        if self._device_generator is None or self._device_generator.device != device:
            self._device_generator = torch.Generator(device=device)
            if self._pending_device_state is not None:
                self._device_generator.set_state(self._pending_device_state)
                self._pending_device_state = None
            else:
                self._device_generator.manual_seed(int(torch.randint(0, 2**62, (), generator=self.generator)))
        return self._device_generator

    def directions(self, k: int, p: int, dtype: torch.dtype, device: torch.device | str = "cpu",
                   out: Tensor | None = None) -> Tensor:
        """k directions u (k, p) with E[u uᵀ] = I, drawn one row at a time (into ``out`` when given)
        so that the stream does not depend on how the M samples are chunked."""
        gen = self.generator_for(device)
        u = torch.empty(k, p, dtype=dtype, device=device) if out is None else out[:k]
        for row in u:
            if self.direction == "rademacher":
                row.copy_(torch.randint(0, 2, (p,), generator=gen, device=device))
            else:
                torch.randn(p, generator=gen, dtype=dtype, device=device, out=row)
        if self.direction == "rademacher":
            u.mul_(2).sub_(1)
        elif self.direction == "sphere":
            u.mul_(math.sqrt(p) / u.norm(dim=1, keepdim=True))
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

    @staticmethod
    def defer_checks(device: torch.device) -> bool:
        """Whether readings are checked once per estimate instead of once per call: everywhere but
        on a CPU, where a check costs no pipeline stall."""
        return device.type != "cpu"

    @torch.no_grad()
    def estimate(self, ledger: QueryLedger, x: Tensor, g: Tensor, y: Tensor | None = None) -> Tensor:
        """ĝ ≈ ∇_θ Σ_b ⟨A(θ) x_b, g_b⟩ for inputs x (B, n), upstream gradients g (B, m) and the
        forward output y = x A(θ)ᵀ (B, m) (used for φ(θ) when ``reuse_forward``). Shape of θ.

        On a CPU every batched call is checked for non-finite readings as it returns (and retried
        by the ledger). Elsewhere the M settings run without a host synchronisation and are
        checked once at the end; if a reading was non-finite, the estimate is taken again with
        the same directions and the per-call checks (the first attempt's queries stay counted)."""
        device = ledger.device.theta.device
        if not self.defer_checks(device):
            return self._estimate(ledger, x, g, y, check=True)
        state = self.generator_for(device).get_state()
        ghat = self._estimate(ledger, x, g, y, check=False)
        if bool(torch.isfinite(ghat).all()):
            return ghat
        self.generator_for(device).set_state(state)
        return self._estimate(ledger, x, g, y, check=True)

    def _estimate(self, ledger: QueryLedger, x: Tensor, g: Tensor, y: Tensor | None, check: bool) -> Tensor:
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
        p = flat.numel()
        ghat = torch.zeros_like(flat)
        chunk = self.chunk_for(p, probes.shape[0], x.shape[1], d_out, flat.device)
        u_buffer = torch.empty(chunk, p, dtype=flat.dtype, device=flat.device)
        settings = torch.empty(chunk, p, dtype=flat.dtype, device=flat.device)
        if self.reducer is not None:
            state = self.generator_for(flat.device).get_state()
            coefs = torch.empty(self.samples, dtype=flat.dtype, device=flat.device)
        for start in range(0, self.samples, chunk):
            k = min(chunk, self.samples - start)
            u = self.directions(k, p, flat.dtype, flat.device, out=u_buffer)
            plus = phi(ledger.query_settings(probes, torch.add(flat, u, alpha=self.mu, out=settings[:k]).view(k, *theta.shape),
                                             "zo", check=check))
            if self.two_sided:
                minus = phi(ledger.query_settings(probes, torch.add(flat, u, alpha=-self.mu, out=settings[:k]).view(k, *theta.shape),
                                                  "zo", check=check))
                coef = (plus - minus) / (2 * self.mu)
            else:
                coef = (plus - phi0) / self.mu
            if self.reducer is not None:
                coefs[start:start + k] = coef
            else:
                ghat.addmv_(u.T, coef)  # ĝ += Σ_i coef_i u_i
        if self.reducer is not None:
            # one collective of M floats; a non-finite reading anywhere makes every process's ĝ
            # non-finite, so all of them agree on retrying or skipping the estimate
            coefs = self.reducer(coefs)
            self.generator_for(flat.device).set_state(state)
            for start in range(0, self.samples, chunk):
                k = min(chunk, self.samples - start)
                ghat.addmv_(self.directions(k, p, flat.dtype, flat.device, out=u_buffer).T, coefs[start:start + k])
        return (ghat / self.samples).view_as(theta)

    def state_dict(self) -> dict:
        device_state = self._device_generator.get_state() if self._device_generator is not None else self._pending_device_state
        return {"generator": self.generator.get_state(), "device_generator": device_state}

    def load_state_dict(self, state: dict) -> None:
        self.generator.set_state(state["generator"])
        self._device_generator, self._pending_device_state = None, state.get("device_generator")
