"""Integrators that move the surrogate from A(θ₀) to A(θ₁) after θ changes.

* ``psi_implicit``: one first-order projector-splitting (KSL) step on the increment
  ΔA = A(θ₁) − A(θ₀) (:func:`psi_step`), from forward queries only (ALGORITHM.md §4): 2r + 2·M_sm queries,
  two reprograms, no m×n matrix, no SVD. Skipped (no query, counted in ``skipped['surrogate']``)
  when θ has not moved since the last update. With ``reuse_sketch`` the sketch Z is drawn once
  and its readings at θ₁ are kept, so the next update takes its θ₀ readings of Z from them:
  2r + M_sm queries (ALGORITHM.md §9).
* ``rebuild``: a full readout + truncated SVD (n queries, counted as ``readout``).
* ``exact``: oracle readout + SVD (debugging baseline; no hardware queries).
* ``frozen``: never updated (ablation).

Schedule: the update runs every ``every`` θ-updates; ``rebuild_every`` > 0 additionally replaces
it by a full readout every that many θ-updates (combinable with ``psi_implicit``). θ₀ is always the
θ the factors were last synchronised to, so skipped steps are caught up by the next update.
"""

from __future__ import annotations

import logging
import math

import torch
from torch import Tensor

from astraora.errors import ConfigError
from astraora.ledger import QueryLedger
from astraora.surrogate.auto import keeps_fixed_sketch, psi_queries
from astraora.surrogate.lowrank import LowRankSurrogate, truncated_svd
from astraora.surrogate.validation import validate_integrator

log = logging.getLogger(__name__)

UNCHANGED_RTOL = 1e-12  # psi_implicit skips its update when ‖θ₁ − θ₀‖ ≤ this · ‖θ₀‖


def psi_step(U: Tensor, S: Tensor, V: Tensor, P1: Tensor, Z: Tensor, D: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """One first-order projector-splitting (KSL) step of Â = U S Vᵀ on the increment ΔA, which is
    never formed (ALGORITHM.md §4). Only forward readings of ΔA are needed:

    Args:
        U, S, V: the factors at θ₀: (m, r), (r, r), (n, r), U and V orthonormal.
        P1: ΔA V (m, r), the K-step's readings (query(Vᵀ; θ₁) − query(Vᵀ; θ₀), transposed).
        Z: the sketch (M_sm, n) with E[zzᵀ] = I.
        D: Z ΔAᵀ (M_sm, m), the L-step's readings (query(Z; θ₁) − query(Z; θ₀)).

    Returns the factors (U₁, S₁, V₁) at θ₁.
    """
    # 1. K-step: K = U S + P₁; (U₁, Ŝ) = qr(K)
    U1, S_hat = torch.linalg.qr(U @ S + P1)
    # 2. S-step, backwards in time: S̃ = Ŝ − U₁ᵀ P₁
    S_tilde = S_hat - U1.T @ P1
    # 3. L-step, implicitly: P₂ = Zᵀ (D U₁) / M_sm ≈ ΔAᵀ U₁; L = V S̃ᵀ + P₂; (V₁, S₁ᵀ) = qr(L)
    P2 = Z.T @ (D @ U1) / Z.shape[0]
    V1, S1_T = torch.linalg.qr(V @ S_tilde.T + P2)
    return U1, S1_T.T, V1


class Integrator:
    """Base: the schedule. Subclasses implement :meth:`update`."""

    name = "base"

    def __init__(self, every: int = 1, rebuild_every: int = 0):
        validate_integrator({"every": every, "rebuild_every": rebuild_every})
        self.every, self.rebuild_every = int(every), int(rebuild_every)

    def due(self, step: int) -> bool:
        """Whether the ``step``-th θ-update (1-based) runs a rebuild or an update."""
        return bool(self.rebuild_every and step % self.rebuild_every == 0) or step % self.every == 0

    def reads_out(self, step: int) -> bool:
        """Whether the ``step``-th θ-update's update is a full readout."""
        return bool(self.rebuild_every and step % self.rebuild_every == 0)

    def step(self, surrogate: LowRankSurrogate, ledger: QueryLedger, step: int) -> bool:
        """Called after the ``step``-th θ-update (1-based). Returns True when the factors changed."""
        if not self.due(step):
            return False
        if self.rebuild_every and step % self.rebuild_every == 0:
            surrogate.readout(ledger)
            return True
        return self.update(surrogate, ledger)

    def update(self, surrogate: LowRankSurrogate, ledger: QueryLedger) -> bool:
        raise NotImplementedError

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict) -> None:
        pass


class FrozenIntegrator(Integrator):
    name = "frozen"

    def update(self, surrogate, ledger) -> bool:
        return False


class RebuildIntegrator(Integrator):
    name = "rebuild"

    def reads_out(self, step: int) -> bool:
        return self.due(step)

    def update(self, surrogate, ledger) -> bool:
        surrogate.readout(ledger)
        return True


class ExactIntegrator(Integrator):
    name = "exact"

    def reads_out(self, step: int) -> bool:  # the oracle's best rank-r: a readout without queries
        return self.due(step)

    @torch.no_grad()
    def update(self, surrogate, ledger) -> bool:
        theta = ledger.device.theta.detach()
        surrogate.set_factors(*truncated_svd(ledger.oracle_matrix(), surrogate.rank), theta)
        return True


class PsiImplicitIntegrator(Integrator):
    """The implicit projector-splitting integrator.

    Args:
        samples: M_sm, rows of the sketch Z used for the L-step.
        sketch: ``gaussian`` (i.i.d. N(0, 1), the paper) or ``orthogonal`` (rows √n times
            orthonormal, so ZᵀZ/M_sm = I exactly when M_sm = n; a variance-reduced option).
        reuse_sketch: draw Z once and keep its readings at θ₁; the next update reuses them as its
            θ₀ readings when they are still readings of the device at θ₀: taken at exactly that
            θ, with the same (simulated) drift, and the same Z. Otherwise Z is queried at θ₀ too.
            Only where M_sm ≥ n: a fixed Z of fewer rows than the layer has inputs never probes
            the n − M_sm input directions outside its row space, so the L-step would stay blind
            to them for the whole run; such a layer draws a fresh Z per update (a warning says so).
        generator: draws the sketches.
    """

    name = "psi_implicit"

    def __init__(
        self,
        samples: int = 100,
        sketch: str = "gaussian",
        reuse_sketch: bool = False,
        *,
        generator: torch.Generator,
        every: int = 1,
        rebuild_every: int = 0,
    ):
        validate_integrator(
            {
                "name": self.name,
                "samples": samples,
                "sketch": sketch,
                "reuse_sketch": reuse_sketch,
                "every": every,
                "rebuild_every": rebuild_every,
            }
        )
        super().__init__(every, rebuild_every)
        self.samples, self.sketch, self.generator = int(samples), sketch, generator
        self.reuse_sketch = bool(reuse_sketch)
        self._fixed_z: Tensor | None = None  # Z when reused
        self._cache: dict | None = None  # {"theta", "drift_steps", "readings"}: Z's readings at the last θ₁
        self.reused = 0  # updates that took their θ₀ readings of Z from the cache
        self._warned = False

    def reuses(self, n: int) -> bool:
        """Whether a layer with n inputs keeps a fixed sketch (``reuse_sketch`` and M_sm ≥ n)."""
        return keeps_fixed_sketch(self.reuse_sketch, self.samples, n)

    def _sketch(self, n: int, dtype: torch.dtype, device) -> Tensor:
        if not self.reuses(n):
            if self.reuse_sketch and not self._warned:
                self._warned = True
                log.warning(
                    "integrator.reuse_sketch: off for a layer with n = %d inputs > M_sm = %d (a fixed sketch "
                    "would never probe %d of its input directions); it draws a fresh sketch per update.",
                    n,
                    self.samples,
                    n - self.samples,
                )
            return self.draw_sketch(n, dtype).to(device)
        if self._fixed_z is None or self._fixed_z.shape[1] != n:
            self._fixed_z, self._cache = self.draw_sketch(n, dtype).to(device), None
        return self._fixed_z

    def _cached_readings(self, ledger: QueryLedger, theta0: Tensor) -> Tensor | None:
        """Z's readings at θ₀ from the last update, if they still are that (see ``reuse_sketch``)."""
        cache = self._cache
        return cache["readings"] if cache is not None and ledger.still_current(cache, theta0) else None

    def draw_sketch(self, n: int, dtype: torch.dtype) -> Tensor:
        """Z (M_sm, n) with E[zzᵀ] = I."""
        if self.sketch == "gaussian":
            return torch.randn(self.samples, n, generator=self.generator, dtype=dtype)
        blocks = []
        for _ in range(math.ceil(self.samples / n)):
            q, _ = torch.linalg.qr(torch.randn(n, n, generator=self.generator, dtype=torch.float64))
            blocks.append(q.T * math.sqrt(n))
        return torch.cat(blocks)[: self.samples].to(dtype)

    @torch.no_grad()
    def update(self, surrogate: LowRankSurrogate, ledger: QueryLedger) -> bool:
        U, S, V = surrogate.U, surrogate.S, surrogate.V
        r = surrogate.rank
        theta0, theta1 = surrogate.theta_ref.clone(), ledger.device.theta.detach()
        if (theta1 - theta0).norm() <= UNCHANGED_RTOL * theta0.norm():
            # θ did not move (a skipped ZO step, a zero learning rate): ΔA = 0, and the 2r + 2·M_sm
            # queries would measure only noise. Drift moves A without moving θ, but both queries
            # would see the same drift, so nothing is lost.
            ledger.skipped["surrogate"] += 1
            return False
        Z = self._sketch(V.shape[0], V.dtype, V.device)
        probes = torch.cat([V.T, Z])  # (r + M_sm, n): Vᵀ for the K-step, Z for the L-step
        reuse = self.reuses(V.shape[0])
        cached = self._cached_readings(ledger, theta0) if reuse else None
        if cached is None:
            # θ₀ then θ₁ as one batched call (θ₁ last, so the hardware stays at θ₁).
            Y0, Y1 = ledger.query_settings(probes, torch.stack([theta0, theta1]), "surrogate", first_may_match=True)
        else:  # Z at θ₀ was read by the last update (its θ₁): only Vᵀ is queried at θ₀
            Y0 = torch.cat([ledger.query(V.T, "surrogate", theta=theta0), cached])
            Y1 = ledger.query(probes, "surrogate", theta=theta1)
            self.reused += 1
        if reuse:
            self._cache = {"theta": theta1.clone(), "drift_steps": ledger.drift_steps, "readings": Y1[r:].clone()}
        D = Y1 - Y0  # rows: (ΔA V)ᵀ, then Z ΔAᵀ
        U1, S1, V1 = psi_step(U, S, V, D[:r].T, Z, D[r:])
        if not (torch.isfinite(U1).all() and torch.isfinite(S1).all() and torch.isfinite(V1).all()):
            ledger.skipped["surrogate"] += 1
            return False
        surrogate.set_factors(U1, S1, V1, theta1)
        return True

    def state_dict(self) -> dict:
        state = {"generator": self.generator.get_state()}
        if self.reuse_sketch:
            state.update(fixed_z=self._fixed_z, cache=self._cache, reused=self.reused)
        return state

    def load_state_dict(self, state: dict) -> None:
        self.generator.set_state(state["generator"])
        if self.reuse_sketch:
            self._fixed_z, self._cache, self.reused = (
                state.get("fixed_z"),
                state.get("cache"),
                int(state.get("reused", 0)),
            )

    def queries_per_update(self, rank: int, reused: bool = False) -> int:
        """Queries of one update (:func:`~astraora.surrogate.auto.psi_queries`)."""
        return psi_queries(rank, self.samples, reused)


INTEGRATORS = {
    "psi_implicit": PsiImplicitIntegrator,
    "exact": ExactIntegrator,
    "rebuild": RebuildIntegrator,
    "frozen": FrozenIntegrator,
}


def make_integrator(
    name: str,
    *,
    generator: torch.Generator,
    every: int = 1,
    rebuild_every: int = 0,
    samples: int = 100,
    sketch: str = "gaussian",
    reuse_sketch: bool = False,
) -> Integrator:
    """Build an integrator from its config values (checked by :func:`validate_integrator`; ``auto`` is
    resolved per layer before, by :func:`~astraora.surrogate.auto.resolve_integrator`); ``generator``
    draws psi_implicit's sketches."""
    options = dict(every=every, rebuild_every=rebuild_every, samples=samples, sketch=sketch, reuse_sketch=reuse_sketch)
    validate_integrator({"name": name, **options})
    if name not in INTEGRATORS:  # auto: chosen per layer by its size, which this integrator does not know
        raise ConfigError(
            f"integrator.name={name!r} is not allowed here; resolve it per layer first "
            f"(astraora.surrogate.auto.resolve_integrator), or choose one of {list(INTEGRATORS)}."
        )
    if name == "psi_implicit":
        return PsiImplicitIntegrator(
            samples, sketch, reuse_sketch, generator=generator, every=every, rebuild_every=rebuild_every
        )
    return INTEGRATORS[name](every, rebuild_every)
