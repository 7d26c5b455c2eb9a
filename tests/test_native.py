"""The native tile kernels (astraora/devices/native.py, tile_blocks.c): typed wrappers that refuse
what the C code cannot take, the C cell formulas against the Python ones, the native route against
the PyTorch route, ASTRAORA_NATIVE=0, the build cache and the thread split."""

from __future__ import annotations

import ctypes
import os
import shutil

import numpy as np
import pytest
import torch

import astraora.devices.mesh_tiles as mesh_tiles
from astraora.devices import MZIClassical, MZIMesh, mzi, native


def reference(device: MZIMesh, theta: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """x Re(U(θ_k))[:m, :n]ᵀ by the column route (no native code)."""
    cells = device.cell(theta[:, 0::2], theta[:, 1::2])
    z = torch.nn.functional.pad(x, (0, device.modes - device.d_in)).to(cells.dtype)
    return device._propagate(cells, z.expand(theta.shape[0], x.shape[-2], device.modes)).real[..., : device.d_out]


def settings(device: MZIMesh, k: int, spread: float = 0.5, dtype=torch.float64, seed: int = 0) -> torch.Tensor:
    noise = torch.randn(k, device.num_params, generator=torch.Generator().manual_seed(seed), dtype=device.theta.dtype)
    return (device.theta.detach()[None] + spread * noise).to(dtype)


@pytest.fixture(params=["trimmed", "uniform"])
def layout(request, monkeypatch):
    """Run a test with each layout of the tile engine: trimmed (CPU, few settings) and uniform."""
    monkeypatch.setattr(mesh_tiles, "TRIMMED_MAX_SETTINGS", 10**9 if request.param == "trimmed" else 0)
    return request.param


def native_or_skip():
    if not native.enabled():
        pytest.skip("ASTRAORA_NATIVE=0")
    if native.library() is None:
        if shutil.which("cc") is None and not os.environ.get("CC"):
            pytest.skip("no C compiler on this machine")
        pytest.fail("a C compiler is present but the native tile kernel did not build (see the warning)")


def block_build_args(L: int = 2, k: int = 5, dtype=torch.float64):
    """Valid arguments for the block build of a 10-wire mesh's first uniform group: phases θᵀ (2·cells, K),
    slot_cell (L², tiles), steps, L."""
    mesh = MZIMesh(10, 10)
    geometry = mesh_tiles.TiledMesh(mesh.modes, 10, 10, mesh.columns, L)
    theta_t = torch.randn(2 * geometry.cells, k, generator=torch.Generator().manual_seed(0), dtype=dtype)
    return theta_t, geometry._plan(True, 1)[0].slot_cell, geometry._steps_array, geometry.L


# ----------------------------------------------------------------- typed wrappers: clear errors, no crash
def test_every_entry_point_has_its_signature_declared():
    native_or_skip()
    kernels = native.library()
    assert set(kernels.functions) == {(name, s) for name in native.SIGNATURES for s in ("f32", "f64")}
    for (name, _), fn in kernels.functions.items():
        assert fn.argtypes == native.SIGNATURES[name] and fn.restype is None
    gemm = kernels("astraora_tile_gemm", torch.complex64)
    with pytest.raises(TypeError, match="7 arguments"):  # a wrong count raises before C is entered
        gemm(0, 1, 0)
    with pytest.raises(ctypes.ArgumentError):  # so does a wrong type
        gemm(0, 1.5, 0, 0, 0, 4, 1)


def test_block_build_refuses_what_the_kernel_cannot_take():
    native_or_skip()
    theta_t, slot_cell, steps, L = block_build_args()
    tiles = slot_cell.shape[1]
    assert native.cell_blocks(native.CELL_PAPER, theta_t, slot_cell, steps, L).shape == (5, tiles, 4, 4)
    bad = [
        (
            TypeError,
            "theta_t must be a CPU tensor of torch.float32 or torch.float64, not torch.int64",
            dict(theta_t=theta_t.long()),
        ),
        (TypeError, "theta_t .* not torch.complex128", dict(theta_t=theta_t.to(torch.complex128))),
        (TypeError, "theta_t .* on meta", dict(theta_t=theta_t.to("meta"))),
        (ValueError, "theta_t must have 2 dimensions", dict(theta_t=theta_t[None])),
        (ValueError, r"theta_t must be \(2·cells, K\)", dict(theta_t=theta_t[1:])),
        (TypeError, "slot_cell must be a CPU tensor of torch.int64", dict(slot_cell=slot_cell.int())),
        (ValueError, "slot_cell must be contiguous", dict(slot_cell=slot_cell.T.contiguous().T)),
        (ValueError, "slot_cell must have L² = 4 rows", dict(slot_cell=slot_cell[:3])),
        (ValueError, r"slot_cell holds cells outside \[-1, ", dict(slot_cell=slot_cell + theta_t.shape[0])),
        (ValueError, r"slot_cell holds cells outside \[-1, ", dict(slot_cell=slot_cell - 2)),
        (ValueError, "cell=7 is neither", dict(cell=7)),
        (TypeError, "steps must be a C-contiguous int32", dict(steps=steps.astype(np.int64))),
        (TypeError, "steps must be a C-contiguous int32", dict(steps=np.asfortranarray(steps))),
        (ValueError, r"steps must have shape \(3, 5\)", dict(steps=steps[:2].copy())),
        (ValueError, "steps reach outside a 2 x 2 tile", dict(steps=steps + np.int32(1))),
        (ValueError, "the tile size L=0 must be", dict(L=0)),
        (ValueError, f"the tile size L={native.MAX_TILE + 1} must be", dict(L=native.MAX_TILE + 1)),
    ]
    for error, message, change in bad:
        args = dict(cell=native.CELL_PAPER, theta_t=theta_t, slot_cell=slot_cell, steps=steps, L=L) | change
        with pytest.raises(error, match=message):
            native.cell_blocks(**args)
    coef = torch.randn(4, L * L, 3, 5, dtype=torch.complex64)
    assert native.tile_blocks(coef, steps, L).shape == (5, 3, 4, 4)
    with pytest.raises(TypeError, match="coef must be a CPU tensor of torch.complex64 or torch.complex128"):
        native.tile_blocks(coef.real.contiguous(), steps, L)
    with pytest.raises(ValueError, match="coef must be contiguous"):
        native.tile_blocks(coef.transpose(2, 3), steps, L)
    with pytest.raises(ValueError, match=r"coef must have shape \(4, L² = 4, tiles, K\)"):
        native.tile_blocks(coef[:, :3].contiguous(), steps, L)


def test_products_refuse_what_the_kernel_cannot_take():
    native_or_skip()
    blocks, x = torch.randn(6, 8, 8, dtype=torch.complex64), torch.randn(6, 8, 5, dtype=torch.complex64)
    out = torch.empty_like(x)
    native.tile_gemm(blocks, x, out)
    torch.testing.assert_close(out, blocks @ x)
    bad = [
        (TypeError, "blocks must be a CPU tensor of torch.complex64 or torch.complex128", (blocks.real, x, out)),
        (
            TypeError,
            "x must be a CPU tensor of torch.complex64, not torch.complex128",
            (blocks, x.to(torch.complex128), out),
        ),
        (TypeError, "out must be a CPU tensor of torch.complex64", (blocks, x, out.to(torch.complex128))),
        (ValueError, "x must be contiguous", (blocks, x.transpose(1, 2).contiguous().transpose(1, 2), out)),
        (ValueError, "out must have 3 dimensions", (blocks, x, out[0])),
        (ValueError, "each W × W matrix contiguous", (blocks.transpose(1, 2), x, out)),
        (ValueError, "W <= 16", (torch.randn(6, 18, 18, dtype=torch.complex64), x, out)),
        (ValueError, r"x and out must both be \(count, W, B\) = \(6, 8, B\)", (blocks, x[:5], out[:5])),
        (ValueError, r"x and out must both be", (blocks, x, out[..., :4].contiguous())),
    ]
    for error, message, args in bad:
        with pytest.raises(error, match=message):
            native.tile_gemm(*args)


def test_wrappers_refuse_when_the_kernels_are_off(monkeypatch):
    monkeypatch.setenv("ASTRAORA_NATIVE", "0")
    theta_t, slot_cell, steps, L = block_build_args()
    with pytest.raises(RuntimeError, match="native tile kernels are not available"):
        native.cell_blocks(native.CELL_PAPER, theta_t, slot_cell, steps, L)


# ----------------------------------------------------------------- the cell formula: C against Python
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("cell", ["paper", "classical"])
def test_the_kernels_cell_formulas_are_the_python_ones(cell, dtype):
    """With tiles of one cell (L = 1) a block is the cell's matrix itself: the C formula (tile_blocks.c)
    equals mzi.paper_cell_entries / classical_cell_entries to round-off (the sines differ in the last bit,
    the paper cell's 1/√2 is a product in C and a quotient in PyTorch), over random and large phases."""
    native_or_skip()
    fn, code = {
        "paper": (mzi.paper_cell_entries, native.CELL_PAPER),
        "classical": (mzi.classical_cell_entries, native.CELL_CLASSICAL),
    }[cell]
    n, gen = 4096, torch.Generator().manual_seed(3)
    steps = np.array([[0, 1, 0, 0, 2]], dtype=np.int32)  # one step: the pair of wires (0, 1), columns 0 and 1
    for scale in (3.2, 200.0):
        theta_t = ((2 * torch.rand(2 * n, 1, generator=gen, dtype=torch.float64) - 1) * scale).to(dtype)
        blocks = native.cell_blocks(code, theta_t, torch.arange(n)[None], steps, 1)[0]  # (n, 2, 2)
        python = fn(theta_t[0::2, 0], theta_t[1::2, 0]).T.reshape(n, 2, 2)
        error = float((blocks - python).abs().max()) / torch.finfo(dtype).eps
        assert error <= 4, f"{cell} cell, {dtype}: C and Python differ by {error:.2f} ulp of 1"


def test_the_devices_cells_are_the_formulas_the_kernel_knows():
    device = MZIClassical(4, 4, seed=0)
    assert (
        MZIMesh.cell_entries is mzi.paper_cell_entries
        and device._tile_cell(device.theta)[0] is mzi.classical_cell_entries
    )
    assert native.CELLS == {
        mzi.paper_cell_entries: native.CELL_PAPER,
        mzi.classical_cell_entries: native.CELL_CLASSICAL,
    }


# ----------------------------------------------------------------- the native route against PyTorch's
@pytest.mark.parametrize("width", [2, 4, 6, 8, 16])
@pytest.mark.parametrize("dtype", [torch.complex64, torch.complex128])
def test_products_equal_torch_bmm(width, dtype):
    """Whole vectors of columns, the columns left over (1, 7 …) and blocks strided apart."""
    gen = torch.Generator().manual_seed(width)
    group = torch.randn(5, 3, width, width, generator=gen, dtype=dtype)
    for columns in (1, 7, 8, 37):
        blocks = group[:, 1]  # every third matrix of the group: strided apart, each contiguous
        x = torch.randn(5, width, columns, generator=gen, dtype=dtype)
        out = torch.empty_like(x)
        native_or_skip()
        native.tile_gemm(blocks, x, out)
        tol = 1e-5 if dtype == torch.complex64 else 1e-13
        torch.testing.assert_close(out, torch.bmm(blocks, x), rtol=tol, atol=tol)


class UserCellMesh(MZIMesh):
    """A mesh whose cell function the native build does not know: PyTorch computes the entries,
    the kernel pushes them through the tiles."""

    @staticmethod
    def cell_entries(theta, phi):
        return MZIClassical.cell_entries(theta, phi + 0.25)


@pytest.mark.parametrize("cls", [MZIMesh, MZIClassical, UserCellMesh])
@pytest.mark.parametrize(
    "n,m,tile", [(1, 1, 1), (5, 6, 2), (7, 3, 4), (17, 17, 4), (33, 65, 8), (64, 64, 4), (65, 20, 2)]
)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_native_blocks_equal_the_torch_blocks(cls, n, m, tile, dtype, layout, monkeypatch):
    """The compiled block build gives the PyTorch build's outputs (settings counts around its chunk
    of 16, empty slots, the two built-in cells computed in the kernel and a user's cell computed by
    PyTorch, both precisions, phases far outside [−π, π]), and both the column route's."""
    native_or_skip()
    assert (
        MZIMesh.cell_entries in native.CELLS
        and mzi.classical_cell_entries in native.CELLS
        and UserCellMesh.cell_entries not in native.CELLS
    )
    device = cls(n, m, seed=2, tile=tile)
    for k, spread in ((1, 0.5), (3, 60.0), (17, 0.5), (40, 3.0)):
        theta = settings(device, k, spread=spread, seed=k, dtype=dtype)
        x = torch.randn(5, n, generator=torch.Generator().manual_seed(k), dtype=dtype)
        fast = device.transfer(theta, x)
        with monkeypatch.context() as patch:
            patch.setattr(native, "library", lambda: None)
            slow = device.transfer(theta, x)
        truth = reference(device, theta.double(), x.double())
        if dtype == torch.float64:
            torch.testing.assert_close(fast, slow, rtol=1e-12, atol=1e-12)
            torch.testing.assert_close(fast, truth, rtol=1e-12, atol=1e-12)
        else:  # float32: as close to the truth as the PyTorch build (its sines differ in the last bit)
            error, torch_error = float((fast.double() - truth).abs().max()), float((slow.double() - truth).abs().max())
            assert error <= 2 * torch_error + 2e-6 and error < 1e-4, (error, torch_error)


def test_native_kernel_falls_back_to_torch_with_one_warning(monkeypatch, tmp_path, caplog):
    monkeypatch.setenv("ASTRAORA_NATIVE", "1")
    monkeypatch.delenv("ASTRAORA_NATIVE_SANITIZE", raising=False)  # a sanitizer build raises instead
    monkeypatch.setenv("CC", str(tmp_path / "no-such-compiler"))
    monkeypatch.setenv("ASTRAORA_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setattr(native, "_tried", False)
    monkeypatch.setattr(native, "_library", None)
    device = MZIMesh(10, 8, seed=0)
    theta, x = settings(device, 3), torch.randn(4, 10, dtype=torch.float64)
    with caplog.at_level("WARNING", logger="astraora.devices.native"):
        out = device.transfer(theta, x)
        device.transfer(theta, x)
    assert [r.message for r in caplog.records].count(caplog.records[0].message) == 1
    assert (
        "native tile kernel unavailable" in caplog.records[0].message
        and "no-such-compiler" in caplog.records[0].message
    )
    torch.testing.assert_close(out, reference(device, theta, x), rtol=1e-11, atol=1e-11)
    monkeypatch.setenv("ASTRAORA_NATIVE", "0")
    assert not native.enabled() and native.library() is None


def test_native_kernel_is_cached_per_source_flags_and_cpu(monkeypatch, tmp_path):
    native_or_skip()
    monkeypatch.setenv("ASTRAORA_CACHE_DIR", str(tmp_path))
    monkeypatch.setattr(native, "_tried", False)
    monkeypatch.setattr(native, "_library", None)
    assert native.library() is not None
    built = list((tmp_path / "kernels").glob("tile_blocks-*.so"))
    assert len(built) == 1 and built[0] == native.library_path(os.environ.get("CC") or "cc")
    assert not [
        p for p in (tmp_path / "kernels").iterdir() if p.suffix != ".so" or p not in built
    ]  # no temporaries left
    monkeypatch.setattr(native, "_cpu_signature", lambda: "another cpu")
    assert native.library_path("cc") != built[0]


def test_native_block_build_split_between_threads_gives_the_same_numbers(monkeypatch):
    """With torch on several threads the block build is cut into ranges of tiles run on a thread
    pool: bit for bit the single-threaded blocks (the products then go to the BLAS: the outputs
    agree to round-off)."""
    native_or_skip()
    device = MZIMesh(21, 18, seed=3, tile=2)
    theta, x = settings(device, 23, dtype=torch.float32), torch.randn(9, 21)
    tiled = device.tiled(21, 18)
    group = tiled._plan(True, 4)[0]
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one_blocks = native.cell_blocks(native.CELL_PAPER, theta.T, group.slot_cell, tiled._steps_array, 2)
        one = device.transfer(theta, x)
        monkeypatch.setattr(native, "MIN_WORK_PER_THREAD", 1)
        calls = []
        monkeypatch.setattr(
            native,
            "_split",
            lambda call, items, work, split=native._split: (calls.append(items), split(call, items, work)),
        )
        torch.set_num_threads(3)
        several_blocks = native.cell_blocks(native.CELL_PAPER, theta.T, group.slot_cell, tiled._steps_array, 2)
        several = device.transfer(theta, x)
    finally:
        torch.set_num_threads(threads)
    assert calls and native._pool is not None and native._pool_size >= 3
    assert torch.equal(one_blocks, several_blocks)
    torch.testing.assert_close(one, several, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("cls", [MZIMesh, MZIClassical])
def test_astraora_native_0_is_honoured(cls, monkeypatch):
    """ASTRAORA_NATIVE=0: no kernel is built or called, and the tile engine gives the column route's
    numbers; the variable is read at every call."""
    device = cls(13, 9, seed=4, tile=2)
    theta, x = settings(device, 3), torch.randn(4, 13, dtype=torch.float64)
    monkeypatch.setenv("ASTRAORA_NATIVE", "0")
    monkeypatch.setattr(native, "_tried", False)
    monkeypatch.setattr(native, "_library", None)
    monkeypatch.setattr(native, "_build", lambda: pytest.fail("ASTRAORA_NATIVE=0 built the kernels"))
    assert not native.enabled() and native.library() is None and not native.supports(theta)
    torch.testing.assert_close(device.transfer(theta, x), reference(device, theta, x), rtol=1e-12, atol=1e-12)
    for off in ("false", "off", "no", " 0 "):
        monkeypatch.setenv("ASTRAORA_NATIVE", off)
        assert not native.enabled()
    monkeypatch.setenv("ASTRAORA_NATIVE", "1")
    assert native.enabled()


def test_tiles_beyond_max_tile_take_the_pytorch_path(monkeypatch):
    """A tile too large for the kernel's stack buffers runs the PyTorch build instead of crashing."""
    native_or_skip()
    calls = []
    monkeypatch.setattr(native, "_build_blocks", lambda *a: calls.append(a) or pytest.fail("native build"))
    device = MZIMesh(12, 10, seed=1, tile=native.MAX_TILE + 1)
    theta, x = settings(device, 2), torch.randn(3, 12, dtype=torch.float64)
    torch.testing.assert_close(device.transfer(theta, x), reference(device, theta, x), rtol=1e-12, atol=1e-12)
    assert not calls and not native.supports(theta, native.MAX_TILE + 1) and native.supports(theta, native.MAX_TILE)


def test_sanitizer_build_has_its_own_flags_and_cache_file(monkeypatch, tmp_path):
    monkeypatch.setenv("ASTRAORA_CACHE_DIR", str(tmp_path))
    monkeypatch.setenv("ASTRAORA_NATIVE_SANITIZE", "0")
    plain = native.library_path("cc")
    monkeypatch.setenv("ASTRAORA_NATIVE_SANITIZE", "1")
    assert native.sanitized() and native.build_flags() == native.SANITIZE_FLAGS
    assert {"-fsanitize=address,undefined", "-fno-sanitize-recover=all", "-ffp-contract=off"} <= set(
        native.build_flags()
    )
    sanitized = native.library_path("cc")
    assert (
        sanitized != plain
        and sanitized.name.startswith("tile_blocks-sanitize-")
        and plain.name.startswith("tile_blocks-")
    )
