"""Two cascaded phase masks in Monarch form, real part read out."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

from astraora.devices.base import Device
from astraora.errors import ConfigError


class Monarch(Device):
    """A = Re(L P R)[:m, :n]: two block-diagonal phase-only factors with a block permutation between.

    N = b² with b the smallest integer such that b² ≥ max(n, m); x is zero-padded to N and wire i
    is the pair (block, offset) = (i // b, i mod b).

    * R = blockdiag(R_0, …, R_{b−1}), the first mask: R_r[s, c] = e^{iθ_R[r, s, c]}/√b.
    * P, the perfect shuffle (r, s) ↦ (s, r): output s of block r feeds block s at offset r.
    * L = blockdiag(L_0, …, L_{b−1}), the second mask: L_s[t, r] = e^{iθ_L[s, t, r]}/√b.

    With the 1/√b scale, a factor with uniformly random phases preserves ‖x‖ in expectation
    (E[R Rᴴ] = I). Each entry of L P R is a single optical path, so
    A_{(s,t),(r,c)} = cos(θ_L[s, t, r] + θ_R[r, s, c]) / √N.

    θ layout: shape (2, b, b, b); θ[0, r, s, c] = θ_R[r, s, c] (block, output row, input column of
    the first mask), θ[1, s, t, r] = θ_L[s, t, r] (same for the second). p = 2·b³. Crosstalk uses
    the base rule: neighbours are adjacent entries of one block row (the last axis).

    Args:
        init_low, init_high: phases ~ U[init_low, init_high) in radians; default [0, 2π): every
            phase equally likely makes each factor isotropic, so A(θ₀) is a random full-rank matrix
            with entries cos(ψ)/√N (the scale of a standard Linear init) and no symmetry to break.
    """

    def __init__(self, d_in: int, d_out: int, *, init_low: float = 0.0, init_high: float = 2 * math.pi, **kwargs):
        if init_high < init_low:
            raise ConfigError(f"device.init_high={init_high} must be >= device.init_low={init_low}.")
        size = max(int(d_in), int(d_out), 1)
        self.blocks = math.isqrt(size - 1) + 1  # b, the smallest integer with b² ≥ size
        self.modes = self.blocks**2  # N
        self.init_low, self.init_high = float(init_low), float(init_high)
        super().__init__(d_in, d_out, **kwargs)

    def theta_shape(self) -> tuple[int, ...]:
        return (2, self.blocks, self.blocks, self.blocks)

    def init_theta(self, generator: torch.Generator) -> Tensor:
        u = torch.rand(self.theta_shape(), generator=generator)
        return self.init_low + (self.init_high - self.init_low) * u

    def transfer(self, theta: Tensor, x: Tensor) -> Tensor:
        """theta (K, 2, b, b, b), x (B, n) or (K, B, n) → (K, B, m), in real arithmetic.

        z = R x keeps its real and imaginary parts (index q); Re(L P z) = cos θ_L·Re z − sin θ_L·Im z.
        """
        b = self.blocks
        x = F.pad(x, (0, self.modes - self.d_in)).unflatten(-1, (b, b))  # (..., B, r, c)
        first = torch.stack([theta[:, 0].cos(), theta[:, 0].sin()], 1) / math.sqrt(b)  # (K, q, r, s, c)
        second = torch.stack([theta[:, 1].cos(), -theta[:, 1].sin()], 1) / math.sqrt(b)  # (K, q, s, t, r)
        inputs = "brc" if x.dim() == 3 else "kbrc"
        z = torch.einsum(f"kqrsc,{inputs}->kqbrs", first, x)
        y = torch.einsum("kqstr,kqbrs->kbst", second, z).flatten(-2)
        return y[..., :self.d_out]
