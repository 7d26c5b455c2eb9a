"""Two cascaded phase masks in Monarch form, real part read out."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

from astraora.devices.base import Device
from astraora.errors import ConfigError


class Monarch(Device):
    """A = Re(L P R)[:m, :n]: two block-diagonal phase-only masks with a block permutation between.

    Input and output are factored separately with one block size k: n ≤ b_in·k (x zero-padded),
    m ≤ b_out·k (the padded outputs dropped), b_in = ⌈n/k⌉, b_out = ⌈m/k⌉. Input wire i is the
    pair (r, c) = (i // k, i mod k), output wire o the pair (s, t) = (o // k, o mod k).

    * R = blockdiag(R_0, …, R_{b_in−1}), the first mask: b_in blocks of b_out × k,
      R_r[s, c] = e^{iθ_R[r, s, c]}/√k (block r maps its k inputs to b_out outputs).
    * P, the block permutation (r, s) ↦ (s, r): output s of block r feeds block s at input r.
    * L = blockdiag(L_0, …, L_{b_out−1}), the second mask: b_out blocks of k × b_in,
      L_s[t, r] = e^{iθ_L[s, t, r]}/√b_in.

    Each entry of L P R is a single optical path, so
    A_{(s,t),(r,c)} = cos(θ_L[s, t, r] + θ_R[r, s, c]) / √(b_in·k).
    Each mask has b_in·b_out·k phases; p = 2·b_in·b_out·k = 2·n·m/k when k divides n and m.
    The paper's 6144 → 192 layer has 294,912 = 2·6144·192/8 phases: k = 8 (the default), so
    b_in = 768 blocks of 24 × 8 and b_out = 24 blocks of 8 × 768; 1536 → 1536 gives
    2·1536²/8 = 589,824. For n = m = k² this is the square Monarch (b_in = b_out = k, p = 2k³).
    Only phases on padded wires (none when k divides n and m) never receive a gradient.

    θ layout: shape (2, b_in, b_out, k); θ[0, r, s, c] = θ_R[r, s, c] and θ[1, r, s, t] =
    θ_L[s, t, r]: both masks indexed (input block r, output block s, offset), so the path
    (s, t) ← (r, c) uses θ[1, r, s, t] + θ[0, r, s, c]. Crosstalk uses the base rule (neighbours
    along the last axis: adjacent columns c of one row of R_r, adjacent rows t of one column of L_s).

    Args:
        block_size: k.
        init_center, init_halfwidth: phases ~ U[center − halfwidth, center + halfwidth] (the
            paper: π/2 ± 0.1, as for the SLM; halfwidth π gives every phase equally likely).
    """

    def __init__(self, d_in: int, d_out: int, *, block_size: int = 8, init_center: float = math.pi / 2,
                 init_halfwidth: float = 0.1, **kwargs):
        if isinstance(block_size, bool) or not isinstance(block_size, int) or block_size < 1:
            raise ConfigError(f"device.block_size={block_size!r} must be an integer >= 1.")
        if init_halfwidth < 0:
            raise ConfigError(f"device.init_halfwidth={init_halfwidth} must be >= 0.")
        self.block_size = block_size  # k
        self.blocks_in = -(-int(d_in) // block_size)  # b_in
        self.blocks_out = -(-int(d_out) // block_size)  # b_out
        self.init_center, self.init_halfwidth = float(init_center), float(init_halfwidth)
        super().__init__(d_in, d_out, **kwargs)

    def theta_shape(self) -> tuple[int, ...]:
        return (2, self.blocks_in, self.blocks_out, self.block_size)

    def init_theta(self, generator: torch.Generator) -> Tensor:
        u = torch.rand(self.theta_shape(), generator=generator)
        return self.init_center + self.init_halfwidth * (2 * u - 1)

    def transfer(self, theta: Tensor, x: Tensor) -> Tensor:
        """theta (K, 2, b_in, b_out, k), x (B, n) or (K, B, n) → (K, B, m), in real arithmetic.

        z = R x keeps its real and imaginary parts (index q); Re(L P z) = cos θ_L·Re z − sin θ_L·Im z.
        """
        k, b_in = self.block_size, self.blocks_in
        x = F.pad(x, (0, b_in * k - self.d_in)).unflatten(-1, (b_in, k))  # (..., B, r, c)
        first = torch.stack([theta[:, 0].cos(), theta[:, 0].sin()], 1) / math.sqrt(k)  # (K, q, r, s, c)
        second = torch.stack([theta[:, 1].cos(), -theta[:, 1].sin()], 1) / math.sqrt(b_in)  # (K, q, r, s, t)
        inputs = "brc" if x.dim() == 3 else "kbrc"
        z = torch.einsum(f"kqrsc,{inputs}->kqbrs", first, x)
        y = torch.einsum("kqrst,kqbrs->kbst", second, z).flatten(-2)
        return y[..., :self.d_out]
