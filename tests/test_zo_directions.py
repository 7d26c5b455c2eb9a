"""Directions shaped by the device (docs/ALGORITHM.md §3): ``zo.live_only`` (a mesh's light cone) and
``zo.direction=subspace`` (devices with one control per matrix entry), against exact gradients."""

from __future__ import annotations

import pytest
import torch
from conftest import random_batch

from astraora.devices import SLM, MRRBank, MZIMesh
from astraora.devices.mesh_tiles import live_phases
from astraora.errors import ConfigError
from astraora.ledger import QueryLedger
from astraora.rng import make_generator
from astraora.zo import ZOEstimator, validate_zo
from astraora.zo.estimator import subspace_basis, subspace_directions

pytestmark = pytest.mark.usefixtures("float64")
cos = torch.nn.functional.cosine_similarity


def exact_grad(device, x, g, theta=None):
    theta = (device.theta if theta is None else theta).detach().clone().requires_grad_(True)
    return torch.autograd.grad((device.simulate(x, theta) * g).sum(), theta)[0]


def estimate(device, x, g, **options):
    ledger = QueryLedger(device)
    zo = ZOEstimator(generator=make_generator(0, "zo"), **options)
    return zo.estimate(ledger, x, g, ledger.query(x, "forward")), ledger.queries["zo"]


@pytest.mark.parametrize(
    ("n", "m", "modes", "all_live"), [(12, 4, None, False), (4, 12, None, False), (3, 3, 10, False), (7, 7, None, True)]
)
def test_dead_phases_never_move_the_matrix_and_live_ones_do(n, m, modes, all_live):
    device = MZIMesh(n, m, seed=0, name="cone", modes=modes).double()
    live = device.live_parameters()
    assert live.shape == device.theta.shape and live.dtype == torch.bool
    squared = torch.zeros_like(device.theta)
    for seed in range(4):  # several batches and settings: a live phase moves the matrix somewhere
        x, g = random_batch(5, n, m, seed=seed)
        theta = device.theta + 0.3 * torch.randn(device.theta.shape, generator=torch.Generator().manual_seed(seed))
        grad = exact_grad(device, x, g, theta)
        assert not grad[~live].any()  # exactly zero outside the light cone
        squared += grad**2
    assert (squared[live] > 0).float().mean() > 0.95
    assert bool(live.all()) == all_live


def test_light_cone_by_hand():
    # 4 wires, input on wire 0 only, output on wire 0 only: columns (start, cells) (0,2),(1,1),(0,2),(1,1)
    live = live_phases(4, [(0, 2), (1, 1), (0, 2), (1, 1)], 1, 1)
    # column 0: cell (0,1) lit+needed, cell (2,3) dark; column 1: cell (1,2) lit and needed (reaches 1 → col 2 → 0);
    # column 2: cell (0,1) yes, cell (2,3) lit but cannot reach wire 0 any more; column 3: cell (1,2) after the last
    # column that reaches wire 0
    assert live.tolist() == [True, True, False, False, True, True, True, True, False, False, False, False]


def test_live_only_is_unbiased_and_the_same_where_all_are_live():
    lopsided = MZIMesh(12, 4, seed=0, name="cone").double()
    x, g = random_batch(6, 12, 4)
    exact = exact_grad(lopsided, x, g)
    plain, queries = estimate(lopsided, x, g, samples=3000)
    live, live_queries = estimate(lopsided, x, g, samples=3000, live_only=True)
    assert queries == live_queries
    assert not live[~lopsided.live_parameters()].any()
    assert cos(live, exact, dim=0) > cos(plain, exact, dim=0) and cos(live, exact, dim=0) > 0.95
    square = MZIMesh(6, 6, seed=0, name="cone").double()
    x, g = random_batch(4, 6, 6)
    assert torch.equal(estimate(square, x, g, samples=20)[0], estimate(square, x, g, samples=20, live_only=True)[0])


def test_subspace_directions_have_the_projection_as_covariance():
    left, _ = torch.linalg.qr(torch.randn(5, 2, generator=torch.Generator().manual_seed(0)))
    right, _ = torch.linalg.qr(torch.randn(4, 2, generator=torch.Generator().manual_seed(1)))
    z = torch.randn(200_000, 4, generator=torch.Generator().manual_seed(2))
    u = subspace_directions(z, left.T, right.T)
    projection = torch.kron(left @ left.T, right @ right.T)  # on vec(A) of row-major (5, 4) matrices
    torch.testing.assert_close(u.T @ u / u.shape[0], (20 / 4) * projection, atol=0.05, rtol=0)
    assert abs(float(u.pow(2).sum(1).mean()) - 20) < 0.1  # E‖u‖² = p


@pytest.mark.parametrize("cls", [MRRBank, SLM])
def test_subspace_estimates_the_projected_gradient(cls):
    device = cls(8, 6, seed=1, name="sub").double()
    x, g = random_batch(5, 8, 6)
    left, right = subspace_basis(x, g, 2, device.theta.shape)
    exact = exact_grad(device, x, g)
    projected = left.T @ (left @ exact @ right.T) @ right
    ghat, queries = estimate(device, x, g, samples=3000, direction="subspace", subspace_rank=2)
    assert queries == 3000 * 5
    assert cos(ghat.flatten(), projected.flatten(), dim=0) > 0.98
    torch.testing.assert_close(ghat.norm(), projected.norm(), rtol=0.1, atol=0)


def test_subspace_refuses_a_mesh_and_data_parallel():
    mesh = MZIMesh(6, 6, seed=0, name="sub").double()
    x, g = random_batch(4, 6, 6)
    with pytest.raises(ConfigError, match=r"zo\.direction=subspace needs a device with one control per matrix entry"):
        estimate(mesh, x, g, samples=4, direction="subspace")
    bank = MRRBank(6, 6, seed=0, name="sub").double()
    ledger = QueryLedger(bank)
    zo = ZOEstimator(samples=4, direction="subspace", generator=make_generator(0, "zo"))
    zo.reducer = lambda t: t
    with pytest.raises(ConfigError, match="data-parallel"):
        zo.estimate(ledger, x, g, ledger.query(x, "forward"))


@pytest.mark.parametrize(("key", "value"), [("live_only", 1), ("subspace_rank", 0), ("subspace_rank", 1.5)])
def test_bad_direction_settings_are_refused_by_name(key, value):
    with pytest.raises(ConfigError, match=rf"zo\.{key}="):
        validate_zo({key: value})


def test_the_config_refuses_subspace_on_a_mesh_and_under_data_parallel_before_training():
    from conftest import compose_config

    from astraora.build import make_layer_factory
    from astraora.config import validate

    with pytest.raises(ConfigError, match=r"zo\.direction=subspace needs a device with one control per matrix entry"):
        make_layer_factory(compose_config(["zo=subspace", "device=mzi"]))(8, 6, "layer")
    make_layer_factory(compose_config(["zo=subspace", "device=mrr"]))(8, 6, "layer")  # entrywise: accepted
    with pytest.raises(ConfigError, match=r"zo\.direction=subspace is not available with data-parallel"):
        validate(compose_config(["zo=subspace", "device=mrr", "trainer=ddp_cpu"]), import_targets=False)
