"""A rectangular MZI mesh as ≈ N/L block-diagonal factors of 2L × 2L tiles, applied as batched GEMMs.

Column-by-column propagation streams the whole state through memory once per mesh column with a
tiny 2×2 mix per wire pair: memory-bound, a few GFLOP/s. This engine regroups the same cells so
that the work runs as matrix products (see docs/PERFORMANCE.md).

Light-cone coordinates. The cell in column c whose top wire is w (w ≡ c mod 2) gets

    u = (c + w) / 2,   v = (c − w) / 2,   so c = u + v and w = u − v.

It acts after the cells at (u − 1, v) and (u, v − 1) (the previous cells on its two wires). Cut the
(u, v) plane into L × L tiles, (U, V) = (⌊u / L⌋, ⌊(v − 1) / L⌋). All cells of a tile act inside
the window of 2L wires [(d − 1)L, (d + 1)L) with d = U − V, and tiles of equal T = U + V have
disjoint windows and depend only on tiles of smaller T. So

    U_mesh = F_Tmax ⋯ F_Tmin,   F_T = blockdiag(B_(T, d) for the tiles of factor T),

each block B a 2L × 2L complex matrix built by pushing the identity through the tile's 2L − 1 local
columns. A call builds the blocks of a few consecutive factors (all K settings) right before
multiplying the state by them, so blocks stay in cache; the build runs with settings and tiles as
the innermost axis (long contiguous vectors), then one transpose hands the blocks to the GEMMs.

Light cone: a factor only touches the tiles that the input wires [0, n) can have reached and that
can still reach the output wires [0, m) (both found once, structurally, when the geometry is built).

The state is complex, wire-major (K, wires, B), with L zero wires of padding above the mesh and at
least L below, and lives in two reused buffers: each factor reads one and writes the other.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

from astraora.devices import native

TRIMMED_MAX_SETTINGS = 8  # on a CPU, calls with up to this many settings use the trimmed layout
TRIMMED_BUDGET = 512  # trimmed layout: tiles × settings whose blocks are built together
UNIFORM_BUDGET_CPU = 2048  # uniform layout: tiles × settings whose blocks are built together
UNIFORM_BUDGET_GPU = 1 << 16
CellFn = Callable[[Tensor, Tensor], Tensor]  # (θ, φ) of shape S → (4, *S) complex: T00, T01, T10, T11


def complex_dtype(dtype: torch.dtype) -> torch.dtype:
    """The complex dtype of a mesh's amplitudes for real phases of ``dtype``."""
    return torch.complex128 if dtype == torch.float64 else torch.complex64


@dataclass
class _Factor:
    """One block-diagonal factor as applied: ``tiles`` tiles covering the wire rows
    [row0, row0 + 2L·tiles), and the flat cell index of each of their slots, −1 where empty."""

    tiles: int
    row0: int
    cell_index: np.ndarray


@dataclass
class _Group:
    """Consecutive factors whose blocks are built together (fewer, larger tensor operations).

    Slots are ordered (factor, tile, slot) in the trimmed layout and (tile, factor, slot) in the
    uniform one, where every factor has the same tiles, so that one factor's blocks over all K
    settings form a single strided batch for one GEMM call."""

    factors: list[_Factor]
    tiles: int
    theta_index: Tensor  # (L², tiles): where each slot's θ is in the flat θ (a cell's θ; 0 if empty)
    phi_index: Tensor  # the same for φ
    missing: Tensor | None  # flat indices into (L², tiles) of the empty slots (identity), or None
    slot_cell: Tensor  # (L², tiles) int64: each slot's cell, −1 where empty (the native build)


def _group(factors: list[_Factor], index: np.ndarray, slots: int) -> _Group:
    """A group from its slots' cell indices in tile order, kept slot-major: (slots, tiles)."""
    index = index.reshape(-1, slots).T.copy()
    slot_cell = torch.from_numpy(index.copy())
    missing = np.nonzero(index.reshape(-1) < 0)[0]
    index = np.maximum(index, 0)
    return _Group(
        factors=factors,
        tiles=sum(f.tiles for f in factors),
        theta_index=torch.from_numpy(2 * index),
        phi_index=torch.from_numpy(2 * index + 1),
        missing=torch.from_numpy(missing) if len(missing) else None,
        slot_cell=slot_cell,
    )


class TiledMesh:
    """The tile geometry of a rectangular mesh of ``modes`` wires (even) for inputs on wires [0, d_in)
    and outputs read from wires [0, d_out), and :meth:`apply`, which runs it.

    Two layouts of the same factors:

    * trimmed (a CPU and few settings): each factor only holds the tiles inside the light cone,
      and is multiplied setting by setting straight into the work buffer;
    * uniform (many settings, or a GPU): every factor holds all tiles of its parity, so that with
      L spare zero wires below the mesh the state of all K settings is one strided batch of
      2L-row windows, and a factor is one batched GEMM call over settings and tiles.

    Args:
        modes: N, wires of the mesh.
        d_in, d_out: n and m.
        columns: per mesh column, (first wire, number of cells): cells are numbered column by
            column, top to bottom, as in :class:`~astraora.devices.mzi.MZIMesh`.
        tile: L (tiles are L × L cells, blocks 2L × 2L).
    """

    def __init__(self, modes: int, d_in: int, d_out: int, columns: list[tuple[int, int]], tile: int = 8):
        self.modes, self.d_in, self.d_out, self.L = modes, d_in, d_out, int(tile)
        L = self.L
        counts = np.array([count for _, count in columns], dtype=np.int64)
        self.cells = int(counts.sum())
        c = np.repeat(np.arange(len(columns), dtype=np.int64), counts)
        first = np.repeat(np.array([start for start, _ in columns], dtype=np.int64), counts)
        j = np.arange(self.cells, dtype=np.int64) - np.repeat(np.cumsum(counts) - counts, counts)
        w = first + 2 * j
        u, v = (c + w) // 2, (c - w) // 2
        U, V = u // L, (v - 1) // L  # floor division, also for negative v
        T, d = U + V, U - V
        du, dv = u - U * L, v - 1 - V * L
        step = du + dv  # local column, 0 … 2L − 2
        # Slot of each cell inside its tile: steps in order, pairs top to bottom within a step.
        step_lo = np.maximum(0, np.arange(2 * L - 1) - L + 1)  # smallest du in each step
        step_start = np.concatenate([[0], np.cumsum(np.minimum(np.arange(2 * L - 1), L - 1) - step_lo + 1)])
        slot = step_start[step] + du - step_lo[step]
        # Per step: its slots [s0, s1), its first row r0 (pairs (L − 1 + 2du − step, +1) for du in
        # the step's range) and the columns [c0, c1) those rows can be non-zero in (a block
        # starts as the identity; light spreads one wire per step).
        support = np.eye(2 * L, dtype=bool)
        self.steps = []
        for s in range(2 * L - 1):
            s0, s1, r0 = int(step_start[s]), int(step_start[s + 1]), int(L - 1 + 2 * step_lo[s] - s)
            for r in range(r0, r0 + 2 * (s1 - s0), 2):
                support[r] = support[r + 1] = support[r] | support[r + 1]
            cols = np.nonzero(support[r0 : r0 + 2 * (s1 - s0)].any(0))[0]
            self.steps.append((s0, s1, r0, int(cols[0]), int(cols[-1]) + 1))
        self._steps_array = np.array(self.steps, dtype=np.int32)  # for the native kernel
        # State rows: L zero wires above the mesh (every window starts at row d·L ≥ 0), at least L
        # below it (the uniform layout's last odd window reaches L rows past a setting), a
        # multiple of 2L in all.
        self.pad = L
        self.rows = 2 * L * math.ceil((modes + 2 * L) / (2 * L))
        assert (d * L >= 0).all() and ((d + 2) * L <= self.rows).all()
        self._cells_by_factor = [np.nonzero(T == t)[0] for t in np.unique(T)]
        self._parity = [int(t) % 2 for t in np.unique(T)]
        self._d, self._slot = d, slot
        self.trimmed = self._light_cone()
        self._plans: dict = {}
        self._buffers: dict = {}

    def _factor(self, fi: int, tiles: int, row0: int) -> _Factor:
        """Factor ``fi`` restricted to ``tiles`` windows from row ``row0``: its slots' cell indices."""
        L, sel = self.L, self._cells_by_factor[fi]
        tile_of = (self._d[sel] * L - row0) // (2 * L)
        inside = (tile_of >= 0) & (tile_of < tiles)
        index = np.full(tiles * L * L, -1, dtype=np.int64)
        index[tile_of[inside] * L * L + self._slot[sel[inside]]] = sel[inside]
        return _Factor(tiles, row0, index)

    def _light_cone(self) -> list[_Factor]:
        """Per factor, the contiguous range of tiles that both the input can reach and the output
        still needs (factors with none are left out). Structural: a tile's block is treated as
        dense on its window."""
        rows, pad, L = self.rows, self.pad, self.L
        # per factor: candidate tile starts (rows), all windows of its parity inside the state
        windows = [np.arange(parity * L, rows - 2 * L + 1, 2 * L) for parity in self._parity]
        reach = np.zeros(rows, dtype=bool)
        reach[pad : pad + self.d_in] = True
        forward = []
        for starts in windows:
            hit = np.array([reach[s : s + 2 * L].any() for s in starts])
            for s in starts[hit]:
                reach[s : s + 2 * L] = True
            forward.append(hit)
        need = np.zeros(rows, dtype=bool)
        need[pad : pad + self.d_out] = True
        backward = [None] * len(windows)
        for fi in range(len(windows) - 1, -1, -1):
            starts = windows[fi]
            hit = np.array([need[s : s + 2 * L].any() for s in starts])
            for s in starts[hit]:
                need[s : s + 2 * L] = True
            backward[fi] = hit
        factors = []
        for fi, (starts, fwd, bwd) in enumerate(zip(windows, forward, backward, strict=True)):
            active = np.nonzero(fwd & bwd)[0]
            if len(active):
                lo, hi = int(active[0]), int(active[-1])
                assert hi - lo + 1 == len(active), "light cone is not contiguous"
                factors.append(self._factor(fi, hi - lo + 1, int(starts[lo])))
        return factors

    def _plan(self, uniform: bool, size: int) -> list[_Group]:
        """Groups of factors for one layout: trimmed groups of about ``size`` tiles, or uniform
        groups of ``size`` factors (cached)."""
        key = (uniform, size)
        if key in self._plans:
            return self._plans[key]
        groups = []
        if uniform:
            tiles, L2 = self.rows // (2 * self.L), self.L * self.L
            factors = [self._factor(fi, tiles, parity * self.L) for fi, parity in enumerate(self._parity)]
            for start in range(0, len(factors), size):
                part = factors[start : start + size]
                index = np.stack([f.cell_index.reshape(tiles, L2) for f in part], 1)  # (tile, factor, slot)
                groups.append(_group(part, index.reshape(-1), L2))
        else:
            pending: list[_Factor] = []
            for factor in self.trimmed:
                pending.append(factor)
                if sum(f.tiles for f in pending) >= size or factor is self.trimmed[-1]:
                    groups.append(_group(pending, np.concatenate([f.cell_index for f in pending]), self.L * self.L))
                    pending = []
        self._plans[key] = groups
        return groups

    # ----------------------------------------------------------------- application
    def _state(
        self, size: int, dtype: torch.dtype, device: torch.device, spare_zeros: int | None = None
    ) -> tuple[Tensor, Tensor]:
        """Two reused flat work buffers of ``size`` entries: the first zeroed, the second zeroed
        too, or only its first and last ``spare_zeros`` entries (where every factor overwrites
        the rest before it is read)."""
        # Buffers made under inference mode (an evaluation loop) are inference tensors, which may not
        # be written outside it (and vice versa for autograd's version counters): one pair per mode.
        key = (dtype, device, torch.is_inference_mode_enabled())
        bufs = self._buffers.get(key)
        if bufs is None or bufs[0].numel() < size:
            bufs = self._buffers[key] = (
                torch.empty(size, dtype=dtype, device=device),
                torch.empty(size, dtype=dtype, device=device),
            )
        cur, nxt = bufs[0][:size], bufs[1][:size]
        cur.zero_()
        if spare_zeros is None:
            nxt.zero_()
        else:
            nxt[:spare_zeros].zero_()
            nxt[-spare_zeros:].zero_()
        return cur, nxt

    def _blocks(self, cell: CellFn, theta_t: Tensor, group: _Group, eye: Tensor) -> Tensor:
        """The group's blocks for every setting, (K, tiles, 2L, 2L) in the group's tile order: the
        identity pushed through each tile's 2L − 1 local columns.

        Built with the settings and tiles innermost, (2L, 2L, tiles, K), so that every operation
        runs over long contiguous vectors, then transposed once for the GEMMs. ``theta_t`` is θᵀ
        (2·cells, K)."""
        L, k = self.L, theta_t.shape[1]
        if cell in native.CELLS and native.supports(theta_t, L):  # entries and blocks in one compiled pass
            return native.cell_blocks(native.CELLS[cell], theta_t, group.slot_cell, self._steps_array, L)
        if group.theta_index.device != theta_t.device:
            group.theta_index, group.phi_index = (
                group.theta_index.to(theta_t.device),
                group.phi_index.to(theta_t.device),
            )
            group.missing = None if group.missing is None else group.missing.to(theta_t.device)
        coef = cell(theta_t[group.theta_index], theta_t[group.phi_index])  # (4, L², tiles, K)
        if group.missing is not None:
            flat = coef.view(4, -1, k)
            flat[:, group.missing] = 0
            flat[0::3, group.missing] = 1  # an empty slot is the identity: T00 = T11 = 1
        if native.supports(coef, L):  # the same loop below, compiled, in one pass (devices/tile_blocks.c)
            return native.tile_blocks(coef.contiguous(), self._steps_array, L)
        blocks = eye[:, :, None, None].expand(2 * L, 2 * L, group.tiles, k).clone()
        for s0, s1, r0, c0, c1 in self.steps:
            count = s1 - s0
            rows = blocks[r0 : r0 + 2 * count, c0:c1].unflatten(0, (count, 2))  # (count, 2, ≤ 2L, tiles, K)
            top, bottom = rows[:, 0], rows[:, 1]
            t00, t01, t10, t11 = coef[:, s0:s1, None]  # each (count, 1, tiles, K)
            new_top = top * t00
            new_top.addcmul_(bottom, t01)
            bottom.mul_(t11).addcmul_(top, t10)
            top.copy_(new_top)
        return blocks.permute(3, 2, 0, 1).contiguous()

    @torch.no_grad()
    def apply(self, cell: CellFn, theta: Tensor, x: Tensor) -> Tensor:
        """Re(U(θ_k) x_b)[:m] for settings theta (K, 2·cells) (pairs (θ, φ) per cell, mesh order)
        and real rows x (B, n) or (K, B, n) → (K, B, m). No autograd."""
        k, L, rows = theta.shape[0], self.L, self.rows
        batch = x.shape[-2]
        cdtype = complex_dtype(theta.dtype)
        eye = torch.eye(2 * L, dtype=cdtype, device=theta.device)
        on_cpu = theta.device.type == "cpu"
        uniform = not on_cpu or k > TRIMMED_MAX_SETTINGS
        # (2·cells, K): a slot's phases for all settings side by side; the native build with a
        # built-in cell reads them through θ's own strides, the rest wants them contiguous
        theta_t = theta.T if cell in native.CELLS and native.supports(theta, L) else theta.T.contiguous()
        # a factor's blocks times the state: the native kernel where it is the faster (small blocks,
        # one thread on a CPU), else the BLAS
        product = native.tile_gemm if native.gemm_wins(eye, 2 * L) else (lambda a, b, out: torch.bmm(a, b, out=out))
        # Uniform: the windows of an odd factor run L rows past the last setting's state, and
        # every factor writes all rows but the L at either end of the buffer (zero padding).
        cur, nxt = self._state(
            (k * rows + (L if uniform else 0)) * batch, cdtype, theta.device, spare_zeros=L * batch if uniform else None
        )
        cur[: k * rows * batch].view(k, rows, batch)[:, self.pad : self.pad + self.d_in].copy_(x.transpose(-1, -2))
        if uniform:
            tiles = rows // (2 * L)
            budget = UNIFORM_BUDGET_CPU if on_cpu else UNIFORM_BUDGET_GPU
            for group in self._plan(True, max(1, budget // (k * tiles))):
                blocks = self._blocks(cell, theta_t, group, eye).view(k, tiles, len(group.factors), 2 * L, 2 * L)
                for f, factor in enumerate(group.factors):
                    span = slice(factor.row0 * batch, (factor.row0 + k * rows) * batch)
                    product(
                        blocks[:, :, f].flatten(0, 1),
                        cur[span].view(k * tiles, 2 * L, batch),
                        nxt[span].view(k * tiles, 2 * L, batch),
                    )
                    cur, nxt = nxt, cur
        else:
            state, spare = cur.view(k, rows, batch), nxt.view(k, rows, batch)
            for group in self._plan(False, max(1, TRIMMED_BUDGET // k)):
                blocks = self._blocks(cell, theta_t, group, eye)
                first = 0
                for factor in group.factors:
                    span = slice(factor.row0, factor.row0 + 2 * L * factor.tiles)
                    src = state[:, span].unflatten(1, (factor.tiles, 2 * L))
                    dst = spare[:, span].unflatten(1, (factor.tiles, 2 * L))
                    for i in range(k):
                        product(blocks[i, first : first + factor.tiles], src[i], dst[i])
                    first += factor.tiles
                    state, spare = spare, state
            cur = state.flatten()
        out = cur[: k * rows * batch].view(k, rows, batch)[:, self.pad : self.pad + self.d_out]
        # (K, B, m), contiguous (a clone would keep the transposed strides, and its readers copy again)
        return torch.empty((k, batch, self.d_out), dtype=theta.dtype, device=theta.device).copy_(
            out.real.transpose(-1, -2)
        )
