"""The same bits on every CPU: the native tile kernels built for different instruction sets give
identical blocks and products, and astraora.reproducible pins PyTorch's CPU kernels to one
instruction-set path before torch is imported (README: the default run's `test/acc` line)."""

from __future__ import annotations

import os
import platform
import shutil
import subprocess
import sys

import pytest
import torch

from astraora import reproducible
from astraora.devices import MZIClassical, MZIMesh, native

# ----------------------------------------------------------------- native kernels across ISAs


def _cpu_flags() -> set[str]:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


def _isa_flags(arch: list[str]) -> list[str]:
    """native.FLAGS with its -march replaced: whatever else the project builds with (contraction off …)
    applies to every instruction set compared."""
    return [flag for flag in native.FLAGS if flag not in native.ARCH] + arch


@pytest.fixture(scope="module")
def isa_libraries():
    """The kernels built for every instruction set this CPU runs: x86-64's SSE2 baseline (no FMA),
    AVX2 + FMA, and -march=native (AVX-512 where the CPU has it). Cached like the real library."""
    if platform.machine() not in ("x86_64", "AMD64"):
        pytest.skip(f"x86-64 instruction sets only (this machine: {platform.machine()})")
    compiler = os.environ.get("CC") or "cc"
    if shutil.which(compiler) is None:
        pytest.skip(f"no C compiler ({compiler!r}) on PATH")
    cpu = _cpu_flags()
    arches = {"x86-64 (SSE2)": ["-march=x86-64"]}
    if {"avx2", "fma"} <= cpu:
        arches["AVX2+FMA"] = ["-march=x86-64", "-mavx2", "-mfma"]
    arches["native" + (" (AVX-512)" if "avx512f" in cpu else "")] = ["-march=native"]
    paths = {name: native.compile_library(compiler, _isa_flags(arch)) for name, arch in arches.items()}
    assert len(set(paths.values())) == len(paths), "two instruction sets share one cached library"
    return {name: native.load(path) for name, path in paths.items()}


def _with(library, monkeypatch, fn, *args):
    with monkeypatch.context() as patch:
        patch.setenv("ASTRAORA_NATIVE", "1")
        patch.setattr(native, "_library", library)
        patch.setattr(native, "_tried", True)
        patch.setattr(torch, "get_num_threads", lambda: 1)  # one range of tiles, native products (gemm_wins)
        return fn(*args)


def _assert_same_bits(isa_libraries, monkeypatch, fn, *args):
    results = {name: _with(lib, monkeypatch, fn, *args) for name, lib in isa_libraries.items()}
    (first, reference), *others = results.items()
    for name, result in others:
        diff = (result - reference).abs().max().item()
        assert torch.equal(result, reference), f"{name} differs from {first} (max |Δ| = {diff:.3g})"


@pytest.mark.parametrize("cls", [MZIMesh, MZIClassical])
@pytest.mark.parametrize("n,m,tile", [(5, 6, 2), (64, 64, 4), (33, 40, 8)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_native_kernels_give_the_same_bits_on_every_instruction_set(isa_libraries, monkeypatch, cls, n, m, tile, dtype):
    """Blocks with the cells computed in the kernel (both built-in cells), blocks from given cell
    entries, and the whole transfer (blocks times the state by the native product), for settings
    counts around the kernel's chunk of 16 and phases far outside [−π, π]."""
    device = cls(n, m, seed=1, tile=tile)
    tiled = device.tiled(n, m)
    gen = torch.Generator().manual_seed(n * 100 + tile)
    complex_dtype = torch.complex128 if dtype == torch.float64 else torch.complex64
    for k in (7, 37):  # within one chunk of 16 settings, and over two with a partial one
        theta = (device.theta.detach()[None] + 4.0 * torch.randn(k, device.num_params, generator=gen)).to(dtype)
        cell_fn, tile_theta = device._tile_cell(theta)  # the cell formula (and phase order) the tile engine uses
        for group in tiled._plan(False, 4)[:2] + tiled._plan(True, 2)[:1]:  # trimmed and uniform layouts
            _assert_same_bits(
                isa_libraries,
                monkeypatch,
                native.cell_blocks,
                native.CELLS[cell_fn],
                tile_theta.T,
                group.slot_cell,
                tiled._steps_array,
                tiled.L,
            )
            coef = torch.randn(4, tiled.L**2, group.slot_cell.shape[1], k, generator=gen, dtype=complex_dtype)
            _assert_same_bits(isa_libraries, monkeypatch, native.tile_blocks, coef, tiled._steps_array, tiled.L)
        x = torch.randn(9, n, generator=gen, dtype=dtype)
        _assert_same_bits(isa_libraries, monkeypatch, device.transfer, theta, x)


@pytest.mark.parametrize("width", [2, 8, 16])
@pytest.mark.parametrize("columns", [7, 70])
@pytest.mark.parametrize("dtype", [torch.complex64, torch.complex128])
def test_native_products_give_the_same_bits_on_every_instruction_set(isa_libraries, monkeypatch, width, columns, dtype):
    """The products' vector loop and the columns left over after it (7: only those)."""
    gen = torch.Generator().manual_seed(width * 1000 + columns)
    blocks = torch.randn(13, width, width, generator=gen, dtype=dtype)
    x = torch.randn(13, width, columns, generator=gen, dtype=dtype)

    def product(blocks, x):
        out = torch.empty_like(x)
        native.tile_gemm(blocks, x, out)
        return out

    _assert_same_bits(isa_libraries, monkeypatch, product, blocks, x)


def test_cache_key_holds_every_flag(monkeypatch, tmp_path):
    """Builds for different instruction sets (or any other flag) never share a cached library."""
    monkeypatch.setenv("ASTRAORA_CACHE_DIR", str(tmp_path))
    paths = {
        native.library_path("cc", _isa_flags(arch))
        for arch in (["-march=x86-64"], ["-march=native"], ["-march=x86-64", "-mavx2", "-mfma"])
    }
    paths.add(native.library_path("cc", [flag for flag in native.FLAGS if flag != "-ffp-contract=off"]))
    assert len(paths) == 4 and native.library_path("cc") == native.library_path("cc", native.FLAGS)
    assert "-ffp-contract=off" in native.FLAGS and not {"-ffast-math", "-Ofast"} & set(native.FLAGS)


# ----------------------------------------------------------------- PyTorch's kernels: ASTRAORA_REPRODUCIBLE


def test_apply_sets_the_pinned_paths_only_when_asked_and_keeps_the_users_values():
    assert reproducible.apply({}) == {} and reproducible.apply({"ASTRAORA_REPRODUCIBLE": "0"}) == {}
    environ = {"ASTRAORA_REPRODUCIBLE": "1", "MKL_CBWR": "AVX2"}
    added = reproducible.apply(environ)
    assert added == {k: v for k, v in reproducible.SETTINGS.items() if k != "MKL_CBWR"}
    assert environ["MKL_CBWR"] == "AVX2"
    assert reproducible.apply(environ) == {}  # nothing left to set: a second call is a no-op
    with pytest.raises(reproducible.ConfigError, match="ASTRAORA_REPRODUCIBLE='maybe' is not allowed"):
        reproducible.apply({"ASTRAORA_REPRODUCIBLE": "maybe"})


def test_apply_after_torch_sets_nothing_and_says_so(monkeypatch):
    """torch is imported in this process already: pinning only MKL and oneDNN would still leave ATen's
    choice to the CPU, so apply() refuses (strict) or warns, and leaves the environment alone."""
    for key in reproducible.SETTINGS:
        monkeypatch.delenv(key, raising=False)
    monkeypatch.setenv("ASTRAORA_REPRODUCIBLE", "1")
    with pytest.raises(RuntimeError, match="came after torch was imported"):
        reproducible.apply(strict=True)
    with pytest.warns(RuntimeWarning, match="came after torch was imported"):
        assert reproducible.apply() == {}
    assert not set(reproducible.SETTINGS) & set(os.environ)


PROBE = """
import hashlib, os, sys
import astraora  # first, as every entry point does; torch after it
import torch
import torch.nn.functional as F
torch.set_num_threads(1)
g = torch.Generator().manual_seed(0)
a, b = torch.randn(64, 64, generator=g), torch.randn(64, 64, generator=g)
bits = b"".join(t.numpy().tobytes() for t in (a @ b, F.gelu(a), a.softmax(1)))
print(torch.backends.cpu.get_cpu_capability(), os.environ.get("MKL_CBWR"), hashlib.sha256(bits).hexdigest())
"""


def _probe(**env: str) -> list[str]:
    clean = {k: v for k, v in os.environ.items() if k not in reproducible.SETTINGS and k != reproducible.ENV}
    done = subprocess.run(
        [sys.executable, "-c", PROBE], env={**clean, **env}, capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, done.stderr[-2000:]
    return done.stdout.split()


@pytest.mark.slow
def test_importing_astraora_pins_torch_before_it_loads():
    """ASTRAORA_REPRODUCIBLE=1 and ``import astraora`` before torch (what train.py does) gives ATen's AVX2
    kernels, MKL's COMPATIBLE path and the same bits (matmul, GELU, softmax) as the variables set by
    hand before the process starts."""
    if "avx2" not in _cpu_flags():
        pytest.skip("the pinned path is AVX2's; this CPU has no AVX2")
    pinned = _probe(ASTRAORA_REPRODUCIBLE="1")
    assert pinned[:2] == ["AVX2", "COMPATIBLE"]
    assert pinned == _probe(**reproducible.SETTINGS)
