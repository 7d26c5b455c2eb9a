"""Native (C) kernels for the MZI tile engine, compiled on first use and cached.

Two kernels (``tile_blocks.c``), each for float32 and float64: the tile engine's block build (per
tile and setting, the identity pushed through the tile's local columns, in one pass instead of tens
of PyTorch elementwise operations per group of factors), from given cell entries or with the
built-in cells' entries computed in the same pass, and its products (a factor's 2L × 2L blocks
times the state, faster than the BLAS's batched complex GEMM at these sizes: docs/PERFORMANCE.md).
They are compiled with the system C compiler (``$CC``, else ``cc``)
for this machine's CPU the first time a process needs them, without floating-point contraction, so
that every CPU computes the same bits whatever its vector width (tests/test_reproducible.py), into

    $ASTRAORA_CACHE_DIR or $XDG_CACHE_HOME/astraora or ~/.cache/astraora   (kernels/…)

(or the temporary directory where that cannot be written), under a name that hashes the source,
the flags and the CPU, so that machines sharing a home directory (a cluster) never load a library
built for another CPU; concurrent processes (DDP, sweeps) each write their own temporary file and
rename it into place. Where no compiler is found or the build fails, the PyTorch implementation
runs instead (the same numbers to float32 round-off), with one warning. ``ASTRAORA_NATIVE=0``
turns the kernels off. GPUs always take the PyTorch path.

Every C entry point has its signature declared to ctypes (:class:`Kernels`) and one typed wrapper
here (:func:`tile_blocks`, :func:`cell_blocks`, :func:`tile_gemm`) that checks the tensors' dtype,
device, shape and layout and raises TypeError or ValueError before anything reaches C.

``ASTRAORA_NATIVE_SANITIZE=1`` builds the kernels with AddressSanitizer and UndefinedBehaviorSanitizer
instead (a separate cached file; a failed build or load then raises rather than falling back). Python
must run with the ASan runtime preloaded; scripts/check_native.sh does this.
"""

from __future__ import annotations

import ctypes
import hashlib
import logging
import os
import platform
import shutil
import subprocess
import tempfile
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

log = logging.getLogger(__name__)

SOURCE = Path(__file__).with_name("tile_blocks.c")
# -ffp-contract=off: no fused multiply-adds the source does not write, so every x86-64 CPU (and vector
# width) gets the same bits: the kernels' loops are elementwise over settings or accumulate in a fixed
# order, and without -ffast-math the compiler never reassociates them (tests/test_reproducible.py).
ARCH = ["-march=native"]
FLAGS = ["-O3", *ARCH, "-ffp-contract=off", "-fno-fast-math", "-fPIC", "-shared"]
# ASTRAORA_NATIVE_SANITIZE=1: every out-of-bounds access and undefined operation stops the process
SANITIZE = ["-fsanitize=address,undefined", "-fno-sanitize-recover=all", "-fno-omit-frame-pointer", "-g"]
SANITIZE_FLAGS = ["-O1", *SANITIZE, *FLAGS[1:]]
LIBS = ["-lm"]
# the kernels' precision suffix per dtype of phases (real) or amplitudes (complex)
_SUFFIX = {torch.float32: "f32", torch.complex64: "f32", torch.float64: "f64", torch.complex128: "f64"}
_REAL = (torch.float32, torch.float64)
_COMPLEX = (torch.complex64, torch.complex128)
MAX_TILE = 32  # L: the block build keeps a chunk's 2L × 2L blocks on the stack (2 · 4L² · 16 reals)
# cell formulas the block build computes itself (tile_blocks.c), by the Python function they equal;
# registered by devices/mzi.py. Any other cell function: entries by PyTorch, blocks native.
CELLS: dict[object, int] = {}
CELL_PAPER, CELL_CLASSICAL = 0, 1
_lock = threading.Lock()
_library: Kernels | None = None
_tried = False


def enabled() -> bool:
    """Whether native kernels may be used (``ASTRAORA_NATIVE`` is not 0/false/off)."""
    return os.environ.get("ASTRAORA_NATIVE", "1").strip().lower() not in ("0", "false", "off", "no")


def sanitized() -> bool:
    """Whether the kernels are built with the sanitizers (``ASTRAORA_NATIVE_SANITIZE`` is 1/true/on)."""
    return os.environ.get("ASTRAORA_NATIVE_SANITIZE", "0").strip().lower() in ("1", "true", "on", "yes")


def build_flags() -> list[str]:
    """The compiler flags of this process's build: FLAGS, or SANITIZE_FLAGS (:func:`sanitized`)."""
    return SANITIZE_FLAGS if sanitized() else FLAGS


def cache_dir() -> Path:
    if os.environ.get("ASTRAORA_CACHE_DIR"):
        return Path(os.environ["ASTRAORA_CACHE_DIR"])
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "astraora"


def _cpu_signature() -> str:
    """What a ``-march=native`` build depends on: the architecture and the CPU's feature flags."""
    flags = ""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith(("flags", "Features", "model name")):
                    flags += line
    except OSError:
        flags = platform.processor()
    return f"{platform.machine()}|{flags}"


def library_path(compiler: str, flags: list[str] | None = None) -> Path:
    """Where the library built by ``compiler`` with ``flags`` (default :func:`build_flags`) lives: the name
    hashes the source, the compiler, every flag (so builds for different instruction sets never share a
    file) and, for ``-march=native``, the CPU; sanitizer builds are named apart."""
    flags = build_flags() if flags is None else flags
    key = hashlib.sha256(
        b"\0".join([SOURCE.read_bytes(), " ".join([compiler, *flags, *LIBS]).encode(), _cpu_signature().encode()])
    ).hexdigest()[:16]
    kind = "-sanitize" if any(flag.startswith("-fsanitize") for flag in flags) else ""
    return cache_dir() / "kernels" / f"tile_blocks{kind}-{key}.so"


def _writable(directory: Path) -> bool:
    try:
        directory.mkdir(parents=True, exist_ok=True)
    except OSError:
        return False
    return os.access(directory, os.W_OK)


def compile_library(compiler: str, flags: list[str] | None = None) -> Path:
    """Compile tile_blocks.c with ``flags`` (default :func:`build_flags`) unless the cache already holds
    that build; its path. Raises RuntimeError where the compiler is missing or fails."""
    if shutil.which(compiler) is None:
        raise RuntimeError(f"no C compiler ({compiler!r}) on PATH")
    flags = build_flags() if flags is None else flags
    target = library_path(compiler, flags)
    if not target.exists() and not _writable(target.parent):  # e.g. a read-only home on a cluster node
        user = os.getuid() if hasattr(os, "getuid") else "user"
        target = Path(tempfile.gettempdir()) / f"astraora-{user}" / "kernels" / target.name
    if not target.exists():
        target.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(suffix=".so", dir=target.parent)
        os.close(fd)
        try:
            done = subprocess.run(
                [compiler, *flags, "-o", tmp, str(SOURCE), *LIBS], capture_output=True, text=True, timeout=120
            )
            if done.returncode != 0:
                raise RuntimeError(f"{compiler} failed: {done.stderr.strip()[-500:]}")
            os.replace(tmp, target)  # atomic: a concurrent process sees the old name or the whole file
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)
    return target


# The C entry points (tile_blocks.c), per precision (suffix _f32 or _f64), with their signatures:
# pointers as addresses (c_void_p), the wrappers below having checked what they point to.
_PTR, _I64, _I32 = ctypes.c_void_p, ctypes.c_int64, ctypes.c_int32
SIGNATURES = {
    # (const T *coef, T *out, K, tiles, t_begin, t_end, L, const int32_t *steps, nsteps)
    "astraora_blocks_from_entries": [_PTR, _PTR, _I64, _I64, _I64, _I64, _I64, _PTR, _I64],
    # (const T *theta_t, cs, ks, const int64_t *slot_cell, int32_t cell, T *out, K, tiles, t_begin, t_end, L,
    #  const int32_t *steps, nsteps)
    "astraora_blocks_from_phases": [_PTR, _I64, _I64, _PTR, _I32, _PTR, _I64, _I64, _I64, _I64, _I64, _PTR, _I64],
    # (const T *a, astride, const T *x, T *out, count, W, B)
    "astraora_tile_gemm": [_PTR, _I64, _PTR, _PTR, _I64, _I64, _I64],
}


class Kernels:
    """A compiled tile_blocks.c: each entry point with its ctypes signature declared (a wrong number or
    type of arguments raises ctypes.ArgumentError), by name and precision suffix."""

    def __init__(self, path: Path):
        self.path = Path(path)
        self.cdll = ctypes.CDLL(str(path))
        self.functions = {}
        for name, argtypes in SIGNATURES.items():
            for suffix in ("f32", "f64"):
                fn = getattr(self.cdll, f"{name}_{suffix}")
                fn.argtypes, fn.restype = argtypes, None
                self.functions[name, suffix] = fn

    def __call__(self, name: str, dtype: torch.dtype):
        """The entry point ``name`` for tensors of ``dtype`` (real or complex, float32 or float64)."""
        return self.functions[name, _SUFFIX[dtype]]


def load(path: Path) -> Kernels:
    """A compiled library with its functions' signatures declared (what :func:`library` returns)."""
    return Kernels(path)


def _build() -> Kernels:
    return load(compile_library(os.environ.get("CC") or "cc"))


def library() -> Kernels | None:
    """The compiled kernels, building them on first call; None where disabled or unavailable."""
    global _library, _tried
    if not enabled():
        return None
    if not _tried:
        with _lock:
            if not _tried:
                try:
                    _library = _build()
                except Exception as err:  # no compiler, read-only cache, …: the PyTorch path still works
                    if sanitized():  # a sanitizer check must not pass by falling back to PyTorch
                        raise
                    log.warning(
                        "astraora: native tile kernel unavailable (%s); the MZI tile engine builds its "
                        "blocks with PyTorch operations instead (slower, same results). Set "
                        "ASTRAORA_NATIVE=0 to silence this.",
                        err,
                    )
                    _library = None
                _tried = True
    return _library


def supports(like: Tensor, tile: int = 1) -> bool:
    """Whether the kernels run on tensors like this one (CPU, float32/64 or complex64/128, built) for
    tiles of ``tile`` × ``tile`` cells (at most MAX_TILE)."""
    return like.device.type == "cpu" and like.dtype in _SUFFIX and tile <= MAX_TILE and library() is not None


# ----------------------------------------------------------------- typed wrappers, one per entry point
def _kernels() -> Kernels:
    lib = library()
    if lib is None:
        raise RuntimeError("the native tile kernels are not available (ASTRAORA_NATIVE=0, or no C compiler)")
    return lib


def _check(name: str, t: Tensor, dtypes: tuple, ndim: int, contiguous: bool = True) -> None:
    """TypeError unless ``t`` is a CPU tensor of one of ``dtypes``; ValueError unless it has ``ndim``
    dimensions (and is contiguous where asked)."""
    if not isinstance(t, Tensor) or t.dtype not in dtypes or not t.is_cpu:
        what = f"{t.dtype} on {t.device}" if isinstance(t, Tensor) else type(t).__name__
        raise TypeError(f"native kernel: {name} must be a CPU tensor of {' or '.join(map(str, dtypes))}, not {what}")
    if t.dim() != ndim:
        raise ValueError(f"native kernel: {name} must have {ndim} dimensions, not shape {tuple(t.shape)}")
    if contiguous and not t.is_contiguous():
        raise ValueError(f"native kernel: {name} must be contiguous (strides {t.stride()}); call .contiguous()")


def _check_steps(steps: np.ndarray, L: int) -> None:
    """The tile's local columns: int32 (2L − 1, 5) rows (s0, s1, r0, c0, c1) that stay inside a tile."""
    if not isinstance(L, int) or not 1 <= L <= MAX_TILE:
        raise ValueError(f"native kernel: the tile size L={L!r} must be an integer in [1, {MAX_TILE}]")
    if not isinstance(steps, np.ndarray) or steps.dtype != np.int32 or not steps.flags.c_contiguous:
        raise TypeError("native kernel: steps must be a C-contiguous int32 numpy array (TiledMesh._steps_array)")
    if steps.shape != (2 * L - 1, 5):
        raise ValueError(f"native kernel: steps must have shape {(2 * L - 1, 5)} for L={L}, not {steps.shape}")
    s0, s1, r0, c0, c1 = steps.T.astype(np.int64)
    if not (
        (0 <= s0).all() and (s0 <= s1).all() and (s1 <= L * L).all() and (0 <= r0).all()
        and (r0 + 2 * (s1 - s0) <= 2 * L).all() and (0 <= c0).all() and (c0 <= c1).all() and (c1 <= 2 * L).all()
    ):  # fmt: skip
        raise ValueError(f"native kernel: steps reach outside a {L} x {L} tile: {steps.tolist()}")


def _build_blocks(name: str, args: tuple, k: int, tiles: int, steps: np.ndarray, L: int, dtype: torch.dtype) -> Tensor:
    """Run block-build entry point ``name`` (arguments ``args`` before ``out``) over all tiles, split
    between threads (:func:`_split`); the blocks (K, tiles, 2L, 2L) of complex ``dtype``."""
    out = torch.empty((k, tiles, 2 * L, 2 * L), dtype=dtype)
    fn = _kernels()(name, dtype)

    def build(begin: int, end: int) -> None:
        fn(*args, out.data_ptr(), k, tiles, begin, end, L, steps.ctypes.data, len(steps))

    _split(build, tiles, 4 * k * L**3)  # per tile: settings · L² cells · ≤ 2L columns · 2 rows
    return out


def tile_blocks(coef: Tensor, steps: np.ndarray, L: int) -> Tensor:
    """Blocks (K, tiles, 2L, 2L) from cell entries ``coef``, contiguous complex (4, L², tiles, K), and
    the tile's local columns ``steps`` (int32 (2L − 1, 5): s0, s1, r0, c0, c1); see TiledMesh._blocks."""
    _check("coef", coef, _COMPLEX, 4)
    _check_steps(steps, L)
    if coef.shape[:2] != (4, L * L):
        raise ValueError(f"native kernel: coef must have shape (4, L² = {L * L}, tiles, K), not {tuple(coef.shape)}")
    _, _, tiles, k = coef.shape
    return _build_blocks("astraora_blocks_from_entries", (coef.data_ptr(),), k, tiles, steps, L, coef.dtype)


def cell_blocks(cell: int, theta_t: Tensor, slot_cell: Tensor, steps: np.ndarray, L: int) -> Tensor:
    """The same blocks with the cells' entries computed in the kernel (formula ``cell``, one of
    CELLS' values) from the phases ``theta_t`` (2·cells, K) float32/64, any non-negative strides (θᵀ as
    a view of θ (K, 2·cells) needs no copy), and each slot's cell ``slot_cell``, contiguous int64
    (L², tiles), −1 where empty."""
    if cell not in (CELL_PAPER, CELL_CLASSICAL):
        raise ValueError(f"native kernel: cell={cell!r} is neither CELL_PAPER ({CELL_PAPER}) nor CELL_CLASSICAL")
    _check("theta_t", theta_t, _REAL, 2, contiguous=False)
    _check("slot_cell", slot_cell, (torch.int64,), 2)
    _check_steps(steps, L)
    rows, k = theta_t.shape
    if rows % 2 or min(theta_t.stride()) < 0:
        raise ValueError(f"native kernel: theta_t must be (2·cells, K) with strides >= 0, not {tuple(theta_t.shape)}")
    if slot_cell.shape[0] != L * L:
        raise ValueError(f"native kernel: slot_cell must have L² = {L * L} rows, not {tuple(slot_cell.shape)}")
    if slot_cell.numel():
        low, high = torch.aminmax(slot_cell)
        if int(low) < -1 or int(high) >= rows // 2:
            raise ValueError(f"native kernel: slot_cell holds cells outside [-1, {rows // 2}) ({int(low)}…{int(high)})")
    complex_dtype = torch.complex128 if theta_t.dtype == torch.float64 else torch.complex64
    args = (theta_t.data_ptr(), *theta_t.stride(), slot_cell.data_ptr(), cell)
    return _build_blocks("astraora_blocks_from_phases", args, k, slot_cell.shape[1], steps, L, complex_dtype)


def tile_gemm(blocks: Tensor, x: Tensor, out: Tensor) -> None:
    """``out[i] = blocks[i] @ x[i]`` (``torch.bmm(blocks, x, out=out)``) for complex (count, W, W)
    blocks, W ≤ 16, whose matrices are contiguous but may be strided apart, and contiguous x, out
    (count, W, B) of the same dtype."""
    # called once per factor and setting: one cheap test here, the detailed messages only on a failure
    dtype, shape, strides = blocks.dtype, blocks.shape, blocks.stride()
    if not (
        dtype in _COMPLEX and x.dtype == dtype and out.dtype == dtype and blocks.is_cpu and x.is_cpu and out.is_cpu
        and len(shape) == 3 and shape[1] == shape[2] <= 16 and strides[2] == 1 and strides[1] == shape[1]
        and x.shape == out.shape and x.dim() == 3 and x.shape[0] == shape[0] and x.shape[1] == shape[1]
        and x.is_contiguous() and out.is_contiguous()
    ):  # fmt: skip
        _explain_gemm(blocks, x, out)
    count, width = shape[0], shape[1]
    (library() or _kernels()).functions["astraora_tile_gemm", _SUFFIX[dtype]](
        blocks.data_ptr(), strides[0] if count > 1 else width * width, x.data_ptr(), out.data_ptr(), count, width,
        x.shape[2],
    )  # fmt: skip


def _explain_gemm(blocks: Tensor, x: Tensor, out: Tensor) -> None:
    """The error for arguments :func:`tile_gemm` refuses."""
    _check("blocks", blocks, _COMPLEX, 3, contiguous=False)
    _check("x", x, (blocks.dtype,), 3)
    _check("out", out, (blocks.dtype,), 3)
    count, width, _ = blocks.shape
    if blocks.shape[2] != width or width > 16 or blocks.stride(2) != 1 or blocks.stride(1) != width:
        raise ValueError(
            f"native kernel: blocks must be (count, W, W) with W <= 16 and each W × W matrix contiguous, "
            f"not shape {tuple(blocks.shape)}, strides {blocks.stride()}"
        )
    raise ValueError(
        f"native kernel: x and out must both be (count, W, B) = ({count}, {width}, B), "
        f"not {tuple(x.shape)} and {tuple(out.shape)}"
    )


def gemm_wins(like: Tensor, width: int) -> bool:
    """Whether :func:`tile_gemm` is the faster product here: blocks of up to 8 × 8 (tiles of L ≤ 4) on
    one thread. Larger blocks no longer fit the vector registers, and on several threads the BLAS
    splits its batch with less overhead (docs/PERFORMANCE.md)."""
    return width <= 8 and torch.get_num_threads() == 1 and supports(like)


# Threads. The block build is single-threaded C; with torch on more than one thread (cpu_threads), a
# call with enough work is cut into that many ranges of tiles run on a pool of Python threads
# (ctypes releases the GIL during a call). Every tile is built alone, so the results do not depend
# on the number of threads. (The products go to the BLAS on several threads: gemm_wins.)
MIN_WORK_PER_THREAD = 1 << 22  # complex multiply-adds below which a call stays on one thread
_pool: ThreadPoolExecutor | None = None
_pool_size = 0


def _split(call, items: int, work_per_item: int) -> None:
    threads = min(torch.get_num_threads(), items, max(1, items * work_per_item // MIN_WORK_PER_THREAD))
    if threads <= 1:
        call(0, items)
        return
    global _pool, _pool_size
    if _pool is None or _pool_size < threads:
        if _pool is not None:
            _pool.shutdown(wait=False)
        _pool, _pool_size = ThreadPoolExecutor(max_workers=threads, thread_name_prefix="astraora-native"), threads
    bounds = [items * i // threads for i in range(threads + 1)]
    futures = [_pool.submit(call, bounds[i], bounds[i + 1]) for i in range(1, threads)]
    call(bounds[0], bounds[1])  # the calling thread takes the first range
    for future in futures:
        future.result()
