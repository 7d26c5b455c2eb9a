"""The MZI mesh of K settings in one Triton kernel launch (``device.engine=fused``, for GPUs).

    y[k] = x Re(U(θ_k))[:m, :n]ᵀ   for K settings θ_k of a rectangular mesh of N wires,

or, given weights w (B, m), only the K inner products φ_k = Σ_b ⟨y_k,b, w_b⟩ (the zeroth-order
estimator's φ, ALGORITHM.md §3: w = G for the batch, w = I_m for the compressed batch's m rows).

Grid and layout. One program per (block of ``BLOCK_B`` input rows, setting k): program (r, k) reads
its rows of x (B, n) (or of x[k] for inputs (K, B, n)) and the N(N − 1) phases of θ_k once, loops
over the N mesh columns and writes its rows of y (or one partial inner product) once. Between the
first read and the last write nothing goes through memory:

* **state** (on chip, in registers; where it does not fit, the compiler spills): the complex
  amplitudes of the program's rows on all N wires as four float32 planes (BLOCK_B, NH),
  real and imaginary part of the *top* and *bottom* wire of each pair slot j of the current
  column's pairing. NH = N/2 rounded up to a power of two (slots past the mesh hold zeros).
  Even columns pair wires (2j, 2j + 1), odd columns (2j + 1, 2j + 2); wire 0, which an odd
  column leaves alone, waits in its own (BLOCK_B,) pair of registers. Between columns the
  pairing changes by renaming one plane and shifting the other by one slot (``tl.gather``
  along the slots: register shuffles, or shared memory where a row spans several warps):

      even → odd:  top'_j = bottom_j,      bottom'_j = top_{j+1},          wire 0 = top_0
      odd → even:  top_j = bottom'_{j−1}  (wire 0 for j = 0),  bottom_j = top'_j

* **cells**, built on chip column by column from θ_k: a column's N or N − 2 phases are loaded
  (contiguous: the flat θ is ordered column by column, MZIMesh's layout) and its 2 × 2 entries
  computed by the same formulas as :func:`~astraora.devices.mzi.paper_cell_entries` and
  :func:`~astraora.devices.mzi.classical_cell_entries` (written once here, ``_paper_cell`` and
  ``_classical_cell``; ``tests/test_fused.py`` compares them with the Python cells). Slots
  without a cell are the identity. No (K, cells, 2, 2) tensor and no block is ever stored.
* **settings**, two modes. *Explicit*: θ_k is row k of a (K, p) tensor (what
  :meth:`~astraora.ledger.QueryLedger.query_settings` passes). *Drawn*: only the base θ (p,) is
  read, and the Gaussian direction u_i is generated on chip by Philox, ``tl.randn(seed, i·p + j)``
  for phase j of direction i, so θ_k = θ + step·u_{d_k} for the direction indices d (K,): no
  K × p tensor exists, the stream does not depend on how directions are chunked, and
  :func:`directions` redraws the same u (K, p); :func:`combine` forms the estimate Σ c_i u_i from
  the seed without storing any u (what the ZO estimator does on ``device.engine=fused``:
  :meth:`~astraora.ledger.QueryLedger.query_drawn`).
* **output**: the real part of wires [0, m) (readings, (K, B, m)), or per program one partial
  Σ_rows Σ_wires y·w, summed over the row blocks by PyTorch (a fixed order: φ_k does not depend
  on how many settings share a launch, nor on the launch order).

Cost per program: N²/2 cell builds (4 sin/cos each; in the drawn mode also 2 Philox normals) shared
by BLOCK_B rows, and 4 complex multiply-adds per cell and row. The kernel computes every wire of
every column (no light-cone trimming as in the tile engine): lopsided meshes do full work.

Triton's interpreter. ``triton.jit`` chooses between compiling and interpreting when it decorates a
function, and triton's own ``tl.randn`` is decorated when triton is imported: ``TRITON_INTERPRET=1``
must be in the environment before triton is first imported (tests/test_fused.py runs its checks
in a subprocess for this). The kernels then run on CPU tensors, slowly. Float32 only; no autograd.
"""

from __future__ import annotations

from types import SimpleNamespace

import torch
from torch import Tensor

try:
    import triton
    import triton.language as tl
except ImportError:  # the engine is then refused (problem())
    triton = tl = None

CELL_PAPER = 0  # the paper's cell, each cell's pair stored (θ, φ) (MZIMesh)
CELL_CLASSICAL = 1  # the classical cell, each cell's pair stored (φ, θ), external phase first (MZIClassical)

STATE_BUDGET = 4096  # pair slots × rows per program: the four state planes hold 4 × this many floats
NUM_WARPS: int | None = None  # warps per program; None: 4 up to 2048 pair slots × rows, else 8
MAX_SETTINGS = 65535  # settings per launch: the grid's second axis on CUDA


def interpreting() -> bool:
    """Whether Triton runs kernels in its interpreter (``TRITON_INTERPRET=1``, read now)."""
    return triton is not None and bool(triton.knobs.runtime.interpret)


def problem(like: Tensor | None = None) -> str | None:
    """Why the fused engine cannot run here (a phrase), or None. Without ``like``: whether Triton is
    importable and CUDA (or the interpreter) available; with it: whether tensors like it can run."""
    if triton is None:
        return "needs triton, which is not importable here"
    if like is None:
        if not torch.cuda.is_available() and not interpreting():
            return "needs a CUDA device (none here; TRITON_INTERPRET=1 runs triton's interpreter on a CPU, for tests)"
        return None
    if like.device.type != "cuda" and not interpreting():
        where = like.device.type
        return f"needs CUDA tensors, the mesh is on {where} (TRITON_INTERPRET=1: triton's interpreter, tests)"
    if like.dtype != torch.float32:
        return f"computes in float32, the mesh is {like.dtype}"
    return None


def _next_pow2(value: int) -> int:
    return 1 << max(0, int(value) - 1).bit_length()


def launch_shape(modes: int, batch: int) -> tuple[int, int, int]:
    """(NH, BLOCK_B, num_warps) for a mesh of ``modes`` wires and ``batch`` rows: as many rows per
    program as keep the state within :data:`STATE_BUDGET` slot-rows (at least one row), and
    :data:`NUM_WARPS` warps (a first guess where None; scripts/gpu_check.py times alternatives)."""
    slots = _next_pow2(modes // 2)
    rows = max(1, min(_next_pow2(batch), STATE_BUDGET // slots))
    warps = NUM_WARPS if NUM_WARPS is not None else (4 if slots * rows <= 2048 else 8)
    return slots, rows, warps


# ----------------------------------------------------------------------------- the kernels
# Defined at import, compiled or interpreted as TRITON_INTERPRET says then: triton.jit decides when it
# decorates (triton's own tl.randn is decorated when triton is imported), and the interpreter runs a
# kernel's source against this module's globals, so the kernels and what they call are module-level.
_INTERPRETED = interpreting()
jit = triton.jit if triton is not None else (lambda fn=None, **_: fn if fn is not None else (lambda f: f))


@jit
def _paper_cell(theta, phi):
    """The paper's cell (mzi.paper_cell_entries): T00, T01, T10, T11 as (re, im) pairs."""
    alpha = (theta - phi) / 2
    beta = (theta + phi) / 2
    sin_a = tl.sin(alpha)
    cos_a = tl.cos(alpha)
    sin_b = tl.sin(beta)
    cos_b = tl.cos(beta)
    c = cos_b / 1.4142135623730951
    s = sin_b / 1.4142135623730951
    c_sa = c * sin_a
    s_sb = s * sin_b
    c_cb = c * cos_b
    s_ca = s * cos_a
    return (
        c_sa - s_sb,
        s * (sin_a + cos_b),
        -(c * (cos_a + sin_b)),
        c_cb - s_ca,
        c * (cos_a - sin_b),
        c_cb + s_ca,
        c_sa + s_sb,
        s * (sin_a - cos_b),
    )


@jit
def _classical_cell(theta, phi):
    """The classical cell, splitting angle θ, external phase φ (mzi.classical_cell_entries):
    e^{iφ} sin θ, e^{iφ} cos θ, cos θ, −sin θ as (re, im) pairs."""
    sin_t = tl.sin(theta)
    cos_t = tl.cos(theta)
    sin_p = tl.sin(phi)
    cos_p = tl.cos(phi)
    zero = sin_t * 0.0
    return cos_p * sin_t, sin_p * sin_t, cos_p * cos_t, sin_p * cos_t, cos_t, zero, -sin_t, zero


@jit
def _cell(first, second, CELL: tl.constexpr):
    """A cell's entries from its pair of phases as θ stores it."""
    if CELL == 0:
        entries = _paper_cell(first, second)
    else:
        entries = _classical_cell(second, first)
    return entries


@jit
def _cells_kernel(theta_ptr, phi_ptr, out_ptr, count, CELL: tl.constexpr, BLOCK: tl.constexpr):
    """Entries of ``count`` cells, (8, count): re/im of T00, T01, T10, T11 (tests)."""
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < count
    theta = tl.load(theta_ptr + offs, mask=mask, other=0.0)
    phi = tl.load(phi_ptr + offs, mask=mask, other=0.0)
    if CELL == 0:
        entries = _paper_cell(theta, phi)
    else:
        entries = _classical_cell(theta, phi)
    for e in tl.static_range(8):
        tl.store(out_ptr + e * count + offs, entries[e], mask=mask)


@jit
def _pairs(theta_ptr, stride_tk, dir_ptr, seed, step, k, first, count, p, slot, DRAWN: tl.constexpr):
    """The two phases of a column's cells in slots ``slot`` (cell j's at first + 2j, first + 2j + 1)
    for setting k, and which slots hold a cell."""
    valid = slot < count
    index = first + 2 * slot
    if DRAWN:
        a = tl.load(theta_ptr + index, mask=valid, other=0.0)
        b = tl.load(theta_ptr + index + 1, mask=valid, other=0.0)
        stream = tl.load(dir_ptr + k).to(tl.int64) * p  # direction d_k's first Philox offset
        a = a + step * tl.randn(seed, stream + index)
        b = b + step * tl.randn(seed, stream + index + 1)
    else:
        row = theta_ptr + k.to(tl.int64) * stride_tk
        a = tl.load(row + index, mask=valid, other=0.0)
        b = tl.load(row + index + 1, mask=valid, other=0.0)
    return a, b, valid


@jit
def _mix(top_re, top_im, bot_re, bot_im, first, second, valid, CELL: tl.constexpr):
    """One column: top ← T00 top + T01 bottom, bottom ← T10 top + T11 bottom in every slot
    (the identity where ``valid`` is false)."""
    t00r, t00i, t01r, t01i, t10r, t10i, t11r, t11i = _cell(first, second, CELL)
    t00r = tl.where(valid, t00r, 1.0)[None, :]
    t00i = tl.where(valid, t00i, 0.0)[None, :]
    t01r = tl.where(valid, t01r, 0.0)[None, :]
    t01i = tl.where(valid, t01i, 0.0)[None, :]
    t10r = tl.where(valid, t10r, 0.0)[None, :]
    t10i = tl.where(valid, t10i, 0.0)[None, :]
    t11r = tl.where(valid, t11r, 1.0)[None, :]
    t11i = tl.where(valid, t11i, 0.0)[None, :]
    new_top_re = t00r * top_re - t00i * top_im + t01r * bot_re - t01i * bot_im
    new_top_im = t00r * top_im + t00i * top_re + t01r * bot_im + t01i * bot_re
    new_bot_re = t10r * top_re - t10i * top_im + t11r * bot_re - t11i * bot_im
    new_bot_im = t10r * top_im + t10i * top_re + t11r * bot_im + t11i * bot_re
    return new_top_re, new_top_im, new_bot_re, new_bot_im


@jit
def _shift(plane, by: tl.constexpr, NH: tl.constexpr):
    """plane[:, j + by] in slot j (zero where j + by is outside [0, NH))."""
    source = tl.arange(0, NH)[None, :] + by
    inside = (source >= 0) & (source < NH)
    index = tl.broadcast_to(tl.minimum(tl.maximum(source, 0), NH - 1), plane.shape)
    return tl.where(inside, tl.gather(plane, index, axis=1), 0.0)


@jit(do_not_specialize=["seed"])
def _mesh_kernel(
    x_ptr,
    stride_xk,
    stride_xb,
    theta_ptr,
    stride_tk,
    dir_ptr,
    seed,
    step,
    w_ptr,
    stride_wb,
    out_ptr,
    stride_ok,
    stride_ob,
    batch,
    n,
    m,
    modes,
    p,
    NH: tl.constexpr,
    BLOCK_B: tl.constexpr,
    CELL: tl.constexpr,
    DRAWN: tl.constexpr,
    PRODUCTS: tl.constexpr,
):
    """Program (row block, setting k): its rows through the N columns, state in registers (module
    docstring); writes the real part of wires [0, m), or with PRODUCTS one partial Σ y·w."""
    block = tl.program_id(0)
    k = tl.program_id(1)
    rows = block * BLOCK_B + tl.arange(0, BLOCK_B)
    slot = tl.arange(0, NH)
    wire = 2 * slot[None, :]  # the top wire of each slot in the even pairing
    live = (rows < batch)[:, None]
    # the state in the even pairing: top = wire 2j, bottom = wire 2j + 1; x is real
    x_rows = x_ptr + k.to(tl.int64) * stride_xk + rows[:, None].to(tl.int64) * stride_xb
    top_re = tl.load(x_rows + wire, mask=live & (wire < n), other=0.0)
    bot_re = tl.load(x_rows + wire + 1, mask=live & (wire + 1 < n), other=0.0)
    top_im = tl.zeros_like(top_re)
    bot_im = tl.zeros_like(bot_re)
    half = modes // 2
    for t in range(half):
        # even column 2t: N/2 cells on (2j, 2j + 1), phases from 2t(N − 1)
        a, b, valid = _pairs(theta_ptr, stride_tk, dir_ptr, seed, step, k, 2 * t * (modes - 1), half, p, slot, DRAWN)
        top_re, top_im, bot_re, bot_im = _mix(top_re, top_im, bot_re, bot_im, a, b, valid, CELL)
        # to the odd pairing: top' = wire 2j + 1, bottom' = wire 2j + 2; wire 0 set aside
        w0_re = tl.sum(tl.where(slot[None, :] == 0, top_re, 0.0), axis=1)
        w0_im = tl.sum(tl.where(slot[None, :] == 0, top_im, 0.0), axis=1)
        top_re, top_im, bot_re, bot_im = bot_re, bot_im, _shift(top_re, 1, NH), _shift(top_im, 1, NH)
        # odd column 2t + 1: N/2 − 1 cells on (2j + 1, 2j + 2), phases from (2t + 1)(N − 1) + 1
        a, b, valid = _pairs(
            theta_ptr, stride_tk, dir_ptr, seed, step, k, (2 * t + 1) * (modes - 1) + 1, half - 1, p, slot, DRAWN
        )
        top_re, top_im, bot_re, bot_im = _mix(top_re, top_im, bot_re, bot_im, a, b, valid, CELL)
        # back to the even pairing
        first = slot[None, :] == 0
        top_re, top_im, bot_re, bot_im = (
            tl.where(first, w0_re[:, None], _shift(bot_re, -1, NH)),
            tl.where(first, w0_im[:, None], _shift(bot_im, -1, NH)),
            top_re,
            top_im,
        )
    # the real part of wires [0, m)
    if PRODUCTS:
        w_rows = w_ptr + rows[:, None].to(tl.int64) * stride_wb
        w_top = tl.load(w_rows + wire, mask=live & (wire < m), other=0.0)
        w_bot = tl.load(w_rows + wire + 1, mask=live & (wire + 1 < m), other=0.0)
        partial = tl.sum(tl.sum(top_re * w_top + bot_re * w_bot, axis=1), axis=0)
        tl.store(out_ptr + k.to(tl.int64) * stride_ok + block, partial)
    else:
        y_rows = out_ptr + k.to(tl.int64) * stride_ok + rows[:, None].to(tl.int64) * stride_ob
        tl.store(y_rows + wire, top_re, mask=live & (wire < m))
        tl.store(y_rows + wire + 1, bot_re, mask=live & (wire + 1 < m))


@jit(do_not_specialize=["seed"])
def _directions_kernel(dir_ptr, out_ptr, seed, p, BLOCK: tl.constexpr):
    """u (K, p): row k is direction d_k, phase j drawn as in the drawn mode of the mesh kernel."""
    k = tl.program_id(1)
    index = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    stream = tl.load(dir_ptr + k).to(tl.int64) * p
    u = tl.randn(seed, stream + index)
    tl.store(out_ptr + k.to(tl.int64) * p + index, u, mask=index < p)


@jit(do_not_specialize=["seed", "first"])
def _combine_kernel(c_ptr, out_ptr, seed, first, count, p, BLOCK: tl.constexpr):
    """out[j] = Σ_i c_i · u_{first + i, j} over i < count for phases j of one block: the directions of
    the drawn mode regenerated in registers (the same ``tl.randn(seed, d·p + j)``), never stored."""
    index = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    total = tl.zeros((BLOCK,), dtype=tl.float32)
    for i in range(count):
        stream = (first + i).to(tl.int64) * p
        total += tl.load(c_ptr + i) * tl.randn(seed, stream + index)
    tl.store(out_ptr + index, total, mask=index < p)


def kernels() -> SimpleNamespace:
    """The kernels, compiled, or run by Triton's interpreter when ``TRITON_INTERPRET=1`` was set
    before triton and this module were imported."""
    if triton is None:
        raise RuntimeError("the fused mesh kernels need triton, which is not importable here")
    if interpreting() != _INTERPRETED:
        raise RuntimeError(
            "TRITON_INTERPRET changed after the fused kernels were defined: set it before triton is imported"
        )
    return SimpleNamespace(
        cells=_cells_kernel, mesh=_mesh_kernel, directions=_directions_kernel, combine=_combine_kernel
    )


# ----------------------------------------------------------------------------- entry points
def cell_entries(theta: Tensor, phi: Tensor, cell: int) -> Tensor:
    """The kernel's cell formula on phases θ, φ (float32, same shape S) → (4, *S) complex T00, T01,
    T10, T11, with :data:`CELL_PAPER` as paper_cell_entries(θ, φ) and :data:`CELL_CLASSICAL` as
    classical_cell_entries(θ, φ) (angle first). For the tests."""
    theta, phi = theta.contiguous(), phi.contiguous()
    count = theta.numel()
    out = torch.empty(8, count, dtype=torch.float32, device=theta.device)
    block = min(1024, _next_pow2(count))
    kernels().cells[(triton.cdiv(count, block),)](theta, phi, out, count, CELL=cell, BLOCK=block)
    out = out.view(4, 2, *theta.shape)
    return torch.complex(out[:, 0], out[:, 1])


def directions(seed: int, indices: Tensor, p: int) -> Tensor:
    """The Gaussian directions u_{d_k} (K, p) float32 that the drawn mode adds for direction indices
    ``indices`` (K,) (int64, on the kernel's device) and ``seed``: phase j of direction d is
    ``tl.randn(seed, d·p + j)``."""
    indices = indices.to(torch.int64).contiguous()
    out = torch.empty(indices.numel(), p, dtype=torch.float32, device=indices.device)
    if out.numel():
        block = min(1024, _next_pow2(p))
        kernels().directions[(triton.cdiv(p, block), indices.numel())](indices, out, int(seed), p, BLOCK=block)
    return out


def combine(seed: int, coefficients: Tensor, p: int, first: int = 0) -> Tensor:
    """Σ_i c_i u_{first + i} (p,) float32 for coefficients c (K,) (on the kernel's device) and the
    directions of the drawn mode (:func:`directions` gives the same u): one launch, the directions
    regenerated block by block in registers, so no K × p tensor exists. The sum over i runs in
    index order for every phase."""
    coefficients = coefficients.detach().to(torch.float32).reshape(-1).contiguous()
    out = torch.empty(p, dtype=torch.float32, device=coefficients.device)
    if p:
        block = min(1024, _next_pow2(p))
        kernels().combine[(triton.cdiv(p, block),)](
            coefficients, out, int(seed), int(first), coefficients.numel(), p, BLOCK=block
        )
    return out


def _launch(cell: int, theta, stride_tk, k, x, modes, d_out, drawn, dirs, seed, step, weights) -> Tensor:
    """One launch of the mesh kernel (``drawn``: ``theta`` is the base θ, ``dirs`` the direction indices)."""
    if x.dim() not in (2, 3) or (x.dim() == 3 and x.shape[0] != k):
        raise ValueError(f"x must be (B, n) or (K={k}, B, n), not {tuple(x.shape)}")
    if k > MAX_SETTINGS:
        raise ValueError(f"at most {MAX_SETTINGS} settings per call (the launch grid's second axis), not {k}")
    x = x.to(torch.float32).contiguous()
    batch, d_in = x.shape[-2], x.shape[-1]
    if not 1 <= d_in <= modes or not 1 <= d_out <= modes or modes % 2:
        raise ValueError(f"a mesh of {modes} wires (even) has no {d_in} inputs / {d_out} outputs")
    slots, rows, warps = launch_shape(modes, batch)
    blocks = triton.cdiv(max(batch, 1), rows)
    stride_xk = x.stride(0) if x.dim() == 3 else 0
    device = theta.device
    if weights is None:
        out = torch.empty(k, batch, d_out, dtype=torch.float32, device=device)
        w, stride_wb, stride_ok, stride_ob = out, 0, out.stride(0), out.stride(1)
    else:
        if weights.shape != (batch, d_out):
            raise ValueError(f"weights must be (B, m) = ({batch}, {d_out}), not {tuple(weights.shape)}")
        w = weights.to(torch.float32).contiguous()
        out = torch.empty(k, blocks, dtype=torch.float32, device=device)
        stride_wb, stride_ok, stride_ob = w.stride(0), out.stride(0), 0
    if k and batch:
        kernels().mesh[(blocks, k)](
            x,
            stride_xk,
            x.stride(-2),
            theta,
            stride_tk,
            dirs,
            int(seed),
            float(step),
            w,
            stride_wb,
            out,
            stride_ok,
            stride_ob,
            batch,
            d_in,
            d_out,
            modes,
            modes * (modes - 1),
            NH=slots,
            BLOCK_B=rows,
            CELL=int(cell),
            DRAWN=drawn,
            PRODUCTS=weights is not None,
            num_warps=warps,
        )
    elif weights is not None:
        out.zero_()
    return out if weights is None else out.sum(1)


def transfer(cell: int, settings: Tensor, x: Tensor, modes: int, d_out: int, weights: Tensor | None = None) -> Tensor:
    """Explicit settings: Re(U(θ_k) x_b)[:m] for settings (K, N(N − 1)) (float32, each cell's pair as
    the device of cell code ``cell`` stores it: :data:`CELL_PAPER` or :data:`CELL_CLASSICAL`) and
    real rows x (B, n) or (K, B, n) → readings (K, B, m); with ``weights`` (B, m) only the K inner
    products Σ_b ⟨y_k,b, w_b⟩ (K,). One launch, no autograd."""
    settings = settings.detach().to(torch.float32)
    if settings.dim() != 2 or settings.shape[1] != modes * (modes - 1):
        raise ValueError(f"settings must be (K, {modes * (modes - 1)}), not {tuple(settings.shape)}")
    if settings.stride(1) != 1:
        settings = settings.contiguous()
    k = settings.shape[0]
    return _launch(cell, settings, settings.stride(0), k, x, modes, d_out, False, settings, 0, 0.0, weights)


def transfer_drawn(
    cell: int,
    base: Tensor,
    x: Tensor,
    modes: int,
    d_out: int,
    *,
    seed: int,
    indices: Tensor,
    step: float,
    weights: Tensor | None = None,
) -> Tensor:
    """Drawn directions: as :func:`transfer` at the settings θ + step·u_{d_k} for the base θ (p,),
    with u_d the Gaussian direction d generated on chip from ``seed`` (:func:`directions` gives the
    same u) and d_k = ``indices[k]`` (K,). ``step`` = −μ gives the other side of a two-sided
    difference with the same directions."""
    base = base.detach().to(torch.float32).reshape(-1).contiguous()
    if base.numel() != modes * (modes - 1):
        raise ValueError(f"base must hold {modes * (modes - 1)} phases, not {base.numel()}")
    indices = indices.to(device=base.device, dtype=torch.int64).contiguous()
    return _launch(cell, base, 0, indices.numel(), x, modes, d_out, True, indices, seed, step, weights)


def explicit_estimator(seed: int, **options):
    """A :class:`~astraora.zo.ZOEstimator` on the explicit route whose directions are the drawn mode's
    u_0, u_1, … of ``seed`` (:func:`directions`), handed out in order: the standard estimator's formula
    applied to the directions the drawn route generates on chip, for comparing the two routes
    (tests, scripts/gpu_check.py). ``options``: the estimator's keyword arguments. Every attempt of an
    estimate (a deferred-check retry included) starts again at u_0; single process only (no reducer),
    and never on a ledger that answers drawn queries (it would take the drawn route)."""
    from astraora.zo.estimator import ZOEstimator

    class SameDirections(ZOEstimator):
        issued = 0

        def _estimate(self, ledger, x, g, y, check):
            if self.reducer is not None or ledger.drawn_queries("zo"):
                raise ValueError("explicit_estimator: a single process on the explicit route only")
            self.issued = 0
            return super()._estimate(ledger, x, g, y, check)

        def directions(self, k, p, dtype, device="cpu", out=None):
            index = torch.arange(self.issued, self.issued + k, device=device)
            u = directions(seed, index, p).to(dtype)
            self.issued += k
            return u if out is None else out[:k].copy_(u)

    return SameDirections(generator=torch.Generator().manual_seed(0), **options)
