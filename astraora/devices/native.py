"""Native (C) kernels for the MZI tile engine, compiled on first use and cached.

Two kernels (``tile_blocks.c``): the tile engine's block build, with the built-in cells' entries
computed in the same pass (per tile and setting, the identity pushed through the tile's local
columns, instead of ≈ 50 PyTorch elementwise operations per group of factors), and its products
(a factor's 2L × 2L blocks times the state, ≈ 1.5× the BLAS's batched complex GEMM at these
sizes); docs/PERFORMANCE.md. They are compiled with the system C compiler (``$CC``, else ``cc``)
for this machine's CPU the first time a process needs them, without floating-point contraction, so
that every CPU computes the same bits whatever its vector width (tests/test_reproducible.py), into

    $ASTRAORA_CACHE_DIR or $XDG_CACHE_HOME/astraora or ~/.cache/astraora   (kernels/…)

(or the temporary directory where that cannot be written), under a name that hashes the source,
the flags and the CPU, so that machines sharing a home directory (a cluster) never load a library
built for another CPU; concurrent processes (DDP, sweeps) each write their own temporary file and
rename it into place. Where no compiler is found or the build fails, the PyTorch implementation
runs instead (the same numbers to float32 round-off), with one warning. ``ASTRAORA_NATIVE=0``
turns the kernels off. GPUs always take the PyTorch path.
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
LIBS = ["-lm"]
# the kernels' precision suffix per dtype of phases (real) or amplitudes (complex)
_SUFFIX = {torch.float32: "f32", torch.complex64: "f32", torch.float64: "f64", torch.complex128: "f64"}
# cell formulas the block build computes itself (tile_blocks.c), by the Python function they equal;
# registered by devices/mzi.py. Any other cell function: entries by PyTorch, blocks native.
CELLS: dict[object, int] = {}
CELL_PAPER, CELL_CLASSICAL = 0, 1
_lock = threading.Lock()
_library: ctypes.CDLL | None = None
_tried = False


def enabled() -> bool:
    """Whether native kernels may be used (``ASTRAORA_NATIVE`` is not 0/false/off)."""
    return os.environ.get("ASTRAORA_NATIVE", "1").strip().lower() not in ("0", "false", "off", "no")


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
    """Where the library built by ``compiler`` with ``flags`` (default FLAGS) lives: the name hashes the
    source, the compiler, every flag (so builds for different instruction sets never share a file) and,
    for ``-march=native``, the CPU."""
    flags = FLAGS if flags is None else flags
    key = hashlib.sha256(
        b"\0".join([SOURCE.read_bytes(), " ".join([compiler, *flags, *LIBS]).encode(), _cpu_signature().encode()])
    ).hexdigest()[:16]
    return cache_dir() / "kernels" / f"tile_blocks-{key}.so"


def _writable(directory: Path) -> bool:
    try:
        directory.mkdir(parents=True, exist_ok=True)
    except OSError:
        return False
    return os.access(directory, os.W_OK)


def compile_library(compiler: str, flags: list[str] | None = None) -> Path:
    """Compile tile_blocks.c with ``flags`` (default FLAGS) unless the cache already holds that build;
    its path. Raises RuntimeError where the compiler is missing or fails."""
    if shutil.which(compiler) is None:
        raise RuntimeError(f"no C compiler ({compiler!r}) on PATH")
    flags = FLAGS if flags is None else flags
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


def load(path: Path) -> ctypes.CDLL:
    """A compiled library with its functions' signatures declared (what :func:`library` returns)."""
    lib = ctypes.CDLL(str(path))
    i64, ptr = ctypes.c_int64, ctypes.c_void_p
    for suffix in ("f32", "f64"):
        build, gemm = getattr(lib, f"astraora_tile_blocks_{suffix}"), getattr(lib, f"astraora_tile_gemm_{suffix}")
        build.restype = gemm.restype = None
        build.argtypes = [ptr, ptr, i64, i64, ptr, ctypes.c_int, ptr, i64, i64, i64, i64, i64, ptr, i64]
        gemm.argtypes = [ptr, i64, ptr, ptr, i64, i64, i64]
    return lib


def _build() -> ctypes.CDLL:
    return load(compile_library(os.environ.get("CC") or "cc"))


def library() -> ctypes.CDLL | None:
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
                    log.warning(
                        "astraora: native tile kernel unavailable (%s); the MZI tile engine builds its "
                        "blocks with PyTorch operations instead (slower, same results). Set "
                        "ASTRAORA_NATIVE=0 to silence this.",
                        err,
                    )
                    _library = None
                _tried = True
    return _library


def supports(like: Tensor) -> bool:
    """Whether the kernels run on tensors like this one (CPU, float32/64 or complex64/128, built)."""
    return like.device.type == "cpu" and like.dtype in _SUFFIX and library() is not None


def _build_blocks(
    coef: Tensor | None,
    theta_t: Tensor | None,
    slot_cell: Tensor | None,
    cell: int,
    k: int,
    tiles: int,
    steps: np.ndarray,
    L: int,
    dtype: torch.dtype,
) -> Tensor:
    out = torch.empty((k, tiles, 2 * L, 2 * L), dtype=dtype)
    fn = getattr(library(), f"astraora_tile_blocks_{_SUFFIX[dtype]}")
    strides = (0, 0) if theta_t is None else theta_t.stride()

    def build(begin: int, end: int) -> None:
        fn(
            None if coef is None else coef.data_ptr(),
            None if theta_t is None else theta_t.data_ptr(),
            *strides,
            None if slot_cell is None else slot_cell.data_ptr(),
            cell,
            out.data_ptr(),
            k,
            tiles,
            begin,
            end,
            L,
            steps.ctypes.data,
            len(steps),
        )

    _split(build, tiles, 4 * k * L**3)  # per tile: settings · L² cells · ≤ 2L columns · 2 rows
    return out


def tile_blocks(coef: Tensor, steps: np.ndarray, L: int) -> Tensor:
    """Blocks (K, tiles, 2L, 2L) from cell entries ``coef`` (4, L², tiles, K) and the tile's local
    columns ``steps`` (int32 (2L − 1, 5): s0, s1, r0, c0, c1); see TiledMesh._blocks."""
    coef = coef.contiguous()
    _, _, tiles, k = coef.shape
    return _build_blocks(coef, None, None, 0, k, tiles, steps, L, coef.dtype)


def cell_blocks(cell: int, theta_t: Tensor, slot_cell: Tensor, steps: np.ndarray, L: int) -> Tensor:
    """The same blocks with the cells' entries computed in the kernel (formula ``cell``, one of
    CELLS' values) from the phases ``theta_t`` (2·cells, K), any strides (θᵀ as a view of θ (K,
    2·cells) needs no copy), and each slot's cell ``slot_cell`` (L², tiles) int64, −1 where empty."""
    slot_cell = slot_cell.contiguous()
    complex_dtype = torch.complex128 if theta_t.dtype == torch.float64 else torch.complex64
    return _build_blocks(None, theta_t, slot_cell, cell, theta_t.shape[1], slot_cell.shape[1], steps, L, complex_dtype)


def tile_gemm(blocks: Tensor, x: Tensor, out: Tensor) -> None:
    """``out[i] = blocks[i] @ x[i]`` (``torch.bmm(blocks, x, out=out)``) for complex (count, W, W)
    blocks whose matrices are contiguous but may be strided apart, and contiguous x, out (count, W, B)."""
    count, width, _ = blocks.shape
    assert blocks.stride(2) == 1 and blocks.stride(1) == width and x.is_contiguous() and out.is_contiguous()
    assert width <= 16 and x.dtype == out.dtype == blocks.dtype
    getattr(library(), f"astraora_tile_gemm_{_SUFFIX[blocks.dtype]}")(
        blocks.data_ptr(),
        blocks.stride(0) if count > 1 else width * width,
        x.data_ptr(),
        out.data_ptr(),
        count,
        width,
        x.shape[-1],
    )


def gemm_wins(like: Tensor, width: int) -> bool:
    """Whether :func:`tile_gemm` is the faster product here: blocks of up to 8 × 8 (tiles of L ≤ 4)
    on one thread. Measured against torch.bmm (MKL): 8 × 8 blocks times 64 columns, one thread,
    0.35 vs 0.44 ms for 900 blocks; 16 × 16 blocks (its inputs no longer fit the vector registers)
    0.64 vs 0.56 ms; on two threads the BLAS splits its batch with less overhead (0.22 vs 0.26 ms)."""
    return width <= 8 and torch.get_num_threads() == 1 and supports(like)


# Threads. The block build is single-threaded C; with torch on more than one thread (cpu_threads), a
# call with enough work is cut into that many ranges of tiles run on a pool of Python threads
# (ctypes releases the GIL during a call). Every tile is built alone, so the results do not depend
# on the number of threads. (The products go to the BLAS on several threads: gemm_wins.)
MIN_WORK_PER_THREAD = 1 << 22  # complex multiply-adds (≈ 0.5 ms) below which a call stays on one thread
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
