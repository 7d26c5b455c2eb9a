"""Colored finite differences: the VJP ∇_θ φ for devices with one control per matrix entry.

Where entry A[i, j] depends only on the controls θ[i, j + o] for a few declared column offsets o
(:meth:`Device.jacobian_offsets`: (0,) for an SLM, an MRR bank or a matvec; (−1, 0, 1) with
thermal crosstalk between row neighbours), controls whose columns differ by a multiple of
k = max(o) − min(o) + 1 never move the same entry. Perturbing all controls of one such color
(column ≡ c mod k) at once and reading the matrix out in full therefore gives every entry's
derivative with respect to the one control of that color it depends on (Curtis, Powell and Reid's
grouping for sparse Jacobians). With C = Gᵀ X (m × n):

    D_c = (A(θ + μ·1_c) − A(θ)) / μ,    ∂φ/∂θ[i, j + o] += C[i, j] · D_c[i, j]  (j + o ≡ c mod k)

k settings plus the readout at θ (2k settings two-sided), n queries each (the identity's rows):
(k + 1)·n queries per estimate, independent of the batch. With ``reuse_readout`` (default) the
readout at θ is not repeated when the ledger still holds one (:meth:`QueryLedger.reading_at`):
the ``auto`` integrator reads A out in full after every θ-update, at the θ the next estimate
starts from, so that estimate costs k·n queries. It is exact up to O(μ) (O(μ²)
two-sided), where the random-direction estimator of ALGORITHM.md §3 carries a relative noise of
about √(p/M). It relies on the declared structure: a device whose controls also move other entries
(unmodelled crosstalk) gives a biased gradient, so it is refused for devices that declare none.

The equations are the pure functions :func:`color_masks`, :func:`colored_derivatives` and
:func:`colored_gradient`; :class:`ColoredEstimator` measures the settings through the ledger and
reuses its last readout.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

from astraora.choices import COLORED
from astraora.errors import ConfigError
from astraora.ledger import QueryLedger
from astraora.zo.validation import validate_zo


# --------------------------------------------------------------------------- the equations (§9)
def color_masks(k: int, m: int, n: int, dtype: torch.dtype, device: torch.device | str = "cpu") -> Tensor:
    """1_c for the k colors (k, m, n): 1 at the controls of color c (column ≡ c mod k), else 0."""
    column = torch.arange(n, device=device)
    return torch.stack([(column % k == c).to(dtype).expand(m, n) for c in range(k)])


def colored_derivatives(plus: Tensor, base: Tensor, mu: float, two_sided: bool) -> Tensor:
    """D_c = (A(θ + μ·1_c) − A(θ)) / μ one-sided (``base`` = A(θ)), (A(θ + μ·1_c) − A(θ − μ·1_c)) / (2μ)
    two-sided (``base`` = the A(θ − μ·1_c)), for the k colors (k, m, n)."""
    if two_sided:
        return (plus - base) / (2 * mu)
    return (plus - base) / mu


def colored_gradient(c: Tensor, derivatives: Tensor, offsets: tuple[int, ...]) -> Tensor:
    """∂φ/∂θ[i, j + o] = Σ_c C[i, j] · D_c[i, j] over j + o ≡ c (mod k), for C = Gᵀ X (m, n), the
    derivatives D (k, m, n) of :func:`colored_derivatives` and the device's column offsets o. Shape
    (m, n), dtype of C."""
    k, m, n = derivatives.shape
    column = torch.arange(n, device=derivatives.device)
    terms = c * derivatives  # (k, m, n): C[i, j] · ∂A[i, j]/∂θ[i, j + o], o by color
    ghat = torch.zeros(m, n, dtype=c.dtype, device=c.device)
    for color in range(k):
        for o in offsets:
            cols = column[((column + o) % k == color) & (column + o >= 0) & (column + o < n)]
            ghat[:, cols + o] += terms[color][:, cols]
    return ghat


# --------------------------------------------------------------------------- the estimator
class ColoredEstimator:
    """Colored finite-difference VJP for entry-wise devices (``zo=colored``).

    Args:
        mu: finite-difference step μ.
        two_sided: central differences (2k settings) instead of one-sided (k + 1 settings).
        reuse_readout: one-sided, take A(θ) from the ledger's last full readout when it is still a
            reading of A(θ) (taken at this θ, same drift, same non-idealities in view) instead of
            reading it again: k settings instead of k + 1. False reproduces the (k + 1)·n count.

    The random-direction keys of the zo group (``samples``, ``chunk_size``, ...) are accepted and
    unused, so that ``zo.direction=colored`` works on top of any zo group; ``every`` must be 1 (the
    values are checked by :func:`~astraora.zo.validate_zo`). Same interface as
    :class:`~astraora.zo.ZOEstimator` (``estimate``, ``queries_per_step``, ``state_dict``, ``reducer``).
    With data-parallel training the estimate, linear in each process's share of C, is averaged over
    the processes by ``reducer``.
    """

    direction = COLORED

    def __init__(
        self, mu: float = 1e-4, two_sided: bool = False, reuse_readout: bool = True, **random_direction_settings
    ):
        validate_zo(
            random_direction_settings
            | {"direction": COLORED, "mu": mu, "two_sided": two_sided, "reuse_readout": reuse_readout}
        )
        self.mu, self.two_sided, self.reuse_readout = float(mu), bool(two_sided), bool(reuse_readout)
        self.reducer: Callable[[Tensor], Tensor] | None = None
        self.last_samples = 0  # settings measured by the last estimate (the colors)

    @property
    def reuses_readout(self) -> bool:
        """Whether estimates take A(θ) from the ledger's last readout (one-sided with ``reuse_readout``)."""
        return self.reuse_readout and not self.two_sided

    @staticmethod
    def offsets_of(device) -> tuple[int, ...]:
        """The device's declared column offsets, or a ConfigError naming the key when it has none."""
        offsets = getattr(device, "jacobian_offsets", lambda: None)()
        if not offsets:
            raise ConfigError(
                f"zo.direction=colored needs a device with one control per matrix entry (device.family matvec, slm or "
                f"mrr, with row-neighbour crosstalk at most); {type(device).__name__} declares no such structure: "
                "use zo=gaussian."
            )
        return tuple(int(o) for o in offsets)

    @staticmethod
    def colors(offsets: tuple[int, ...]) -> int:
        return max(offsets) - min(offsets) + 1

    def queries_per_step(self, batch: int, d_out: int, device=None, forward_output: bool = True) -> int:
        """(k + 1)·n one-sided, 2k·n two-sided, for the device's k colors and n inputs: the count
        when no earlier readout can be reused (with one, k·n one-sided)."""
        k = self.colors(self.offsets_of(device))
        return (2 * k if self.two_sided else k + 1) * device.d_in

    @torch.no_grad()
    def estimate(self, ledger: QueryLedger, x: Tensor, g: Tensor, y: Tensor | None = None) -> Tensor:
        """ĝ ≈ ∇_θ Σ_b ⟨A(θ) x_b, g_b⟩ for inputs x (B, n) and upstream gradients g (B, m)."""
        device = ledger.device
        offsets = self.offsets_of(device)
        k = self.colors(offsets)
        theta = device.theta.detach()
        m, n = theta.shape
        eye = torch.eye(n, dtype=theta.dtype, device=theta.device)
        masks = color_masks(k, m, n, theta.dtype, theta.device)  # (k, m, n)

        def matrices(settings: Tensor) -> Tensor:  # (K, m, n) settings → (K, m, n) matrices
            return ledger.query_settings(eye, settings, "zo").transpose(-2, -1)

        if self.two_sided:
            plus = matrices(theta + self.mu * masks)
            base = matrices(theta - self.mu * masks)
            self.last_samples = 2 * k
        else:
            reading = ledger.reading_at(theta, "zo") if self.reuses_readout else None
            if reading is None:
                both = matrices(torch.cat([theta.unsqueeze(0), theta + self.mu * masks]))
                base, plus = both[:1], both[1:]
            else:
                base, plus = reading.to(theta.dtype).unsqueeze(0), matrices(theta + self.mu * masks)
            self.last_samples = k + (reading is None)
        deriv = colored_derivatives(plus, base, self.mu, self.two_sided)
        ghat = colored_gradient((g.T @ x).to(theta.dtype), deriv, offsets)
        if self.reducer is not None:
            ghat = self.reducer(ghat)
        return ghat

    def state_dict(self) -> dict:
        return {}  # no generator, no schedule: nothing to resume

    def load_state_dict(self, state: dict) -> None:
        pass
