"""Two cascaded phase masks in Monarch form, real part read out."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

from astraora.devices.base import Device
from astraora.errors import ConfigError


def monarch_side(d: int) -> int:
    """b = 2^⌈log₂(d)/2⌉, the paper's block count and block size for a side of d wires: the smallest
    power of two whose square is at least d (1 for d = 1). Integer arithmetic: ⌈log₂ d⌉ is
    (d − 1).bit_length(), and ⌈⌈x⌉/2⌉ = ⌈x/2⌉."""
    return 1 << (((int(d) - 1).bit_length() + 1) // 2)


class Monarch(Device):
    """A = Re(Q L P R)[:m, :n]: two block-diagonal phase-only masks with a block permutation between,
    factored as in the paper's code.

    Each side is split by the rule b = 2^⌈log₂(d)/2⌉ (:func:`monarch_side`) into b blocks of b wires:
    b_in = k_in = b(n) on the input (x zero-padded to b_in², input wire i·k_in + j is offset j of
    block i) and b_out = k_out = b(m) on the output (b_out² outputs, the first m kept). Wires past n
    and m are padding: the phases that only reach them are on no path, A does not depend on them
    (63.5 % of the phases at 6144 → 192, where 6144 inputs are padded to 16,384; 74.2 % at
    1536 → 1536; none when n and m are powers of four).

    * R = blockdiag(R_0, …, R_{b_in−1}), the first mask: b_in blocks of b_out × k_in,
      R_i[k, j] = e^{iθ₁[k, i, j]}/√k_in (block i maps its k_in inputs to b_out outputs).
    * P, the block permutation (i, k) ↦ (k, i): output k of block i feeds block k at input i.
    * L = blockdiag(L_0, …, L_{b_out−1}), the second mask: b_out blocks of k_out × b_in,
      L_k[q, i] = e^{iθ₂[q, k, i]}/√b_in.
    * Q reads output q of block k out on wire o = q·b_out + k (the block index runs fastest).

    Each entry of Q L P R is a single optical path, so
    A_{q·b_out + k, i·k_in + j} = cos(θ₂[q, k, i] + θ₁[k, i, j]) / √(k_in·b_in) (= 1/k_in).
    p = b_in·b_out·(k_in + k_out) phases: 6144 → 192 (b = 128 and 16) 294,912; 1536 → 1536
    (b = 64) 524,288; 512 → 1024 (b = 32) 65,536. For n = m = b² this is the square Monarch (p = 2b³).

    θ layout: flat, length p, the paper's: θ₁ of shape (b_out, b_in, k_in), then θ₂ of shape
    (k_out, b_out, b_in), each in row-major order, so a θ vector from the paper's code gives its
    matrix. Crosstalk: the neighbours of a phase are the adjacent entries along the last axis of
    its mask (adjacent inputs j of one row of R_i, adjacent inputs i of one row of L_k).

    Args:
        init_center, init_halfwidth: phases ~ U[center − halfwidth, center + halfwidth] (the
            paper: π/2 ± 0.1, as for the SLM; halfwidth π gives every phase equally likely).
    """

    def __init__(
        self, d_in: int, d_out: int, *, init_center: float = math.pi / 2, init_halfwidth: float = 0.1, **kwargs
    ):
        if "block_size" in kwargs:  # a configuration from before the paper's block rule was adopted
            raise ConfigError(
                f"device.block_size={kwargs['block_size']!r} is no longer a setting: monarch splits each "
                "side of d wires into 2^⌈log₂(d)/2⌉ blocks (the paper's rule); remove the key."
            )
        if init_halfwidth < 0:
            raise ConfigError(f"device.init_halfwidth={init_halfwidth} must be >= 0.")
        self.blocks_in = monarch_side(d_in)  # b_in = k_in
        self.blocks_out = monarch_side(d_out)  # b_out = k_out
        self.init_center, self.init_halfwidth = float(init_center), float(init_halfwidth)
        super().__init__(d_in, d_out, **kwargs)

    @property
    def first_shape(self) -> tuple[int, int, int]:
        """θ₁'s shape (b_out, b_in, k_in)."""
        return (self.blocks_out, self.blocks_in, self.blocks_in)

    @property
    def second_shape(self) -> tuple[int, int, int]:
        """θ₂'s shape (k_out, b_out, b_in)."""
        return (self.blocks_out, self.blocks_out, self.blocks_in)

    def theta_shape(self) -> tuple[int, ...]:
        return (math.prod(self.first_shape) + math.prod(self.second_shape),)

    def masks(self, theta: Tensor) -> tuple[Tensor, Tensor]:
        """Split settings (K, p) into θ₁ (K, b_out, b_in, k_in) and θ₂ (K, k_out, b_out, b_in) (views)."""
        first, second = theta.split([math.prod(self.first_shape), math.prod(self.second_shape)], -1)
        return first.unflatten(-1, self.first_shape), second.unflatten(-1, self.second_shape)

    def init_theta(self, generator: torch.Generator) -> Tensor:
        u = torch.rand(self.theta_shape(), generator=generator)
        return self.init_center + self.init_halfwidth * (2 * u - 1)

    def neighbour_sum(self, theta: Tensor) -> Tensor:
        """Adjacent entries along the last axis of each mask (never across the two masks or rows)."""
        return torch.cat([Device.neighbour_sum(self, mask).flatten(-3) for mask in self.masks(theta)], -1)

    def transfer(self, theta: Tensor, x: Tensor) -> Tensor:
        """theta (K, p), x (B, n) or (K, B, n) → (K, B, m), in real arithmetic.

        z = R x keeps its real and imaginary parts (index c); Re(L P z) = cos θ₂·Re z − sin θ₂·Im z.
        """
        b_in = self.blocks_in
        first, second = self.masks(theta)  # (K, k, i, j), (K, q, k, i)
        x = F.pad(x, (0, b_in * b_in - self.d_in)).unflatten(-1, (b_in, b_in))  # (..., B, i, j)
        first = torch.stack([first.cos(), first.sin()], 1) / math.sqrt(b_in)  # (K, c, k, i, j)
        second = torch.stack([second.cos(), -second.sin()], 1) / math.sqrt(b_in)  # (K, c, q, k, i)
        inputs = "bij" if x.dim() == 3 else "Kbij"
        z = torch.einsum(f"Kckij,{inputs}->Kcbki", first, x)
        y = torch.einsum("Kcqki,Kcbki->Kbqk", second, z).flatten(-2)  # wire q·b_out + k
        return y[..., : self.d_out]
