"""Devices whose matrix has one control parameter per entry: matvec, SLM, MRR weight bank."""

from __future__ import annotations

import math

import torch
from torch import Tensor

from astraora.devices.base import Device, dense_transfer
from astraora.errors import ConfigError


class EntrywiseDevice(Device):
    """A device with one control per matrix entry: θ has A's shape (m, n) and A[i, j] is a function
    of θ[i, j] alone, or with thermal crosstalk (θ' = θ + c·(row neighbours), the base class's
    :meth:`~Device.neighbour_sum`) of θ[i, j − 1 .. j + 1]."""

    def theta_shape(self) -> tuple[int, ...]:
        return (self.d_out, self.d_in)

    def jacobian_offsets(self) -> tuple[int, ...] | None:
        if not self.nonideal.crosstalk:
            return (0,)
        if type(self).neighbour_sum is Device.neighbour_sum:  # row neighbours: one entry each side
            return (-1, 0, 1)
        return None  # neighbours of a subclass's own: not declared


class MatVec(EntrywiseDevice):
    """Unconstrained reference black box: θ are the m·n entries of A (not phases)."""

    is_phase_device = False

    def __init__(self, d_in: int, d_out: int, *, init_std: float | None = None, **kwargs):
        self.init_std = init_std
        super().__init__(d_in, d_out, **kwargs)

    def init_theta(self, generator: torch.Generator) -> Tensor:
        std = self.init_std if self.init_std is not None else 1.0 / math.sqrt(self.d_in)
        return torch.randn(self.theta_shape(), generator=generator) * std

    def transfer(self, theta: Tensor, x: Tensor) -> Tensor:
        return dense_transfer(theta, x)


class SLM(EntrywiseDevice):
    """Phase-only spatial light modulator with real-part readout: A = cos(θ)/√n.

    θ ∈ R^{m×n}, initialised uniformly on [π/2 − init_halfwidth, π/2 + init_halfwidth].
    """

    def __init__(
        self, d_in: int, d_out: int, *, init_center: float = math.pi / 2, init_halfwidth: float = 0.1, **kwargs
    ):
        self.init_center, self.init_halfwidth = float(init_center), float(init_halfwidth)
        super().__init__(d_in, d_out, **kwargs)

    def init_theta(self, generator: torch.Generator) -> Tensor:
        u = torch.rand(self.theta_shape(), generator=generator)
        return self.init_center + self.init_halfwidth * (2 * u - 1)

    def transfer(self, theta: Tensor, x: Tensor) -> Tensor:
        return dense_transfer(torch.cos(theta) / math.sqrt(self.d_in), x)


def mrr_transmission(phi: Tensor, loss: float, coupling: float) -> Tensor:
    """Field transmission of an all-pass microring:
    t(φ) = sqrt((a² + r² − 2ar cos φ) / (1 + a²r² − 2ar cos φ))."""
    a, r = loss, coupling
    cos_phi = torch.cos(phi)
    return torch.sqrt((a * a + r * r - 2 * a * r * cos_phi) / (1 + a * a * r * r - 2 * a * r * cos_phi))


class MRRBank(EntrywiseDevice):
    """All-pass microring weight bank: θ = round-trip phases φ ∈ R^{m×n}, A = 2·t(φ) − 1.

    Args:
        loss: round-trip amplitude transmission a (paper: 0.8).
        coupling: self-coupling coefficient r (paper: 0.9).
        init_low, init_high: φ ~ U[init_low, init_high]. The paper's range is [0.01, π/4]; its
            weights average 0.47 (a = 0.8, r = 0.9): a common mode (6.5× the next singular value
            of a 128 × 64 bank) that the digital layers around it cannot undo.
            ``init_high="auto"`` (the default) is the upper end at which the weights average zero
            for this bank's a and r (0.25 rad for the paper's; docs/archive/PARITY.md, "The MRR bank's
            initial weights").
    """

    def __init__(
        self,
        d_in: int,
        d_out: int,
        *,
        loss: float = 0.8,
        coupling: float = 0.9,
        init_low: float = 0.01,
        init_high: float | str = "auto",
        **kwargs,
    ):
        if not (0 < loss <= 1 and 0 < coupling < 1):
            raise ConfigError(f"device.loss={loss} must be in (0, 1] and device.coupling={coupling} in (0, 1).")
        self.loss, self.coupling = float(loss), float(coupling)
        if init_high == "auto":
            if not 0 <= init_low < math.pi:
                raise ConfigError(f"device.init_high=auto needs device.init_low in [0, π), got {init_low}.")
            init_high = zero_mean_init_high(float(init_low), self.loss, self.coupling)
        elif isinstance(init_high, str):
            raise ConfigError(f"device.init_high={init_high!r} must be a number or 'auto'.")
        if init_high < init_low:
            raise ConfigError(f"device.init_high={init_high} must be >= device.init_low={init_low}.")
        self.init_low, self.init_high = float(init_low), float(init_high)
        super().__init__(d_in, d_out, **kwargs)

    def init_theta(self, generator: torch.Generator) -> Tensor:
        u = torch.rand(self.theta_shape(), generator=generator)
        return self.init_low + (self.init_high - self.init_low) * u

    def weight_range(self) -> tuple[float, float]:
        """[2·t_min − 1, 2·t_max − 1]: t is smallest at φ = 0 and largest at φ = π."""
        w = mrr_weight(torch.tensor([0.0, math.pi], dtype=torch.float64), self.loss, self.coupling)
        return float(w[0]), float(w[1])

    def transfer(self, theta: Tensor, x: Tensor) -> Tensor:
        return dense_transfer(mrr_weight(theta, self.loss, self.coupling), x)


def mrr_weight(phi: Tensor, loss: float, coupling: float) -> Tensor:
    """The bank's weight of a ring at round-trip phase φ: 2·t(φ) − 1."""
    return 2 * mrr_transmission(phi, loss, coupling) - 1


def mrr_mean_weight(low: float, high: float, loss: float, coupling: float, points: int = 4097) -> float:
    """E[2·t(φ) − 1] for φ ~ U[low, high], high > low (Simpson's rule in float64)."""
    phi = torch.linspace(low, high, points, dtype=torch.float64)
    w = mrr_weight(phi, loss, coupling)
    simpson = torch.ones(points, dtype=torch.float64)
    simpson[1:-1:2], simpson[2:-1:2] = 4.0, 2.0
    return float((w * simpson).sum() / (3 * (points - 1)))


def zero_mean_init_high(low: float, loss: float, coupling: float) -> float:
    """The upper end h ∈ (low, π] of φ ~ U[low, h] at which the bank's weights average zero.

    The weight rises monotonically from its resonance minimum at φ = 0 to its maximum at π, so the
    mean over [low, h] rises with h and the zero is found by bisection. A bank whose weights are
    all positive from ``low`` on (weak resonance), or average below zero even over [low, π], has
    no such h: a ConfigError asks for a number.
    """
    lo_mean = float(mrr_weight(torch.tensor(low, dtype=torch.float64), loss, coupling))  # the range's first weight
    hi_mean = mrr_mean_weight(low, math.pi, loss, coupling)
    if not lo_mean < 0 < hi_mean:
        raise ConfigError(
            f"device.init_high=auto: the weights of this bank (device.loss={loss}, device.coupling={coupling}) "
            f"average {lo_mean:+.3f} at φ = device.init_low={low} and {hi_mean:+.3f} over [{low}, π], so no "
            "range [init_low, h] averages zero; set device.init_high to a number."
        )
    a, b = low, math.pi
    for _ in range(60):
        mid = 0.5 * (a + b)
        a, b = (mid, b) if mrr_mean_weight(low, mid, loss, coupling) < 0 else (a, mid)
    return 0.5 * (a + b)
