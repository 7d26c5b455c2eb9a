"""Rectangular (Clements-style) meshes of Mach-Zehnder interferometers, real part read out."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

from astraora.devices import native
from astraora.devices.base import Device, dense_transfer
from astraora.devices.mesh_tiles import TiledMesh, complex_dtype
from astraora.errors import ConfigError

ENGINES = ("tiles", "columns", "fused")


# The two cells' formulas, each written once. Every entry is computed straight into its plane of the
# complex result (``out=``), or, under autograd (which refuses ``out=``), returned (``out=None``) and
# stacked. The native block build computes the same two formulas in C (tile_blocks.c: paper_cell and
# classical_cell), compared with these by tests/test_native.py.


def _planes(theta: Tensor, phi: Tensor, zeroed: bool) -> tuple[Tensor | None, tuple, tuple]:
    """The result (4, *S) complex and the real and imaginary planes of its four entries; under autograd
    None and four Nones each (the entries are then returned and stacked by :func:`_assemble`)."""
    if torch.is_grad_enabled() and (theta.requires_grad or phi.requires_grad):
        return None, (None,) * 4, (None,) * 4
    make = torch.zeros if zeroed else torch.empty
    out = make((4, *theta.shape), dtype=complex_dtype(theta.dtype), device=theta.device)
    re, im = torch.view_as_real(out).unbind(-1)
    return out, tuple(re), tuple(im)


def _assemble(out: Tensor | None, real: tuple, imag: tuple) -> Tensor:
    """``out`` where the entries were written into it, else the complex (4, *S) of the entries ``real``
    and ``imag`` (None: zero)."""
    if out is not None:
        return out
    zero = torch.zeros_like(real[0])
    imag = [zero if part is None else part for part in imag]
    return torch.complex(torch.stack(real), torch.stack(imag))


def paper_cell_entries(theta: Tensor, phi: Tensor) -> Tensor:
    """The paper's cell for phases θ, φ (radians, same shape S) → (4, *S) complex, the entries
    T00, T01, T10, T11 of

        T = e^{iβ}/√2 · [[sin α + i sin β, −cos α + i cos β], [cos α + i cos β, sin α − i sin β]]

    with α = (θ−φ)/2 and β = (θ+φ)/2. Multiplied out on real planes, with c = cos β/√2 and
    s = sin β/√2 (sin/cos once, no complex temporaries):
    T00 = c sα − s sβ + i s(sα + cβ),   T01 = −c(cα + sβ) + i(c cβ − s cα),
    T10 = c(cα − sβ) + i(s cα + c cβ),  T11 = c sα + s sβ + i s(sα − cβ).
    """
    alpha, beta = (theta - phi) / 2, (theta + phi) / 2
    sin_a, cos_a, sin_b, cos_b = alpha.sin(), alpha.cos(), beta.sin(), beta.cos()
    c, s = cos_b / math.sqrt(2), sin_b / math.sqrt(2)
    c_sa, s_sb, c_cb, s_ca = c * sin_a, s * sin_b, c * cos_b, s * cos_a
    out, re, im = _planes(theta, phi, zeroed=False)
    real = (
        torch.sub(c_sa, s_sb, out=re[0]),
        torch.mul(c, cos_a + sin_b, out=re[1]).neg_(),
        torch.mul(c, cos_a - sin_b, out=re[2]),
        torch.add(c_sa, s_sb, out=re[3]),
    )
    imag = (
        torch.mul(s, sin_a + cos_b, out=im[0]),
        torch.sub(c_cb, s_ca, out=im[1]),
        torch.add(c_cb, s_ca, out=im[2]),
        torch.mul(s, sin_a - cos_b, out=im[3]),
    )
    return _assemble(out, real, imag)


def classical_cell_entries(theta: Tensor, phi: Tensor) -> Tensor:
    """The classical cell with the splitting angle θ first and the external phase φ second (same
    shape S) → (4, *S) complex T00, T01, T10, T11 = e^{iφ} sin θ, e^{iφ} cos θ, cos θ, −sin θ (the
    native kernel's order; :class:`MZIClassical` stores each pair the other way round)."""
    sin_t, cos_t, sin_p, cos_p = theta.sin(), theta.cos(), phi.sin(), phi.cos()
    out, re, im = _planes(theta, phi, zeroed=True)
    real = (
        torch.mul(cos_p, sin_t, out=re[0]),
        torch.mul(cos_p, cos_t, out=re[1]),
        cos_t if re[2] is None else re[2].copy_(cos_t),
        torch.neg(sin_t, out=re[3]),
    )
    imag = (torch.mul(sin_p, sin_t, out=im[0]), torch.mul(sin_p, cos_t, out=im[1]), None, None)
    return _assemble(out, real, imag)


class MZIMesh(Device):
    """Rectangular mesh of 2×2 MZI cells (the paper's cell): y = Re(U(θ) x)[:m].

    N = max(n, m) (or ``modes``) rounded up to even; x is zero-padded to N. The mesh has N columns; column c
    starts at wire s = c mod 2 and holds N/2 − s cells on the wire pairs (s, s+1), (s+2, s+3), …,
    so N(N−1)/2 cells with two phases each: p = N(N−1). U = C_{N−1} ⋯ C_1 C_0 with C_c the
    block-diagonal matrix of column c's cells (identity on the wires it leaves alone).

    θ layout (flat, length p), in the order the light meets the cells: column 0's cells top to
    bottom, then column 1's, and so on; each cell contributes its pair (θ, φ). Cell j of column c
    acts on wires (s + 2j, s + 2j + 1), its θ is at ``off_c + 2j`` and its φ at ``off_c + 2j + 1``
    with ``off_c = Σ_{c' < c} 2·(N/2 − c' mod 2)``.

    Simulation engines (same numbers to float round-off):

    * ``tiles`` (default): the mesh regrouped into ≈ N/L block-diagonal factors of 2L × 2L tiles,
      each applied as one batched GEMM (:mod:`astraora.devices.mesh_tiles`); used for every query
      and every simulation that needs no autograd.
    * ``columns``: one step per mesh column, vectorised over its cells; differentiable. The
      reference the tile engine is tested against, and the route autograd takes (oracle modes).
    * ``fused``: all K settings in one Triton kernel launch, state and cells on chip
      (:mod:`astraora.devices.fused`); needs CUDA and triton, float32. Autograd takes the
      column route. Also answers *drawn* queries (:meth:`query_drawn`: directions generated on
      chip from a seed, read as inner products), which the ZO estimator uses where
      :meth:`supports_drawn_queries` says they are exact.

    Args:
        init_center, init_std: phases ~ N(init_center, init_std²) in radians; paper: π/2 and
            1/√N (``init_std=None``).
        engine: ``tiles``, ``columns`` or ``fused`` (see above).
        tile: L, the tile size of the ``tiles`` engine, or None: 4 for meshes of up to 192 wires,
            8 above (the fastest we measured on CPUs: small blocks keep the per-tile build cheap
            where batches are small, larger ones make better GEMMs).
        modes: N, the mesh's wires, or None: max(n, m) (rounded up to even). A wider mesh
            (N > max(n, m)) realises Re(U)[:m, :n] as a sub-block of a larger unitary, which
            constrains the layer less (its singular values need not be those of a unitary's
            real part); it has N(N − 1) phases to train.
    """

    def __init__(
        self,
        d_in: int,
        d_out: int,
        *,
        init_center: float = math.pi / 2,
        init_std: float | None = None,
        engine: str = "tiles",
        tile: int | None = None,
        modes: int | None = None,
        **kwargs,
    ):
        if init_std is not None and init_std < 0:
            raise ConfigError(f"device.init_std={init_std} must be >= 0 (or null for 1/√N).")
        if engine not in ENGINES:
            raise ConfigError(f"device.engine={engine!r} is not allowed; choose one of {ENGINES}.")
        if tile is not None and (isinstance(tile, bool) or not isinstance(tile, int) or tile < 1):
            raise ConfigError(f"device.tile={tile!r} must be an integer >= 1 (or null: automatic).")
        size = max(int(d_in), int(d_out), 1)
        if modes is not None:
            if isinstance(modes, bool) or not isinstance(modes, int) or modes < size:
                raise ConfigError(
                    f"device.modes={modes!r} must be an integer >= max(n, m) = {size} (or null: max(n, m))."
                )
            size = modes
        self.modes = size + size % 2  # N
        # Per column c: its first wire s = c mod 2 and its number of cells N/2 − s.
        self.columns = [(c % 2, self.modes // 2 - c % 2) for c in range(self.modes)]
        self.init_center = float(init_center)
        self.init_std = 1.0 / math.sqrt(self.modes) if init_std is None else float(init_std)
        self.engine = engine
        if engine == "fused":
            self._check_fused()
        self.tile = tile if tile is not None else (4 if self.modes <= 192 else 8)
        self._tiles: dict[tuple[int, int], TiledMesh] = {}  # geometry per (inputs, outputs) wires
        super().__init__(d_in, d_out, **kwargs)
        phases_per_column = torch.tensor([2 * count for _, count in self.columns])
        column_of = torch.repeat_interleave(torch.arange(self.modes), phases_per_column)
        # True where flat entries i and i + 2 are the same phase of adjacent cells in one column.
        self.register_buffer("next_in_column", column_of[2:] == column_of[:-2], persistent=False)

    def theta_shape(self) -> tuple[int, ...]:
        return (self.modes * (self.modes - 1),)

    def init_theta(self, generator: torch.Generator) -> Tensor:
        return self.init_center + self.init_std * torch.randn(self.theta_shape(), generator=generator)

    cell_entries = staticmethod(paper_cell_entries)  # (θ, φ) → (4, *S) complex T00, T01, T10, T11

    @classmethod
    def cell(cls, theta: Tensor, phi: Tensor) -> Tensor:
        """The cell matrices for phases θ, φ (same shape S) → (*S, 2, 2) complex."""
        return cls.cell_entries(theta, phi).movedim(0, -1).unflatten(-1, (2, 2))

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
        for (start, count), column in zip(
            self.columns, cells.split([count for _, count in self.columns], dim=1), strict=True
        ):
            pairs = z[..., start : start + 2 * count].unflatten(-1, (count, 2))  # (K, B, cells, 2)
            mixed = torch.einsum("kcij,kbcj->kbci", column, pairs).flatten(-2)
            z = torch.cat([z[..., :start], mixed, z[..., start + 2 * count :]], -1) if start else mixed
        return z

    def tiled(self, d_in: int, d_out: int) -> TiledMesh:
        """The tile engine's geometry for inputs on wires [0, d_in) and outputs [0, d_out) (cached)."""
        key = (d_in, d_out)
        if key not in self._tiles:
            self._tiles[key] = TiledMesh(self.modes, d_in, d_out, self.columns, tile=self.tile)
        return self._tiles[key]

    def _mesh(self, theta: Tensor, z: Tensor, d_in: int, d_out: int) -> Tensor:
        """Re(U(θ_k) z_b)[:d_out] for real rows z (B, d_in) or (K, B, d_in) → (K, B, d_out), by the
        tile engine, or by the column route where autograd needs it or it is configured."""
        differentiable = torch.is_grad_enabled() and (theta.requires_grad or z.requires_grad)
        if self.engine == "tiles" and not differentiable:
            return self.tiled(d_in, d_out).apply(*self._tile_cell(theta), z)
        if self.engine == "fused" and not differentiable:
            from astraora.devices import fused

            self._check_fused(theta)
            return fused.transfer(self._fused_cell(), theta, z, self.modes, d_out)
        cells = self.cell(theta[:, 0::2], theta[:, 1::2])
        z = F.pad(z, (0, self.modes - d_in)).to(cells.dtype).expand(theta.shape[0], z.shape[-2], self.modes)
        return self._propagate(cells, z).real[..., :d_out]

    def _check_fused(self, like: Tensor | None = None) -> None:
        """ConfigError unless the fused engine can run (triton importable and CUDA, or Triton's
        interpreter; with ``like``: on tensors like it)."""
        from astraora.devices import fused

        problem = fused.problem(like)
        if problem is None and self._fused_cell() is None:
            problem = f"has no kernel for the cell of {type(self).__name__}"
        if problem is not None:
            raise ConfigError(f"device.engine='fused' {problem}; choose one of {ENGINES} (fused needs CUDA + triton).")

    def _fused_cell(self) -> int | None:
        """The fused kernel's code for this device's cell in its phase order, or None (a cell the
        kernel does not compute)."""
        from astraora.devices import fused

        codes = {paper_cell_entries: fused.CELL_PAPER, MZIClassical.cell_entries: fused.CELL_CLASSICAL}
        return codes.get(self.cell_entries)

    def supports_drawn_queries(self, purpose: str = "zo") -> bool:
        """Drawn queries (:meth:`query_drawn`) on ``engine=fused`` where they are exactly the queries of
        the explicit settings: the setting a query is answered at is the commanded one moved by a fixed
        offset (drift, and with ``nonideal.queries=forward`` a ZO query's drift, crosstalk and
        quantization of the live θ: :meth:`settings_for`), and the read adds nothing (no output noise
        or input quantization in view). Crosstalk or phase quantization in view of the query (they
        move θ + step·u other than by an offset), output noise or input quantization: False, and the
        caller sends explicit settings."""
        if self.engine != "fused" or self._fused_cell() is None:
            return False
        from astraora.devices import fused

        if fused.problem(self.theta) is not None:
            return False  # the explicit route then says why in one line
        nonideal, sees = self.nonideal, self.sees_nonidealities(purpose)
        offset = (not sees and purpose == "zo") or not (nonideal.crosstalk or nonideal.phase_bits)
        clean_read = not sees or not (nonideal.output_noise or nonideal.input_bits)
        return offset and clean_read

    @torch.no_grad()
    def query_drawn(
        self,
        x: Tensor,
        theta: Tensor,
        *,
        seed: int,
        first: int,
        count: int,
        step: float,
        weights: Tensor,
        purpose: str = "zo",
    ) -> Tensor:
        """The hardware at the ``count`` settings θ + step·u_d, d = first, …, first + count − 1, with u_d
        the drawn Gaussian directions of ``seed`` (:meth:`drawn_directions`): rows x (B, n) sent at
        each, read as the inner products Σ_b ⟨y_b, w_b⟩ with ``weights`` (B, m) → (count,). One
        fused launch per :data:`~astraora.devices.fused.MAX_SETTINGS` settings; the settings exist
        only on chip. Non-idealities as :meth:`query` (only where :meth:`supports_drawn_queries`),
        faults too. Go through the ledger (:meth:`~astraora.ledger.QueryLedger.query_drawn`)."""
        from astraora.devices import fused

        if not self.supports_drawn_queries(purpose):
            raise ConfigError(f"device {self.name!r} does not answer drawn {purpose} queries; send explicit settings.")
        if self.faults.active:
            self._inject_delay_or_raise()
        base = self.settings_for(theta.detach().reshape(1, -1), purpose)[0]  # the offset the query sees
        indices = torch.arange(first, first + count, device=base.device)
        pieces = [
            fused.transfer_drawn(
                self._fused_cell(),
                base,
                x,
                self.modes,
                self.d_out,
                seed=seed,
                indices=indices[start : start + fused.MAX_SETTINGS],
                step=step,
                weights=weights,
            )
            for start in range(0, count, fused.MAX_SETTINGS)
        ]
        phi = torch.cat(pieces) if pieces else torch.zeros(0, dtype=base.dtype, device=base.device)
        return self._inject_nonfinite(phi)

    def drawn_directions(self, seed: int, indices: Tensor) -> Tensor:
        """The directions u_d (K, p) of :meth:`query_drawn` for direction indices (K,) (a copy of what
        the chip generates; K × p, so only for few)."""
        from astraora.devices import fused

        return fused.directions(seed, indices.to(self.theta.device), self.theta.numel())

    def combine_drawn(self, seed: int, coefficients: Tensor) -> Tensor:
        """Σ_i c_i u_i (p,) over the drawn directions i = 0, …, K − 1 of ``seed`` for coefficients c (K,),
        without storing any u (:func:`~astraora.devices.fused.combine`)."""
        from astraora.devices import fused

        return fused.combine(seed, coefficients, self.theta.numel()).to(self.theta.dtype)

    def _tile_cell(self, theta: Tensor) -> tuple[object, Tensor]:
        """The cell function and the settings (K, p) the tile engine gets for settings theta: this
        class's cell and θ itself (a subclass may hand the engine a relabelled pair)."""
        return self.cell_entries, theta

    def transfer(self, theta: Tensor, x: Tensor) -> Tensor:
        """theta (K, p), x (B, n) or (K, B, n) → (K, B, m) = x Re(U)[:m, :n]ᵀ.

        Propagates whichever is smaller through the mesh: the B inputs themselves, or the n basis
        vectors (giving Re(U)[:m, :n], then one matrix product). Both cost O(K·N²) per row sent.
        """
        if x.shape[-2] <= self.d_in:
            return self._mesh(theta, x, self.d_in, self.d_out)
        basis = torch.eye(self.d_in, dtype=theta.dtype, device=theta.device)
        weights = self._mesh(theta, basis, self.d_in, self.d_out).transpose(1, 2)  # (K, m, n)
        return dense_transfer(weights, x)

    def unitary(self, theta: Tensor | None = None) -> Tensor:
        """U(θ), (N, N) complex, for one setting θ (p,) (default: the current one). Ideal: no
        drift, crosstalk or quantization. Diagnostics and tests only."""
        theta = self.theta if theta is None else theta
        cells = self.cell(theta[0::2], theta[1::2]).unsqueeze(0)
        eye = torch.eye(self.modes, dtype=cells.dtype, device=cells.device).unsqueeze(0)
        return self._propagate(cells, eye)[0].transpose(0, 1)


def swap_cell_phases(theta: Tensor) -> Tensor:
    """θ (…, 2·cells) with the two phases of every cell exchanged (a copy; two strided copies are
    ≈ 2.5× faster than a flip)."""
    out = torch.empty_like(theta)
    out[..., 0::2] = theta[..., 1::2]
    out[..., 1::2] = theta[..., 0::2]
    return out


class MZIClassical(MZIMesh):
    """The same rectangular mesh with the classical cell in the paper's code's phase order: a cell's
    pair (φ, θ), external phase first (at ``off_c + 2j``), splitting angle second (``off_c + 2j + 1``),
    T(φ, θ) = [[e^{iφ} sin θ, e^{iφ} cos θ], [cos θ, −sin θ]].

    (Before this order was adopted the pair was stored (θ, φ); a θ saved then is this order's θ
    with each cell's two phases swapped: :func:`swap_cell_phases`.) The tile engine's compiled
    block build computes this cell with the angle first (:func:`classical_cell_entries`), so the
    tile route hands it θ with each pair swapped; the column route and :meth:`cell` use the
    paper's order directly."""

    @staticmethod
    def cell_entries(phi: Tensor, theta: Tensor) -> Tensor:
        """The classical cell for the pair (φ, θ) in θ's order (radians, same shape S) → (4, *S)
        complex T00, T01, T10, T11 = e^{iφ} sin θ, e^{iφ} cos θ, cos θ, −sin θ."""
        return classical_cell_entries(theta, phi)

    def _tile_cell(self, theta: Tensor) -> tuple[object, Tensor]:
        return classical_cell_entries, swap_cell_phases(theta)


# the two cells whose entries the native block build computes itself (devices/tile_blocks.c)
native.CELLS[paper_cell_entries] = native.CELL_PAPER
native.CELLS[classical_cell_entries] = native.CELL_CLASSICAL
