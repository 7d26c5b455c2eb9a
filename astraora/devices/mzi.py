"""Rectangular (Clements-style) meshes of Mach-Zehnder interferometers, real part read out."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

from astraora.devices.base import Device, dense_transfer
from astraora.errors import ConfigError


class MZIMesh(Device):
    """Rectangular mesh of 2×2 MZI cells (the paper's cell): y = Re(U(θ) x)[:m].

    N = max(n, m) rounded up to even; x is zero-padded to N. The mesh has N columns; column c
    starts at wire s = c mod 2 and holds N/2 − s cells on the wire pairs (s, s+1), (s+2, s+3), …,
    so N(N−1)/2 cells with two phases each: p = N(N−1). U = C_{N−1} ⋯ C_1 C_0 with C_c the
    block-diagonal matrix of column c's cells (identity on the wires it leaves alone).

    θ layout (flat, length p), in the order the light meets the cells: column 0's cells top to
    bottom, then column 1's, and so on; each cell contributes its pair (θ, φ). Cell j of column c
    acts on wires (s + 2j, s + 2j + 1), its θ is at ``off_c + 2j`` and its φ at ``off_c + 2j + 1``
    with ``off_c = Σ_{c' < c} 2·(N/2 − c' mod 2)``.

    Args:
        init_center, init_std: phases ~ N(init_center, init_std²) in radians; paper: π/2 and
            1/√N (``init_std=None``).
    """

    def __init__(self, d_in: int, d_out: int, *, init_center: float = math.pi / 2, init_std: float | None = None, **kwargs):
        if init_std is not None and init_std < 0:
            raise ConfigError(f"device.init_std={init_std} must be >= 0 (or null for 1/√N).")
        size = max(int(d_in), int(d_out), 1)
        self.modes = size + size % 2  # N
        # Per column c: its first wire s = c mod 2 and its number of cells N/2 − s.
        self.columns = [(c % 2, self.modes // 2 - c % 2) for c in range(self.modes)]
        self.init_center = float(init_center)
        self.init_std = 1.0 / math.sqrt(self.modes) if init_std is None else float(init_std)
        super().__init__(d_in, d_out, **kwargs)
        phases_per_column = torch.tensor([2 * count for _, count in self.columns])
        column_of = torch.repeat_interleave(torch.arange(self.modes), phases_per_column)
        # True where flat entries i and i + 2 are the same phase of adjacent cells in one column.
        self.register_buffer("next_in_column", column_of[2:] == column_of[:-2], persistent=False)

    def theta_shape(self) -> tuple[int, ...]:
        return (self.modes * (self.modes - 1),)

    def init_theta(self, generator: torch.Generator) -> Tensor:
        return self.init_center + self.init_std * torch.randn(self.theta_shape(), generator=generator)

    @staticmethod
    def cell(theta: Tensor, phi: Tensor) -> Tensor:
        """The paper's cell for phases θ, φ (radians, same shape S) → (*S, 2, 2) complex.

        With α = (θ−φ)/2 and β = (θ+φ)/2:
        T = e^{iβ}/√2 · [[sin α + i sin β, −cos α + i cos β], [cos α + i cos β, sin α − i sin β]].
        """
        alpha, beta = (theta - phi) / 2, (theta + phi) / 2
        sin_a, cos_a, sin_b, cos_b = alpha.sin(), alpha.cos(), beta.sin(), beta.cos()
        entries = [
            torch.complex(sin_a, sin_b), torch.complex(-cos_a, cos_b),
            torch.complex(cos_a, cos_b), torch.complex(sin_a, -sin_b),
        ]
        phase = torch.complex(cos_b, sin_b) / math.sqrt(2)
        return (phase.unsqueeze(-1) * torch.stack(entries, -1)).unflatten(-1, (2, 2))

    def neighbour_sum(self, theta: Tensor) -> Tensor:
        """For each phase, the same phase (θ or φ) of the cells directly above and below it in
        its mesh column. theta: (K, p) → (K, p)."""
        total = torch.zeros_like(theta)
        total[..., :-2] += theta[..., 2:] * self.next_in_column
        total[..., 2:] += theta[..., :-2] * self.next_in_column
        return total

    def _propagate(self, cells: Tensor, z: Tensor) -> Tensor:
        """Send complex rows z (K, B, N) through the mesh with cell matrices cells (K, N(N−1)/2, 2, 2).

        Returns (K, B, N) whose row b is (U z_b)ᵀ. One step per column, vectorised over its cells.
        """
        # split, not slicing, so that the backward pass assembles the cells' gradient only once.
        for (start, count), column in zip(self.columns, cells.split([count for _, count in self.columns], dim=1)):
            pairs = z[..., start:start + 2 * count].unflatten(-1, (count, 2))  # (K, B, cells, 2)
            mixed = torch.einsum("kcij,kbcj->kbci", column, pairs).flatten(-2)
            z = torch.cat([z[..., :start], mixed, z[..., start + 2 * count:]], -1) if start else mixed
        return z

    def transfer(self, theta: Tensor, x: Tensor) -> Tensor:
        """theta (K, p), x (B, n) or (K, B, n) → (K, B, m) = x Re(U)[:m, :n]ᵀ.

        Propagates whichever is smaller through the mesh: the B inputs themselves, or the n basis
        vectors (giving Re(U)[:m, :n], then one matrix product). Both cost O(K·N²) per row sent.
        """
        cells = self.cell(theta[:, 0::2], theta[:, 1::2])
        k, batch = theta.shape[0], x.shape[-2]
        if batch <= self.d_in:
            z = F.pad(x, (0, self.modes - self.d_in)).to(cells.dtype).expand(k, batch, self.modes)
            return self._propagate(cells, z).real[..., :self.d_out]
        basis = torch.eye(self.d_in, self.modes, dtype=cells.dtype, device=cells.device).expand(k, -1, -1)
        weights = self._propagate(cells, basis).real[..., :self.d_out].transpose(1, 2)  # (K, m, n)
        return dense_transfer(weights, x)

    def unitary(self, theta: Tensor | None = None) -> Tensor:
        """U(θ), (N, N) complex, for one setting θ (p,) (default: the current one). Ideal: no
        drift, crosstalk or quantization. Diagnostics and tests only."""
        theta = self.theta if theta is None else theta
        cells = self.cell(theta[0::2], theta[1::2]).unsqueeze(0)
        eye = torch.eye(self.modes, dtype=cells.dtype, device=cells.device).unsqueeze(0)
        return self._propagate(cells, eye)[0].transpose(0, 1)


class MZIClassical(MZIMesh):
    """The same rectangular mesh and θ layout with the classical cell
    T = [[e^{iφ} sin θ, e^{iφ} cos θ], [cos θ, −sin θ]]."""

    @staticmethod
    def cell(theta: Tensor, phi: Tensor) -> Tensor:
        """The classical cell for phases θ, φ (radians, same shape S) → (*S, 2, 2) complex."""
        sin_t, cos_t = theta.sin(), theta.cos()
        phase = torch.complex(phi.cos(), phi.sin()).unsqueeze(-1)
        top = phase * torch.stack([sin_t, cos_t], -1)
        bottom = torch.stack([cos_t, -sin_t], -1)
        return torch.stack([top, torch.complex(bottom, torch.zeros_like(bottom))], -2)
