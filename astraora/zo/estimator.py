"""Zeroth-order estimate of ∇_θ φ(θ), φ(θ) = Σ_b ⟨A(θ) x_b, g_b⟩ = ⟨A(θ), Gᵀ X⟩_F (ALGORITHM.md §3).

    one-sided (paper):  ĝ = (1/M) Σ_i [(φ(θ + μ u_i) − φ(θ)) / μ] u_i
    two-sided:          ĝ = (1/M) Σ_i [(φ(θ + μ u_i) − φ(θ − μ u_i)) / (2μ)] u_i

The equations are the pure functions :func:`zo_probes`, :func:`zo_phi`, :func:`zo_coefficients` and
:func:`zo_gradient`; :class:`ZOEstimator` draws the directions, measures φ through the ledger in
chunks of ``chunk_size`` settings, schedules the estimates (``every``) and keeps the generator
state for checkpoints and the data-parallel redraw.
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
]

AUTO_CHUNK_FLOATS = 2**22  # ≈ 16 MB of float32 work per batched call with chunk_size="auto" on a CPU
AUTO_CHUNK_FLOATS_ACCELERATOR = 2**28  # ≈ 1 GB on a GPU: all M settings in one call for most layers


# --------------------------------------------------------------------------- the equations (§3)
def zo_probes(x: Tensor, g: Tensor) -> Tensor:
    """The inputs each φ(θ') is measured with, q = min(B, m) rows: the batch X (B, n) itself when
    B ≤ m, else the m rows of the compressed batch C = Gᵀ X (m, n)."""
    return g.T @ x if g.shape[0] > g.shape[1] else x


def zo_phi(outputs: Tensor, g: Tensor) -> Tensor:
    """φ(θ') for each of K settings from the outputs (K, q, m) of :func:`zo_probes`' rows at them:
    Σ_b ⟨y_b, g_b⟩ for the batch, tr(C A(θ')ᵀ) for the compressed batch (B > m)."""
    if g.shape[0] > g.shape[1]:
        return outputs.diagonal(dim1=-2, dim2=-1).sum(-1)
    return (outputs * g).sum((-2, -1))


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
        generator: draws the directions, one row at a time, so that the stream does not depend on
            ``chunk_size`` and can be redrawn from a saved generator state.

    The values are checked by :func:`~astraora.zo.validate_zo`.

    Data-parallel training (several processes, each with its own shard of the batch) sets
    :attr:`reducer`: a callable that returns the mean over the processes of a tensor. φ is a sum
    over the batch, so the per-process finite-difference coefficients average to the ones of the
    whole batch (each process's upstream gradient is that of its shard's mean loss). With a
    reducer the M coefficients are measured first, reduced in one collective (2M settings
    two-sided still give M coefficients), and the same directions are then redrawn from the saved
    generator state to form ĝ, so every process ends with the same ĝ (MeZO's shared seed: no
    p-sized vector is exchanged). Without one (a single process) nothing changes.
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
        self.generator = generator
        self._device_generator: torch.Generator | None = None  # directions on a GPU (generator_for)
        self._pending_device_state: Tensor | None = None  # its checkpointed state, until first used
        self.reducer: Callable[[Tensor], Tensor] | None = None  # mean over data-parallel processes
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

    def phi0_from_forward(self, device, batch: int, d_out: int, forward_output: bool) -> bool:
        """Whether φ(θ) is taken from the forward output: one-sided, ``reuse_forward``, a forward
        output given, and that output exactly what the ZO queries at θ measure
        (:meth:`Device.forward_output_gives_phi`; ``device`` None: an ideal device)."""
        if self.two_sided or not self.reuse_forward or not forward_output:
            return False
        return device is None or device.forward_output_gives_phi(batch > d_out)

    def queries_per_step(self, batch: int, d_out: int, device=None, forward_output: bool = True) -> int:
        """ZO queries for one measured estimate, as in ALGORITHM.md §5 (``forward_output``: whether
        the forward output y is passed to :meth:`estimate`; an estimate skipped by ``every`` makes
        none)."""
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
            state = self.generator_for(device).get_state()
            ghat = self._estimate(ledger, x, g, y, check=False)
            if not bool(torch.isfinite(ghat).all()):
                self.generator_for(device).set_state(state)
                ghat = self._estimate(ledger, x, g, y, check=True)
        if self.every > 1 and self.between == "last" and bool(torch.isfinite(ghat).all()):
            self._last = ghat.detach().clone()
        return ghat

    def _estimate(self, ledger: QueryLedger, x: Tensor, g: Tensor, y: Tensor | None, check: bool) -> Tensor:
        theta = ledger.device.theta.detach()
        batch, d_out = g.shape
        probes = zo_probes(x, g)  # (q, n)
        flat = theta.reshape(-1)
        p = flat.numel()
        if not self.two_sided:  # φ(θ)
            if self.phi0_from_forward(ledger.device, batch, d_out, y is not None):
                phi0 = (y * g).sum()
            else:
                phi0 = zo_phi(ledger.query(probes, "zo", theta=theta).unsqueeze(0), g)[0]
        chunk = self.chunk_for(p, probes.shape[0], x.shape[1], d_out, flat.device)
        u_buffer = torch.empty(chunk, p, dtype=flat.dtype, device=flat.device)
        settings = torch.empty(chunk, p, dtype=flat.dtype, device=flat.device)

        def phi_at(u: Tensor, step: float) -> Tensor:  # φ(θ + step·u_i) for the rows of u
            k = u.shape[0]
            perturbed = torch.add(flat, u, alpha=step, out=settings[:k]).view(k, *theta.shape)
            return zo_phi(ledger.query_settings(probes, perturbed, "zo", check=check), g)

        def coefficients(u: Tensor) -> Tensor:
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
        return zo_gradient(((coefs[start : start + u.shape[0]], u) for start, u in drawn()), self.samples).view_as(
            theta
        )

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
