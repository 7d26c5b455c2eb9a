"""The MZI tile engine against the column-by-column reference, and the query path around it
(chunking, deferred checks, batched surrogate queries)."""

from __future__ import annotations

import math

import pytest
import torch

import astraora.devices.mesh_tiles as mesh_tiles
from astraora.devices import MZIClassical, MZIMesh, native
from astraora.errors import ConfigError
from astraora.ledger import QueryLedger
from astraora.rng import make_generator
from astraora.surrogate import LowRankSurrogate, PsiImplicitIntegrator
from astraora.zo import ZOEstimator


def reference(device: MZIMesh, theta: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """x Re(U(θ_k))[:m, :n]ᵀ by the column route (the differentiable reference)."""
    cells = device.cell(theta[:, 0::2], theta[:, 1::2])
    z = torch.nn.functional.pad(x, (0, device.modes - device.d_in)).to(cells.dtype)
    z = z.expand(theta.shape[0], x.shape[-2], device.modes)
    return device._propagate(cells, z).real[..., : device.d_out]


def settings(device: MZIMesh, k: int, spread: float = 0.5, dtype=torch.float64, seed: int = 0) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return (
        device.theta.detach()[None]
        + spread * torch.randn(k, device.num_params, generator=gen, dtype=device.theta.dtype)
    ).to(dtype)


@pytest.fixture(params=["trimmed", "uniform"])
def layout(request, monkeypatch):
    """Run a test with each layout: trimmed (CPU, few settings) and uniform (many settings, GPU)."""
    monkeypatch.setattr(mesh_tiles, "TRIMMED_MAX_SETTINGS", 10**9 if request.param == "trimmed" else 0)
    return request.param


SHAPES = [  # (n, m): tiny meshes, odd sizes, n > m, m > n, light cones cut on either side
    (1, 1),
    (2, 2),
    (3, 4),
    (4, 4),
    (5, 6),
    (6, 6),
    (7, 3),
    (3, 7),
    (9, 2),
    (2, 9),
    (17, 17),
    (33, 65),
    (65, 20),
    (40, 128),
]


@pytest.mark.parametrize("cls", [MZIMesh, MZIClassical])
@pytest.mark.parametrize("n,m", SHAPES)
@pytest.mark.parametrize("tile", [1, 2, 4, 8])
def test_tiles_equal_columns(cls, n, m, tile, layout):
    device = cls(n, m, seed=1, tile=tile)
    for k, batch in ((1, 3), (3, max(1, n - 1)), (5, 2 * n + 1)):
        theta = settings(device, k, seed=k)
        x = torch.randn(batch, n, generator=torch.Generator().manual_seed(k), dtype=torch.float64)
        torch.testing.assert_close(device.transfer(theta, x), reference(device, theta, x), rtol=1e-11, atol=1e-11)


def test_tiles_equal_columns_per_setting_inputs(layout):
    device = MZIMesh(12, 10, seed=0, tile=2)
    theta = settings(device, 4)
    x = torch.randn(4, 6, 12, dtype=torch.float64)  # (K, B, n): one batch per setting
    torch.testing.assert_close(device.transfer(theta, x), reference(device, theta, x), rtol=1e-11, atol=1e-11)


@pytest.mark.parametrize("n,m", [(512, 1024), (1024, 30)])
def test_tiles_equal_columns_at_the_paper_size_in_float32(n, m, layout):
    """N = 1024 (the CIFAR-10 head): the same numbers to float32 round-off. Both float32 routes are
    measured against the column route in float64: over 1024 columns each gathers ≈ 2e-5 of
    relative round-off, in independent directions where their sines and cosines differ in the
    last bit (the native kernel's), so the tile engine must be as close to the truth as the
    column route, not to the column route itself."""
    device = MZIMesh(n, m, seed=0)
    theta = settings(device, 2, spread=1e-2, dtype=torch.float32)
    x = torch.randn(3, n)
    truth = reference(device, theta.double(), x.double())
    out, ref = device.transfer(theta, x).double(), reference(device, theta, x).double()
    error, ref_error = float((out - truth).norm() / truth.norm()), float((ref - truth).norm() / truth.norm())
    assert error < 4e-5 and error < 1.5 * ref_error


def test_uniform_layout_with_many_settings_and_small_budgets(monkeypatch):
    """The GPU path's layout (all settings in one batched GEMM per factor), groups of one factor."""
    monkeypatch.setattr(mesh_tiles, "TRIMMED_MAX_SETTINGS", 0)
    monkeypatch.setattr(mesh_tiles, "UNIFORM_BUDGET_CPU", 1)
    device = MZIMesh(64, 64, seed=0)
    theta = settings(device, 20, spread=1e-2)
    x = torch.randn(8, 64, dtype=torch.float64)
    torch.testing.assert_close(device.transfer(theta, x), reference(device, theta, x), rtol=1e-11, atol=1e-11)


def test_work_buffers_are_reused_and_results_independent_of_previous_calls(layout):
    device = MZIMesh(20, 20, seed=0, tile=2)
    x = torch.randn(5, 20, dtype=torch.float64)
    theta = settings(device, 3)
    first = device.transfer(theta, x)
    device.transfer(settings(device, 7, seed=3), torch.randn(9, 20, dtype=torch.float64) * 1e3)  # bigger call between
    torch.testing.assert_close(device.transfer(theta, x), first, rtol=0, atol=0)
    engine = device.tiled(20, 20)
    buffers = dict(engine._buffers)
    device.transfer(theta, x)
    assert all(engine._buffers[key][0] is buffers[key][0] for key in buffers)


def test_autograd_takes_the_column_route_and_matches_the_tile_values():
    device = MZIMesh(6, 5, seed=0, tile=2)
    x = torch.randn(4, 6, dtype=torch.float64)
    theta = settings(device, 1)[0].requires_grad_(True)
    y = device.simulate(x, theta)
    assert y.requires_grad
    with torch.no_grad():
        torch.testing.assert_close(device.simulate(x, theta), y.detach(), rtol=1e-12, atol=1e-12)
    (grad,) = torch.autograd.grad(y.square().sum(), theta)
    eps, i = 1e-6, 7
    step = torch.zeros_like(theta)
    step[i] = eps
    with torch.no_grad():
        numeric = (
            device.simulate(x, theta + step).square().sum() - device.simulate(x, theta - step).square().sum()
        ) / (2 * eps)
    assert math.isclose(float(grad[i]), float(numeric), rel_tol=1e-6, abs_tol=1e-9)


def test_engine_and_tile_options_are_checked():
    with pytest.raises(ConfigError, match="device.engine"):
        MZIMesh(4, 4, engine="fast")
    with pytest.raises(ConfigError, match="device.tile"):
        MZIMesh(4, 4, tile=0)
    assert MZIMesh(64, 64).tile == 4 and MZIMesh(512, 1024).tile == 8
    device = MZIMesh(8, 8, seed=2, engine="columns")
    theta = settings(device, 2)
    x = torch.randn(3, 8, dtype=torch.float64)
    torch.testing.assert_close(
        device.transfer(theta, x), MZIMesh(8, 8, seed=2).transfer(theta, x), rtol=1e-11, atol=1e-11
    )


# ----------------------------------------------------------------------------- the query path
def test_zo_directions_do_not_depend_on_chunking():
    device = MZIMesh(10, 10, seed=0, tile=2)
    x, g = torch.randn(4, 10), torch.randn(4, 10)
    estimates = []
    for chunk in (1, 3, 40, "auto"):
        zo = ZOEstimator(samples=11, chunk_size=chunk, generator=make_generator(0, "zo"))
        estimates.append(zo.estimate(QueryLedger(device), x, g))
    for other in estimates[1:]:
        torch.testing.assert_close(other, estimates[0], rtol=1e-5, atol=1e-6)


def test_deferred_checks_redo_the_estimate_with_the_same_directions(monkeypatch):
    """Off the CPU the estimator checks readings once at the end; a non-finite one makes it take
    the estimate again with per-call checks (ledger retries), from the same directions."""
    device = MZIMesh(8, 8, seed=0, tile=2)
    x, g = torch.randn(3, 8), torch.randn(3, 8)
    clean = ZOEstimator(samples=6, chunk_size=2, generator=make_generator(0, "zo")).estimate(QueryLedger(device), x, g)

    zo = ZOEstimator(samples=6, chunk_size=2, generator=make_generator(0, "zo"))
    monkeypatch.setattr(zo, "defer_checks", lambda dev: True)
    poisoned = {"left": 1}
    real_query = device.query

    def flaky(rows, theta=None, **kwargs):
        y = real_query(rows, theta, **kwargs)
        if theta is not None and theta.dim() == 2 and poisoned["left"]:
            poisoned["left"] -= 1
            y = y.clone()
            y[0, 0, 0] = float("nan")
        return y

    monkeypatch.setattr(device, "query", flaky)
    ledger = QueryLedger(device)
    ghat = zo.estimate(ledger, x, g)
    torch.testing.assert_close(ghat, clean, rtol=1e-5, atol=1e-6)
    assert (
        ledger.queries["zo"] == 2 * (6 + 1) * 3
    )  # M settings + φ(θ) re-queried, twice: the first attempt stays counted
    assert ledger.retries == 0  # the NaN came in the unchecked attempt


def test_psi_update_queries_both_settings_in_one_call():
    device = MZIMesh(12, 10, seed=0, tile=2)
    ledger = QueryLedger(device)
    surrogate = LowRankSurrogate(12, 10, 3, tuple(device.theta.shape))
    surrogate.readout(ledger)
    calls = []
    real_query = device.query
    device.query = lambda rows, theta=None, **kw: calls.append(theta.shape) or real_query(rows, theta, **kw)
    with torch.no_grad():
        device.theta.add_(1e-2)
    before = dict(ledger.reprograms)
    assert PsiImplicitIntegrator(5, generator=make_generator(0, "s")).update(surrogate, ledger)
    assert calls == [(2, device.num_params)]
    # readout left the hardware at the old θ = θ₀: only θ₁ needs programming.
    assert ledger.reprograms["surrogate"] - before["surrogate"] == 1
    assert ledger.queries["surrogate"] == 2 * (3 + 5)


def test_accelerator_code_path_at_the_paper_shapes(monkeypatch):
    """What a GPU runs (uniform layout with the accelerator's block budget, one finite-check per
    estimate, blocks and products by PyTorch operations), exercised on the CPU at the CIFAR-10
    head's shapes: the same ĝ as the CPU path (native kernels)."""
    device = MZIMesh(512, 1024, seed=0)
    gen = torch.Generator().manual_seed(0)
    x, g = torch.randn(256, 512, generator=gen), torch.randn(256, 1024, generator=gen)

    def estimate() -> torch.Tensor:
        # φ(θ) from this path's own forward query: the finite differences divide the two paths'
        # independent float32 round-off (≈ 2e-5 at N = 1024) by μ, so they must not be mixed
        zo = ZOEstimator(samples=2, generator=make_generator(0, "zo"))
        return zo.estimate(QueryLedger(device), x, g, device.query(x))

    cpu = estimate()
    monkeypatch.setattr(mesh_tiles, "TRIMMED_MAX_SETTINGS", 0)
    monkeypatch.setattr(mesh_tiles, "UNIFORM_BUDGET_CPU", mesh_tiles.UNIFORM_BUDGET_GPU)
    monkeypatch.setattr(ZOEstimator, "defer_checks", staticmethod(lambda dev: True))
    monkeypatch.setattr(native, "library", lambda: None)  # a GPU builds its blocks with PyTorch operations
    accelerator = estimate()
    # two float32 evaluations of finite differences: their round-off over μ alone differs by ~1e-3
    # (7.5e-4 with the native build's fused multiply-adds, 1.07e-3 without); a wrong block gives O(1)
    assert float((accelerator - cpu).norm() / cpu.norm()) < 2e-3
