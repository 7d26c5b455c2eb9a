"""Zeroth-order estimate of ∇_θ φ(θ), φ(θ) = Σ_b ⟨A(θ) x_b, g_b⟩ = ⟨A(θ), Gᵀ X⟩_F (ALGORITHM.md §3).

    one-sided (paper):  ĝ = (1/M) Σ_i [(φ(θ + μ u_i) − φ(θ)) / μ] u_i
    two-sided:          ĝ = (1/M) Σ_i [(φ(θ + μ u_i) − φ(θ − μ u_i)) / (2μ)] u_i

With a sketched batch (``batch_rank`` / ``batch_energy``; ALGORITHM.md §3, the sketched batch) φ is
measured on r probe rows instead of the batch: G = Σ_b g_b x_bᵀ = U S Vᵀ truncated to rank r,
φ_r(θ) = ⟨A(θ), G_r⟩ = Σ_j ⟨A(θ) v_j, σ_j u_j⟩, and ĝ estimates ∇_θ φ_r instead of ∇_θ φ (exact when
r = rank G).

The equations are the pure functions :func:`zo_probes`, :func:`zo_sketch`, :func:`zo_phi`,
:func:`zo_coefficients` and :func:`zo_gradient`; :class:`ZOEstimator` draws the directions, measures
φ through the ledger in chunks of ``chunk_size`` settings, schedules the estimates (``every``) and
keeps the generator state for checkpoints and the data-parallel redraw.

Drawn directions (``device.engine=fused``). Where the ledger's device answers drawn queries
(:meth:`~astraora.ledger.QueryLedger.drawn_queries`: the fused engine with no non-ideality in view
that the drawn settings would not see exactly) and the directions are ``gaussian``, the estimator
draws one seed per estimate from its generator and the device generates u_i on chip
(``tl.randn(seed, i·p + j)``, i = 0, …, M − 1): each chunk of settings is one
:meth:`~astraora.ledger.QueryLedger.query_drawn` returning its φ's, and ĝ = Σ c_i u_i / M is formed
by regenerating the directions from the seed (:func:`~astraora.devices.fused.combine`). Nothing of
size K × p exists and no chunk waits for the host. The directions then are another stream than
PyTorch's generator gives (a run on ``engine=fused`` does not reproduce a ``tiles`` run's
directions), the same for every chunk size, and resumable (the seed comes from the checkpointed
generator). Other devices and options take the explicit route above, unchanged.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Iterator

import torch
from torch import Tensor

from astraora.choices import BETWEEN, COLORED, DIRECTIONS
from astraora.errors import ConfigError
from astraora.ledger import QueryLedger
from astraora.zo.validation import validate_zo

__all__ = [
    "AUTO_CHUNK_FLOATS",
    "AUTO_CHUNK_FLOATS_ACCELERATOR",
    "BETWEEN",
    "DIRECTIONS",
    "ZOEstimator",
    "zo_coefficients",
    "zo_gradient",
    "zo_phi",
    "zo_probes",
    "zo_sketch",
    "zo_weights",
]

AUTO_CHUNK_FLOATS = 2**22  # ≈ 16 MB of float32 work per batched call with chunk_size="auto" on a CPU
AUTO_CHUNK_FLOATS_ACCELERATOR = 2**28  # ≈ 1 GB on a GPU: all M settings in one call for most layers


# --------------------------------------------------------------------------- the equations (§3)
def zo_probes(x: Tensor, g: Tensor) -> Tensor:
    """The inputs each φ(θ') is measured with, q = min(B, m) rows: the batch X (B, n) itself when
    B ≤ m, else the m rows of the compressed batch C = Gᵀ X (m, n)."""
    return g.T @ x if g.shape[0] > g.shape[1] else x


def zo_sketch(x: Tensor, g: Tensor, rank: int | None = None, energy: float | None = None) -> tuple[Tensor, Tensor]:
    """The sketched batch: probe rows P (r, n) and weights W (r, m) with Σ_j ⟨A p_j, w_j⟩ = ⟨A, G_r⟩
    for every matrix A, where G = gᵀ x = Σ_b g_b x_bᵀ (m × n, rank ≤ B) and G_r its best rank-r
    approximation (truncated SVD, r ≤ rank G).

    r is the numerical rank of G, capped at ``rank`` and, with ``energy`` = e, at the smallest r whose
    singular values hold a fraction e of ‖G‖_F². The probes are G's top right singular vectors
    scaled to the batch's RMS row norm (the rows a device sees keep the batch's range); the weights
    are σ_j u_j over that scale. With B < min(m, n) the SVD is taken of a B × B core (thin QR of x
    and g), never of the m × n matrix. Pass the weights as ``g`` to :func:`zo_phi`."""
    batch, m = g.shape
    n = x.shape[1]
    if batch < min(m, n):
        qx, rx = torch.linalg.qr(x.T)  # (n, B), (B, B)
        qg, rg = torch.linalg.qr(g.T)  # (m, B), (B, B)
        uc, s, vch = torch.linalg.svd(rg @ rx.T)
        u, v = qg @ uc, qx @ vch.T
    else:
        u, s, vh = torch.linalg.svd(g.T @ x, full_matrices=False)
        v = vh.T
    tol = s[0] * max(m, n) * torch.finfo(s.dtype).eps if s.numel() else 0.0
    r = int((s > tol).sum()) if s.numel() else 0
    if energy is not None and r:
        cumulative = torch.cumsum(s[:r].double() ** 2, 0)
        r = min(r, int(torch.searchsorted(cumulative, energy * cumulative[-1] * (1 - 1e-12))) + 1)
    if rank is not None:
        r = min(r, int(rank))
    scale = x.pow(2).sum(1).mean().sqrt().clamp_min(torch.finfo(x.dtype).tiny)
    return scale * v[:, :r].T, (u[:, :r] * (s[:r] / scale)).T


def zo_phi(outputs: Tensor, g: Tensor) -> Tensor:
    """φ(θ') for each of K settings from the outputs (K, q, m) of :func:`zo_probes`' rows at them:
    Σ_b ⟨y_b, g_b⟩ for the batch, tr(C A(θ')ᵀ) for the compressed batch (B > m)."""
    if g.shape[0] > g.shape[1]:
        return outputs.diagonal(dim1=-2, dim2=-1).sum(-1)
    return (outputs * g).sum((-2, -1))


def zo_weights(g: Tensor) -> Tensor:
    """The weights W (q, m) with :func:`zo_phi`'s φ = Σ_b ⟨y_b, w_b⟩ = Σ y·W for the outputs y (q, m) of
    :func:`zo_probes`' rows: g itself for the batch (or the sketched batch's weights), the identity
    I_m for the compressed batch (B > m: φ = tr(C A(θ')ᵀ))."""
    if g.shape[0] > g.shape[1]:
        return torch.eye(g.shape[1], dtype=g.dtype, device=g.device)
    return g


def zo_coefficients(phi_plus: Tensor, phi_base: Tensor, mu: float, two_sided: bool) -> Tensor:
    """The finite differences c_i along each direction u_i: (φ(θ + μ u_i) − φ(θ)) / μ one-sided
    (``phi_base`` = φ(θ)), (φ(θ + μ u_i) − φ(θ − μ u_i)) / (2μ) two-sided (``phi_base`` = the
    φ(θ − μ u_i))."""
    if two_sided:
        return (phi_plus - phi_base) / (2 * mu)
    return (phi_plus - phi_base) / mu


def zo_gradient(chunks: Iterable[tuple[Tensor, Tensor]], samples: int) -> Tensor:
    """ĝ = (1/M) Σ_i c_i u_i from (coefficients c (k,), directions u (k, p)) pairs covering the M
    directions, summed chunk by chunk (a pair is used before the next is asked for, so the chunks
    may share one buffer). Shape (p,)."""
    total = None
    for c, u in chunks:
        if total is None:
            total = torch.zeros(u.shape[1], dtype=u.dtype, device=u.device)
        total.addmv_(u.T, c)  # Σ_i c_i u_i
    if total is None:
        raise ValueError("zo_gradient needs at least one chunk of directions")
    return total / samples


# --------------------------------------------------------------------------- the estimator
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
        every: estimate on every k-th call only; in between no query is made and θ gets a zero
            gradient (``between="momentum"``: the optimizer's moments carry θ on) or the last
            estimate again (``"last"``).
        batch_rank: measure φ on r ≤ ``batch_rank`` probe rows (the sketched batch,
            :func:`zo_sketch`) instead of min(B, m) rows; None: the batch (the paper).
        batch_energy: with a sketched batch, r is also at most the smallest rank whose singular
            values hold this fraction of ‖G‖_F² (chosen per step); None: no such cap.
        generator: draws the directions, one row at a time, so that the stream does not depend on
            ``chunk_size`` and can be redrawn from a saved generator state; with drawn directions
            (module docstring) one seed per estimate.

    The values are checked by :func:`~astraora.zo.validate_zo`.

    Data-parallel training (several processes, each with its own shard of the batch) sets
    :attr:`reducer`: a callable that returns the mean over the processes of a tensor. φ is a sum
    over the batch, so the per-process finite-difference coefficients average to the ones of the
    whole batch (each process's upstream gradient is that of its shard's mean loss). With a
    reducer the M coefficients are measured first, reduced in one collective (2M settings
    two-sided still give M coefficients), and the same directions are then redrawn from the saved
    generator state to form ĝ, so every process ends with the same ĝ (MeZO's shared seed: no
    p-sized vector is exchanged). Without one (a single process) nothing changes. With drawn
    directions (module docstring) the same holds: the M coefficients are reduced, then ĝ is formed
    from the seed, which every process draws alike.
    """

    def __init__(
        self,
        samples: int = 100,
        mu: float = 1e-4,
        direction: str = "gaussian",
        two_sided: bool = False,
        reuse_forward: bool = True,
        chunk_size: int | str = "auto",
        every: int = 1,
        between: str = "momentum",
        batch_rank: int | None = None,
        batch_energy: float | None = None,
        *,
        generator: torch.Generator,
    ):
        validate_zo(
            dict(
                direction=direction,
                samples=samples,
                mu=mu,
                two_sided=two_sided,
                reuse_forward=reuse_forward,
                chunk_size=chunk_size,
                every=every,
                between=between,
                batch_rank=batch_rank,
                batch_energy=batch_energy,
            )
        )
        if direction == COLORED:
            raise ConfigError(
                f"zo.direction={direction!r} is not allowed for random directions; choose one of {list(DIRECTIONS)} "
                "(colored differences are astraora.zo.ColoredEstimator, see make_estimator)."
            )
        self.samples, self.mu, self.direction = int(samples), float(mu), direction
        self.two_sided, self.reuse_forward, self.chunk_size = bool(two_sided), bool(reuse_forward), chunk_size
        self.every, self.between = int(every), between
        self.batch_rank = None if batch_rank is None else int(batch_rank)
        self.batch_energy = None if batch_energy is None else float(batch_energy)
        self.last_rank: int | None = None  # probe rows per setting of the last measured estimate
        self.generator = generator
        self._device_generator: torch.Generator | None = None  # directions on a GPU (generator_for)
        self._pending_device_state: Tensor | None = None  # its checkpointed state, until first used
        self.reducer: Callable[[Tensor], Tensor] | None = None  # mean over data-parallel processes
        self.last_seed: int | None = None  # the seed of the last estimate with drawn directions, None: explicit
        self.calls = 0  # estimate() calls, for ``every``
        self._last: Tensor | None = None  # the last estimate, for between="last"

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

    def directions(
        self, k: int, p: int, dtype: torch.dtype, device: torch.device | str = "cpu", out: Tensor | None = None
    ) -> Tensor:
        """k i.i.d. directions u (k, p) with E[u uᵀ] = I, drawn one row at a time (into ``out`` when
        given) so that the stream does not depend on how the M samples are chunked."""
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

    @property
    def sketched(self) -> bool:
        """Whether φ is measured on the sketched batch (:func:`zo_sketch`) instead of the batch."""
        return self.batch_rank is not None or self.batch_energy is not None

    def phi0_from_forward(self, device, batch: int, d_out: int, forward_output: bool) -> bool:
        """Whether φ(θ) is taken from the forward output: one-sided, ``reuse_forward``, a forward
        output given, and that output exactly what the ZO queries at θ measure
        (:meth:`Device.forward_output_gives_phi`; ``device`` None: an ideal device). The sketched
        batch's rows, like the compressed batch's, are combinations of the batch rows."""
        if self.two_sided or not self.reuse_forward or not forward_output:
            return False
        return device is None or device.forward_output_gives_phi(batch > d_out or self.sketched)

    def queries_per_step(
        self, batch: int, d_out: int, device=None, forward_output: bool = True, d_in: int | None = None
    ) -> int:
        """ZO queries for one measured estimate, as in ALGORITHM.md §5 (``forward_output``: whether
        the forward output y is passed to :meth:`estimate`; an estimate skipped by ``every`` makes
        none). With a sketched batch this is the most it can cost: r ≤ ``batch_rank`` (and ≤ n =
        ``d_in`` when given) rows per setting; ``batch_energy`` may choose fewer."""
        q = min(batch, d_out)
        if self.sketched:
            q = min(q, self.batch_rank or q, d_in or q)
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

        With ``every`` = k only every k-th call measures; the others return zeros or the last
        estimate without a query. On a CPU every batched call is checked for non-finite readings
        as it returns (and retried by the ledger). Elsewhere the M settings run without a host
        synchronisation and are checked once at the end; if a reading was non-finite, the
        estimate is taken again with the same directions and the per-call checks (the first
        attempt's queries stay counted)."""
        self.calls += 1
        theta = ledger.device.theta.detach()
        if (self.calls - 1) % self.every:
            if self.between == "last" and self._last is not None:
                return self._last.to(theta.device).clone()
            return torch.zeros_like(theta)
        device = theta.device
        if not self.defer_checks(device):
            ghat = self._estimate(ledger, x, g, y, check=True)
        else:
            generators = (self.generator_for(device), self.generator)  # the device's directions, a drawn seed
            states = [gen.get_state() for gen in generators]
            ghat = self._estimate(ledger, x, g, y, check=False)
            if not bool(torch.isfinite(ghat).all()):
                for gen, state in zip(generators, states, strict=True):
                    gen.set_state(state)
                ghat = self._estimate(ledger, x, g, y, check=True)
        if self.every > 1 and self.between == "last" and bool(torch.isfinite(ghat).all()):
            self._last = ghat.detach().clone()
        return ghat

    def _estimate(self, ledger: QueryLedger, x: Tensor, g: Tensor, y: Tensor | None, check: bool) -> Tensor:
        theta = ledger.device.theta.detach()
        batch, d_out = g.shape
        forward_g = g  # what the forward output's rows are weighted with for φ(θ)
        blank = 0.0  # every coefficient when there is nothing to measure
        if self.sketched and not bool(torch.isfinite(x).all() and torch.isfinite(g).all()):
            # no SVD of a non-finite batch: no query, and a non-finite ĝ, which the layer skips and counts
            # (as the unsketched estimate of such a batch comes out)
            probes, g, blank = x[:0], g[:0], math.nan
        elif self.sketched:
            probes, g = zo_sketch(x, g, self.batch_rank, self.batch_energy)  # (r, n), weights (r, m)
            unit = g / g.norm(dim=1, keepdim=True)  # G's top left singular vectors u_j (r, m)
            forward_g = (forward_g @ unit.T) @ unit  # the rows projected on them: φ_r(θ) = Σ_b ⟨y_b, P g_b⟩
        else:
            probes = zo_probes(x, g)  # (q, n)
        self.last_rank = probes.shape[0]
        flat = theta.reshape(-1)
        p = flat.numel()
        empty = not probes.shape[0]  # G = 0: every coefficient is `blank` without a query (directions still drawn)
        if not self.two_sided and not empty:  # φ(θ)
            if self.phi0_from_forward(ledger.device, batch, d_out, y is not None):
                phi0 = (y * forward_g).sum()
            else:
                phi0 = zo_phi(ledger.query(probes, "zo", theta=theta).unsqueeze(0), g)[0]
        if self.direction == "gaussian" and ledger.drawn_queries("zo"):
            phi0 = None if empty or self.two_sided else phi0
            return self._estimate_drawn(ledger, probes, g, phi0, blank if empty else None, check)
        self.last_seed = None
        chunk = self.chunk_for(p, probes.shape[0], x.shape[1], d_out, flat.device)
        u_buffer = torch.empty(chunk, p, dtype=flat.dtype, device=flat.device)
        settings = torch.empty(chunk, p, dtype=flat.dtype, device=flat.device)

        def phi_at(u: Tensor, step: float) -> Tensor:  # φ(θ + step·u_i) for the rows of u
            k = u.shape[0]
            perturbed = torch.add(flat, u, alpha=step, out=settings[:k]).view(k, *theta.shape)
            return zo_phi(ledger.query_settings(probes, perturbed, "zo", check=check), g)

        def coefficients(u: Tensor) -> Tensor:
            if empty:
                return torch.full((u.shape[0],), blank, dtype=u.dtype, device=u.device)
            plus = phi_at(u, self.mu)
            base = phi_at(u, -self.mu) if self.two_sided else phi0
            return zo_coefficients(plus, base, self.mu, self.two_sided)

        def drawn() -> Iterator[tuple[int, Tensor]]:  # (first index, directions) chunk by chunk
            for start in range(0, self.samples, chunk):
                yield start, self.directions(min(chunk, self.samples - start), p, flat.dtype, flat.device, u_buffer)

        if self.reducer is None:
            return zo_gradient(((coefficients(u), u) for _, u in drawn()), self.samples).view_as(theta)
        # data parallel: one collective for the M coefficients; a non-finite reading anywhere makes every
        # process's ĝ non-finite, so all of them agree on retrying or skipping the estimate
        gen = self.generator_for(flat.device)
        saved = gen.get_state()
        coefs = torch.empty(self.samples, dtype=flat.dtype, device=flat.device)
        for start, u in drawn():
            coefs[start : start + u.shape[0]] = coefficients(u)
        coefs = self.reducer(coefs)
        gen.set_state(saved)  # the same directions again
        pairs = ((coefs[start : start + u.shape[0]], u) for start, u in drawn())
        return zo_gradient(pairs, self.samples).view_as(theta)

    def _estimate_drawn(
        self, ledger: QueryLedger, probes: Tensor, g: Tensor, phi0: Tensor | None, blank: float | None, check: bool
    ) -> Tensor:
        """ĝ with the directions drawn on the device (module docstring): one seed from the generator,
        direction i = 0, …, M − 1 of it; the M coefficients measured chunk by chunk as inner
        products (``chunk_size``, or all M in one call for ``auto``: nothing per setting is stored
        but its φ), reduced over data-parallel processes when a reducer is set, then Σ c_i u_i formed
        from the seed on the device. ``blank``: nothing to measure, every coefficient is this value."""
        theta = ledger.device.theta.detach()
        seed = int(torch.randint(0, 2**62, (), generator=self.generator))  # one draw per estimate
        self.last_seed = seed
        coefs = torch.full((self.samples,), 0.0 if blank is None else blank, dtype=theta.dtype, device=theta.device)
        if blank is None:  # else G = 0 (or a non-finite batch): no query
            weights = zo_weights(g)
            chunk = self.samples if self.chunk_size == "auto" else int(self.chunk_size)
            for start in range(0, self.samples, chunk):
                k = min(chunk, self.samples - start)
                plus = ledger.query_drawn(probes, weights, seed, start, k, self.mu, "zo", check=check)
                if self.two_sided:
                    base = ledger.query_drawn(probes, weights, seed, start, k, -self.mu, "zo", check=check)
                else:
                    base = phi0
                coefs[start : start + k] = zo_coefficients(plus, base, self.mu, self.two_sided)
        if self.reducer is not None:  # one collective for the M coefficients, the directions from the seed
            coefs = self.reducer(coefs)
        elif blank is not None:
            return torch.full_like(theta, blank)
        return ledger.device.combine_drawn(seed, coefs).div_(self.samples).view_as(theta)

    def state_dict(self) -> dict:
        device_state = (
            self._device_generator.get_state() if self._device_generator is not None else self._pending_device_state
        )
        return {
            "generator": self.generator.get_state(),
            "device_generator": device_state,
            "calls": self.calls,
            "last": None if self._last is None else self._last.cpu(),
        }

    def load_state_dict(self, state: dict) -> None:
        """Restore :meth:`state_dict`; entries it does not write (from older versions) are ignored."""
        self.generator.set_state(state["generator"])
        self._device_generator, self._pending_device_state = None, state.get("device_generator")
        self.calls = int(state.get("calls", 0))  # absent in older checkpoints
        self._last = state.get("last")
