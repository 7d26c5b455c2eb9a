"""Zeroth-order estimate of ∇_θ φ(θ), φ(θ) = Σ_b ⟨A(θ) x_b, g_b⟩ = ⟨A(θ), Gᵀ X⟩_F (ALGORITHM.md §3).

    one-sided (paper):  ĝ = (1/M) Σ_i [(φ(θ + μ u_i) − φ(θ)) / μ] u_i
    two-sided:          ĝ = (1/M) Σ_i [(φ(θ + μ u_i) − φ(θ − μ u_i)) / (2μ)] u_i

Each φ(θ') is measured with q = min(B, m) queries at θ': the batch X itself when B ≤ m, or the
m rows of C = Gᵀ X when B > m (the compressed batch, φ = tr(C A(θ')ᵀ)). The M perturbed settings
are evaluated as batched tensor work in chunks of ``chunk_size`` settings, through the ledger.

Query-efficiency options (ALGORITHM.md §9), all off by default: orthogonal directions, antithetic
pairs, a guided subspace, layer-wise (coordinate-block) directions, an adaptive M and an estimate
only every k-th step. Directions are always drawn row by row from the generator (an orthogonal
block from the rows of its Gaussian block), so the stream does not depend on ``chunk_size`` and
can be redrawn from a saved generator state.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import Tensor

from astraora.errors import ConfigError
from astraora.ledger import QueryLedger

DIRECTIONS = ("gaussian", "rademacher", "sphere")
BETWEEN = ("momentum", "last")
AUTO_CHUNK_FLOATS = 2**22  # ≈ 16 MB of float32 work per batched call with chunk_size="auto" on a CPU
AUTO_CHUNK_FLOATS_ACCELERATOR = 2**28  # ≈ 1 GB on a GPU: all M settings in one call for most layers


class _DirectionStream:
    """The directions of one estimate, served in order: ``take(k)`` returns the next k rows.

    Rows are drawn from the generator one at a time whatever k is, so any chunking gives the same
    stream; orthogonal blocks are made from a block of such rows, antithetic pairs repeat a base
    row negated, the guided part mixes in a fixed basis Q of the last estimates."""

    def __init__(self, zo: ZOEstimator, p: int, dtype: torch.dtype, device: torch.device, basis: Tensor | None):
        self.zo, self.p, self.dtype, self.device = zo, p, dtype, device
        self.gen = zo.generator_for(device)
        self.basis = basis  # (p, k') orthonormal, or None
        self.block: Tensor | None = None  # orthogonal rows not yet served
        self.pending: Tensor | None = None  # the negated twin of the last antithetic base row
        b = zo.blocks  # sizes of the coordinate blocks, as tensor_split cuts p (the first p mod b one longer)
        self.block_sizes = [p // b + (i < p % b) for i in range(b)]

    def _plain(self, length: int) -> Tensor:
        return self.zo.directions(1, length, self.dtype, self.device)[0]

    def _base(self) -> Tensor:
        zo = self.zo
        if zo.blocks > 1:  # one coordinate block per direction, scaled by √(blocks): E[u uᵀ] = I
            b = int(torch.randint(0, zo.blocks, (), generator=self.gen, device=self.device))
            row = torch.zeros(self.p, dtype=self.dtype, device=self.device)
            start = sum(self.block_sizes[:b])
            row[start : start + self.block_sizes[b]] = math.sqrt(zo.blocks) * self._plain(self.block_sizes[b])
            return row
        if not zo.orthogonal:
            return self._plain(self.p)
        if self.block is None or len(self.block) == 0:
            size = min(zo.base_rows, self.p)
            rows = torch.stack([self._plain(self.p) for _ in range(size)])  # (b, p) Gaussian or sphere rows
            q, r = torch.linalg.qr(rows.T.double())
            q = q * torch.sign(torch.diagonal(r)).where(
                torch.diagonal(r) != 0, torch.ones((), dtype=q.dtype, device=q.device)
            )
            # same lengths as the independent rows (Gaussian: χ_p; sphere: √p), orthogonal directions
            self.block = (q.T * rows.double().norm(dim=1, keepdim=True)).to(self.dtype)
        row, self.block = self.block[0], self.block[1:]
        return row

    def _next(self) -> Tensor:
        if self.pending is not None:
            row, self.pending = self.pending, None
            return row
        row = self._base()
        if self.basis is not None:  # u = √α ε + √((1 − α) p / k) Q η: E[u uᵀ] = α I + (1 − α)(p/k) Q Qᵀ
            k = self.basis.shape[1]
            eta = torch.randn(k, generator=self.gen, dtype=self.dtype, device=self.device)
            alpha = 1.0 - self.zo.guided_weight
            row = math.sqrt(alpha) * row + math.sqrt((1 - alpha) * self.p / k) * (self.basis @ eta)
        if self.zo.antithetic:
            self.pending = -row
        return row

    def save(self) -> tuple:
        """Everything the rest of the stream depends on: generator state, unserved rows."""
        return (
            self.gen.get_state(),
            None if self.block is None else self.block.clone(),
            None if self.pending is None else self.pending.clone(),
        )

    def restore(self, saved: tuple) -> None:
        self.gen.set_state(saved[0])
        self.block, self.pending = saved[1], saved[2]

    def take(self, k: int, out: Tensor | None = None) -> Tensor:
        if self.zo.plain:  # the paper's i.i.d. rows, drawn in one call
            return self.zo.directions(k, self.p, self.dtype, self.device, out=out)
        u = torch.empty(k, self.p, dtype=self.dtype, device=self.device) if out is None else out[:k]
        for row in u:
            row.copy_(self._next())
        return u


class ZOEstimator:
    """Stochastic zeroth-order VJP estimator.

    Args:
        samples: M, number of random directions (the most, with ``adaptive_rse``).
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
        orthogonal: directions in blocks of min(M, p) mutually orthogonal rows (each with the
            length of an independent draw: E[u uᵀ] = I still holds); gaussian or sphere only.
        antithetic: directions in pairs u, −u (M even); the pair's two one-sided terms make one
            central difference, so φ(θ) is never needed.
        guided_k: k > 0 mixes in the span Q of the last k estimates (guided evolution strategies):
            u = √(1 − w) ε + √(w p / k) Q η, E[u uᵀ] = Σ = (1 − w) I + w (p/k) Q Qᵀ, so E[ĝ] = Σ ∇φ
            (a descent direction, not ∇φ itself).
        guided_weight: w, the share of each direction's expected squared length in the subspace.
        blocks: > 1 perturbs one of that many contiguous blocks of θ per direction (for meshes:
            a block of columns), scaled by √blocks so that E[u uᵀ] = I.
        adaptive_rse: if set, draw directions in rounds of ``min_samples`` and stop after the first
            round where the relative standard error of ĝ, √(Σ‖c_i u_i − ĝ‖² / (M(M − 1))) / ‖ĝ‖,
            is at most this (or M reached ``samples``).
        min_samples: the first round (and each further round) of the adaptive M.
        every: estimate on every k-th call only; in between no query is made and θ gets a zero
            gradient (``between="momentum"``: the optimizer's moments carry θ on) or the last
            estimate again (``"last"``).
        generator: draws the directions.

    Data-parallel training (several processes, each with its own shard of the batch) sets
    :attr:`reducer`: a callable that returns the mean over the processes of a tensor. φ is a sum
    over the batch, so the per-process finite-difference coefficients average to the ones of the
    whole batch (each process's upstream gradient is that of its shard's mean loss). With a
    reducer the coefficients of each round are measured first, reduced in one collective (2M
    settings two-sided still give M coefficients), and the same directions are then redrawn from
    the saved generator state to form ĝ, so every process ends with the same ĝ (MeZO's shared
    seed: no p-sized vector is exchanged). Without one (a single process) nothing changes.
    """

    def __init__(
        self,
        samples: int = 100,
        mu: float = 1e-4,
        direction: str = "gaussian",
        two_sided: bool = False,
        reuse_forward: bool = True,
        chunk_size: int | str = "auto",
        orthogonal: bool = False,
        antithetic: bool = False,
        guided_k: int = 0,
        guided_weight: float = 0.5,
        blocks: int = 1,
        adaptive_rse: float | None = None,
        min_samples: int = 10,
        every: int = 1,
        between: str = "momentum",
        *,
        generator: torch.Generator,
    ):
        if int(samples) < 1:
            raise ConfigError(f"zo.samples={samples} must be >= 1.")
        if not mu > 0:
            raise ConfigError(f"zo.mu={mu} must be > 0.")
        if direction not in DIRECTIONS:
            raise ConfigError(f"zo.direction={direction!r} is not allowed; choose one of {DIRECTIONS}.")
        if chunk_size != "auto" and (isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1):
            raise ConfigError(f"zo.chunk_size={chunk_size!r} must be 'auto' or an integer >= 1.")
        if orthogonal and direction == "rademacher":
            raise ConfigError("zo.orthogonal=true is not allowed with zo.direction=rademacher; use gaussian or sphere.")
        if antithetic and two_sided:
            raise ConfigError(
                "zo.antithetic=true is not allowed with zo.two_sided=true (a pair already is a central difference)."
            )
        if antithetic and int(samples) % 2:
            raise ConfigError(f"zo.samples={samples} must be even with zo.antithetic=true.")
        if int(guided_k) < 0:
            raise ConfigError(f"zo.guided_k={guided_k} must be >= 0 (0 = off).")
        if not 0 < float(guided_weight) < 1:
            raise ConfigError(f"zo.guided_weight={guided_weight} must be between 0 and 1 (exclusive).")
        if int(blocks) < 1:
            raise ConfigError(f"zo.blocks={blocks} must be >= 1 (1 = off).")
        if int(blocks) > 1 and (orthogonal or int(guided_k)):
            raise ConfigError(f"zo.blocks={blocks} is not allowed with zo.orthogonal or zo.guided_k; use one of them.")
        if adaptive_rse is not None and not float(adaptive_rse) > 0:
            raise ConfigError(f"zo.adaptive_rse={adaptive_rse} must be > 0 or null (off).")
        if adaptive_rse is not None and (
            not 1 <= int(min_samples) <= int(samples) or (antithetic and int(min_samples) % 2)
        ):
            raise ConfigError(
                f"zo.min_samples={min_samples} must be between 1 and zo.samples={samples}"
                f"{' and even with zo.antithetic=true' if antithetic else ''}."
            )
        if int(every) < 1:
            raise ConfigError(f"zo.every={every} must be >= 1.")
        if between not in BETWEEN:
            raise ConfigError(f"zo.between={between!r} is not allowed; choose one of {BETWEEN}.")
        self.samples, self.mu, self.direction = int(samples), float(mu), direction
        self.two_sided, self.reuse_forward, self.chunk_size = bool(two_sided), bool(reuse_forward), chunk_size
        self.orthogonal, self.antithetic, self.blocks = bool(orthogonal), bool(antithetic), int(blocks)
        self.guided_k, self.guided_weight = int(guided_k), float(guided_weight)
        self.adaptive_rse = None if adaptive_rse is None else float(adaptive_rse)
        self.min_samples, self.every, self.between = int(min_samples), int(every), between
        self.generator = generator
        self._device_generator: torch.Generator | None = None  # directions on a GPU (generator_for)
        self._pending_device_state: Tensor | None = None  # its checkpointed state, until first used
        self.reducer: Callable[[Tensor], Tensor] | None = None  # mean over data-parallel processes
        self.calls = 0  # estimate() calls, for ``every``
        self.last_samples = 0  # M of the last measured estimate (adaptive M)
        self.history: list[Tensor] = []  # the last guided_k estimates (flat)
        self._last: Tensor | None = None  # the last estimate, for between="last"

    @property
    def plain(self) -> bool:
        """No direction option: the paper's i.i.d. directions."""
        return not (self.orthogonal or self.antithetic or self.guided_k or self.blocks > 1)

    @property
    def base_rows(self) -> int:
        """Independent rows per estimate (antithetic pairs share one): the orthogonal block size."""
        return self.samples // 2 if self.antithetic else self.samples

    def chunk_for(self, p: int, rows: int, d_in: int, d_out: int, device: torch.device | str = "cpu") -> int:
        """Settings per batched call: the configured size, or for ``auto`` as many as keep one
        p-sized copy of θ and the rows in and out (rows · (n + m) each) per setting within the
        work budget of the device (``AUTO_CHUNK_FLOATS`` on a CPU, ``AUTO_CHUNK_FLOATS_ACCELERATOR``
        elsewhere)."""
        if self.chunk_size != "auto":
            chunk = int(self.chunk_size)
        else:
            budget = AUTO_CHUNK_FLOATS if torch.device(device).type == "cpu" else AUTO_CHUNK_FLOATS_ACCELERATOR
            chunk = max(1, min(self.samples, budget // (p + rows * (d_in + d_out))))
        return max(2, chunk - chunk % 2) if self.antithetic else chunk  # a pair never straddles two calls

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

    def guide_basis(self, dtype: torch.dtype, device: torch.device) -> Tensor | None:
        """Q (p, k'), an orthonormal basis of the last k' ≤ guided_k estimates (None: none yet)."""
        if not self.guided_k or not self.history:
            return None
        q, r = torch.linalg.qr(torch.stack(self.history, dim=1).to(device=device, dtype=torch.float64))
        keep = torch.diagonal(r).abs() > 1e-12 * torch.diagonal(r).abs().max().clamp_min(1e-300)
        return q[:, keep].to(dtype) if bool(keep.any()) else None

    def stream(self, p: int, dtype: torch.dtype, device: torch.device | str = "cpu") -> _DirectionStream:
        """The directions of one estimate, in order (``stream.take(k)``)."""
        return _DirectionStream(self, p, dtype, torch.device(device), self.guide_basis(dtype, torch.device(device)))

    def phi0_from_forward(self, device, batch: int, d_out: int, forward_output: bool) -> bool:
        """Whether φ(θ) is taken from the forward output: one-sided, ``reuse_forward``, a forward
        output given, and that output exactly what the ZO queries at θ measure
        (:meth:`Device.forward_output_gives_phi`; ``device`` None: an ideal device)."""
        if self.two_sided or not self.reuse_forward or not forward_output:
            return False
        return device is None or device.forward_output_gives_phi(batch > d_out)

    def queries_per_step(
        self, batch: int, d_out: int, device=None, forward_output: bool = True, samples: int | None = None
    ) -> int:
        """ZO queries for one measured estimate, as in ALGORITHM.md §5 and §9 (``forward_output``:
        whether the forward output y is passed to :meth:`estimate`; ``samples``: the M it used,
        default ``samples``; an estimate skipped by ``every`` makes none)."""
        q = min(batch, d_out)
        samples = self.samples if samples is None else int(samples)
        settings = 2 * samples if self.two_sided else samples
        requery = self.needs_phi0() and not self.phi0_from_forward(device, batch, d_out, forward_output)
        return q * (settings + int(requery))

    def needs_phi0(self) -> bool:
        """Whether φ(θ) enters the estimate: one-sided differences without antithetic pairs."""
        return not self.two_sided and not self.antithetic

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
        self._remember(ghat)
        return ghat

    def _remember(self, ghat: Tensor) -> None:
        """Keep what later estimates use: the guided subspace's history, the estimate for
        ``between="last"`` (finite estimates only)."""
        if not (self.guided_k or (self.every > 1 and self.between == "last")):
            return
        if not bool(torch.isfinite(ghat).all()):
            return
        if self.guided_k:
            self.history = (self.history + [ghat.detach().reshape(-1).clone()])[-self.guided_k :]
        if self.every > 1 and self.between == "last":
            self._last = ghat.detach().clone()

    def _estimate(self, ledger: QueryLedger, x: Tensor, g: Tensor, y: Tensor | None, check: bool) -> Tensor:
        theta = ledger.device.theta.detach()
        batch, d_out = g.shape
        compressed = batch > d_out
        probes = g.T @ x if compressed else x  # (q, n)

        def phi(outputs: Tensor) -> Tensor:  # outputs (K, q, m) → φ per setting (K,)
            if compressed:
                return outputs.diagonal(dim1=-2, dim2=-1).sum(-1)
            return (outputs * g).sum((-2, -1))

        if self.needs_phi0():
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
        stream = self.stream(p, flat.dtype, flat.device)

        def coefficients(u: Tensor) -> Tensor:
            k = u.shape[0]
            plus = phi(
                ledger.query_settings(
                    probes, torch.add(flat, u, alpha=self.mu, out=settings[:k]).view(k, *theta.shape), "zo", check=check
                )
            )
            if self.two_sided:
                minus = phi(
                    ledger.query_settings(
                        probes,
                        torch.add(flat, u, alpha=-self.mu, out=settings[:k]).view(k, *theta.shape),
                        "zo",
                        check=check,
                    )
                )
                return (plus - minus) / (2 * self.mu)
            if self.antithetic:  # rows (0, 1), (2, 3), ... are u, −u: each pair is one central difference
                d = (plus[0::2] - plus[1::2]) / (2 * self.mu)
                return torch.stack([d, -d], dim=1).reshape(-1)
            return (plus - phi0) / self.mu

        round_size = self.min_samples if self.adaptive_rse is not None else self.samples
        done, unit_sq = 0, torch.zeros((), dtype=torch.float64, device=flat.device)
        while done < self.samples:
            size = min(round_size, self.samples - done)
            if self.reducer is not None:
                saved = stream.save()
                coefs = torch.empty(size, dtype=flat.dtype, device=flat.device)
            for start in range(0, size, chunk):
                k = min(chunk, size - start)
                u = stream.take(k, out=u_buffer)
                coef = coefficients(u)
                if self.reducer is not None:
                    coefs[start : start + k] = coef
                else:
                    ghat.addmv_(u.T, coef)  # ĝ += Σ_i coef_i u_i
                    if self.adaptive_rse is not None:
                        unit_sq += (coef.double().square() * u.double().square().sum(1)).sum()
            if self.reducer is not None:
                # one collective per round; a non-finite reading anywhere makes every process's ĝ
                # non-finite, so all of them agree on retrying or skipping the estimate
                coefs = self.reducer(coefs)
                stream.restore(saved)
                for start in range(0, size, chunk):
                    k = min(chunk, size - start)
                    u = stream.take(k, out=u_buffer)
                    ghat.addmv_(u.T, coefs[start : start + k])
                    if self.adaptive_rse is not None:
                        unit_sq += (coefs[start : start + k].double().square() * u.double().square().sum(1)).sum()
            done += size
            if self.adaptive_rse is not None and done < self.samples:
                rse = self.relative_standard_error(ghat, unit_sq, done)
                if rse is not None and rse <= self.adaptive_rse:
                    break
        self.last_samples = done
        return (ghat / done).view_as(theta)

    def relative_standard_error(self, ghat_sum: Tensor, unit_sq: Tensor, samples: int) -> float | None:
        """√(Σ‖w_j − w̄‖² / (N(N − 1))) / ‖w̄‖ over the N independent units w_j (a term c_i u_i, or
        an antithetic pair's two terms together), from Σ_j ‖w_j‖² and Σ_j w_j = ĝ_sum; None
        below two units."""
        units = samples // 2 if self.antithetic else samples
        if units < 2:
            return None
        sq = float(unit_sq) * (2 if self.antithetic else 1)  # a pair's ‖2 d u‖² = 2 (d²‖u‖² + d²‖u‖²)
        mean_sq = float(ghat_sum.double().square().sum()) / units**2
        var = max(sq - units * mean_sq, 0.0) / (units * (units - 1))
        return math.sqrt(var / mean_sq) if mean_sq > 0 else math.inf

    def state_dict(self) -> dict:
        device_state = (
            self._device_generator.get_state() if self._device_generator is not None else self._pending_device_state
        )
        return {
            "generator": self.generator.get_state(),
            "device_generator": device_state,
            "calls": self.calls,
            "history": [h.cpu() for h in self.history],
            "last": None if self._last is None else self._last.cpu(),
        }

    def load_state_dict(self, state: dict) -> None:
        self.generator.set_state(state["generator"])
        self._device_generator, self._pending_device_state = None, state.get("device_generator")
        self.calls = int(state.get("calls", 0))  # absent in older checkpoints
        self.history = list(state.get("history", []))
        self._last = state.get("last")
