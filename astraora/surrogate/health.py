"""The surrogate's health check: is Â still close enough to A(θ) for its input gradients?

Free in queries: every training forward already holds the batch's inputs X and readings
Y = X A(θ)ᵀ (ALGORITHM.md §4, "Health checks").

* :func:`batch_view`: the surrogate's error and the best rank-r error on the inputs a batch spans;
* :class:`SurrogateHealth`: the rules that decide from them when the surrogate is read out again
  (``surrogate.health_threshold`` and ``surrogate.health_growth``), and their state, which a
  checkpoint carries. The layer (:class:`astraora.hybrid.HybridLayer`) measures, sums over the
  data-parallel processes, and makes the readout.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import Tensor

from astraora.surrogate.validation import validate_surrogate


def cosine(a: Tensor, b: Tensor) -> float:
    """The cosine of the angle between ``a`` and ``b`` as flat vectors (in float64)."""
    return float(torch.nn.functional.cosine_similarity(a.reshape(1, -1).double(), b.reshape(1, -1).double()).item())


@torch.no_grad()
def batch_view(x: Tensor, y: Tensor, y_hat: Tensor, rank: int, rcond: float = 0.1) -> tuple[Tensor, Tensor] | None:
    """The surrogate's error and the best rank-r error, squared, on the inputs a batch spans, from
    the batch's inputs X (B, n), readings Y = X Aᵀ and the surrogate's outputs Ŷ = X Âᵀ. With
    X = U S Vᵀ (singular values above ``rcond`` × the largest: dividing by S amplifies the readings'
    noise, at most 1/rcond times), A V = Yᵀ U S⁻¹ exactly, so
    e² = ‖S⁻¹ Uᵀ (Y − Ŷ)‖² = ‖(Â − A) V‖² and b² = the squared singular values of A V beyond the
    r-th need no query. Where the batch spans every input (B ≥ n, all of X's singular values kept) they
    are the errors in the Frobenius norm; else those of A restricted to the batch's input subspace, which the
    batch's own conditioning (trained features are far from isotropic) does not weigh. U and S come
    from the smaller Gram matrix (X Xᵀ, or Xᵀ X with U S⁻¹ = X V S⁻², so Uᵀ M = S⁻¹ Vᵀ Xᵀ M).
    None where the batch cannot tell: it spans r or fewer inputs, the layer has r or fewer outputs,
    or A V has rank ≤ r to rounding."""
    rounding = 100 * torch.finfo(y.dtype).eps / rcond  # the readings' rounding, through S⁻¹
    x, y, residual = x.double(), y.double(), (y - y_hat).double()
    rows, n = x.shape
    if rows <= n:
        lam, basis = torch.linalg.eigh(x @ x.T)
        left_y, left_r = basis.T @ y, basis.T @ residual  # Uᵀ Y, Uᵀ R
        power = 0.5
    else:
        lam, basis = torch.linalg.eigh(x.T @ x)
        left_y, left_r = basis.T @ (x.T @ y), basis.T @ (x.T @ residual)  # Vᵀ Xᵀ Y = S Uᵀ Y
        power = 1.0
    if lam.numel() == 0 or not lam[-1] > 0:
        return None
    keep = lam > (rcond**2) * lam[-1]  # s > rcond · s_max
    if int(keep.sum()) <= rank or y.shape[1] <= rank:
        return None
    scale = lam[keep].pow(-power).unsqueeze(1)  # S⁻¹ (rows ≤ n) or S⁻² (rows > n)
    seen = scale * left_y[keep]  # (A V)ᵀ: (k, m)
    error = (scale * left_r[keep]).square().sum()
    tail = torch.linalg.svdvals(seen)[rank:].square().sum()
    if not tail > rounding**2 * seen.square().sum():
        return None
    return error, tail


class SurrogateHealth:
    """When a surrogate is read out again, from the residuals of the training batches.

    Args:
        threshold: ``surrogate.health_threshold``: read out when a batch's residual
            ‖Y − X Âᵀ‖/‖Y‖ exceeds it (None: off).
        growth: ``surrogate.health_growth``: read out when the surrogate's error over the best
            rank-r error (:func:`batch_view`), summed over the last :attr:`WINDOW` batches, exceeds
            (1 + growth) times that ratio first measured after the last full readout (None: off).
            Where batches cannot tell (:func:`batch_view` is None), the plain residual takes the
            ratio's place.

    One batch: :meth:`wants_view` (whether to compute the view at all), :meth:`sums` (this process's
    sums of squares), summed over the processes by the caller, then :meth:`decide` (True: read out
    now, and call :meth:`reset` after the readout).
    """

    # batches per health_growth ratio: sums over a few batches move less with the inputs one batch
    # happens to span (with fewer rows than inputs, each batch sees A on another subspace)
    WINDOW = 3

    def __init__(self, threshold: float | None = None, growth: float | None = None):
        validate_surrogate({"health_threshold": threshold, "health_growth": growth})
        self.threshold, self.growth = threshold, growth
        self.reference_residual: float | None = None  # the ratio of the first window after the last readout
        self.reference_kind: str | None = None  # "view": batch_view's ratio; "plain": ‖Y − X Âᵀ‖/‖Y‖
        self.window: list[list[float]] = []  # [numerator², denominator²] of the last WINDOW batches
        self.plain_run = 0  # plain batches in a row while the reference is a view
        self.rebuilds = 0  # full readouts these rules triggered
        self.last_residual: float | None = None  # the last batch's ‖Y − X Âᵀ‖/‖Y‖

    @property
    def active(self) -> bool:
        """Whether any rule is on (else a batch is measured only for the residual's log)."""
        return self.threshold is not None or self.growth is not None

    def wants_view(self, reads_out: Callable[[int], bool], step: int) -> bool:
        """Whether this batch's view is worth computing: ``health_growth`` is on and the window
        fills before the integrator's next full readout empties it (``reads_out(k)``: whether the
        k-th θ-update is one; ``step``: θ-updates so far). Never where every θ-update is a readout
        (``rebuild``). The same on every process (a function of the shared step)."""
        if self.growth is None:
            return False
        for k in range(1, self.WINDOW + 1):
            if reads_out(step + k):
                return len(self.window) + k >= self.WINDOW
        return True

    @torch.no_grad()
    def sums(self, x: Tensor, y: Tensor, y_hat: Tensor, rank: int, view: bool) -> Tensor:
        """This batch's [residual², ‖Y‖², error², best rank-r error², 1 where it has a view], in
        float64 on Y's device (the sums the processes add up), from the inputs X, the readings Y
        and the surrogate's outputs Ŷ = X Âᵀ; ``view``: compute :func:`batch_view` (else zeros)."""
        residual = (y - y_hat).square().sum().double()
        seen = batch_view(x, y, y_hat, rank) if view else None
        zero = residual.new_zeros(())
        return torch.stack(
            [
                residual,
                y.square().sum().double(),
                *(seen if seen is not None else (zero, zero)),
                residual.new_tensor(float(seen is not None)),
            ]
        )

    def decide(self, sq: Tensor, view: bool, world_size: int = 1) -> bool:
        """Whether the surrogate must be read out now, from the batch's :meth:`sums` (summed over
        the ``world_size`` processes, so that every process decides alike); ``view``: what
        :meth:`wants_view` said. A view counts only where every process had one."""
        self.last_residual = float(sq[0].sqrt() / sq[1].sqrt().clamp_min(1e-12))
        if self.threshold is not None and self.last_residual > self.threshold:
            self.rebuilds += 1
            return True
        if not view:
            return False
        return self._grown("view" if bool(sq[4]) and int(sq[4]) == world_size else "plain", sq)

    def _grown(self, kind: str, sq: Tensor) -> bool:
        """``health_growth``: the ratio over the last :attr:`WINDOW` batches (sums of squares, so
        one batch's luck moves it less) against the ratio of the first such window after the last
        readout. ``kind``: "view", the surrogate's error over the best rank-r error on the batch's
        inputs (:func:`batch_view`), or "plain", the residual over ‖Y‖, where a batch cannot tell."""
        if kind != self.reference_kind:
            self.plain_run = self.plain_run + 1 if kind == "plain" else 0
            if self.reference_kind == "view" and self.plain_run < self.WINDOW:
                return False  # a batch that cannot be compared with the window (a short last batch)
            # batches can no longer tell (or can again): start over with this kind
            self.window, self.reference_residual, self.reference_kind = [], None, kind
        self.plain_run = 0
        pair = [float(sq[2]), float(sq[3])] if kind == "view" else [float(sq[0]), float(sq[1])]
        self.window = [*self.window, pair][-self.WINDOW :]
        if len(self.window) < self.WINDOW:
            return False
        ratio = math.sqrt(sum(r for r, _ in self.window) / max(sum(f for _, f in self.window), 1e-300))
        if self.reference_residual is None:
            self.reference_residual = ratio
            return False
        if ratio > (1 + self.growth) * self.reference_residual:
            self.rebuilds += 1
            return True
        return False

    def reset(self) -> None:
        """After a full readout: ``health_growth`` measures its reference again."""
        self.reference_residual = self.reference_kind = None
        self.window, self.plain_run = [], 0

    # the layer's checkpoint keys (HybridLayer.get_extra_state), as saved since the rules were added
    def state_dict(self) -> dict:
        return {
            "reference_residual": self.reference_residual,
            "reference_kind": self.reference_kind,
            "health_window": self.window,
            "health_plain_run": self.plain_run,
            "health_rebuilds": self.rebuilds,
        }

    def load_state_dict(self, state: dict) -> None:
        """Reads the keys of :meth:`state_dict`; each may be absent (older checkpoints)."""
        self.reference_residual = state.get("reference_residual")
        # older checkpoints held a plain residual: a later batch with a view takes a new reference
        self.reference_kind = state.get("reference_kind", None if self.reference_residual is None else "plain")
        self.window = [list(pair) for pair in state.get("health_window", [])]
        self.plain_run = int(state.get("health_plain_run", 0))
        self.rebuilds = int(state.get("health_rebuilds", 0))
