"""The sketched batch (``zo.batch_rank`` / ``zo.batch_energy``, docs/ALGORITHM.md §3.2): the probe rows
and weights reproduce ⟨A, G_r⟩, the estimate at full rank is the paper's, a truncated one estimates
∇_θ⟨A(θ), G_r⟩, and the ledger counts r rows per setting."""

from __future__ import annotations

import pytest
import torch
from conftest import random_batch

from astraora.devices import SLM, MZIMesh
from astraora.errors import ConfigError
from astraora.ledger import QueryLedger
from astraora.rng import make_generator
from astraora.zo import ZOEstimator, validate_zo, zo_phi
from astraora.zo.estimator import zo_sketch

pytestmark = pytest.mark.usefixtures("float64")


def best_rank(matrix: torch.Tensor, r: int) -> torch.Tensor:
    u, s, vh = torch.linalg.svd(matrix, full_matrices=False)
    return u[:, :r] @ torch.diag(s[:r]) @ vh[:r]


@pytest.mark.parametrize(("batch", "n", "m"), [(3, 6, 5), (9, 6, 5), (6, 4, 8)])  # B < min(m, n) and B ≥ it
@pytest.mark.parametrize("r", [1, 2, None])
def test_probes_and_weights_give_the_truncated_inner_product(batch, n, m, r):
    x, g = random_batch(batch, n, m)
    probes, weights = zo_sketch(x, g, rank=r)
    full = min(batch, n, m)
    assert probes.shape == (r or full, n) and weights.shape == (r or full, m)
    a = torch.randn(4, m, n, generator=torch.Generator().manual_seed(5))  # any matrices A
    measured = zo_phi(probes @ a.transpose(-2, -1), weights)  # Σ_j ⟨A p_j, w_j⟩
    torch.testing.assert_close(measured, (a * best_rank(g.T @ x, r or full)).sum((-2, -1)))
    rms = x.pow(2).sum(1).mean().sqrt()
    torch.testing.assert_close(probes.norm(dim=1), rms.expand(probes.shape[0]))  # the batch's range


def test_energy_picks_the_smallest_rank_holding_the_fraction():
    u, _ = torch.linalg.qr(torch.randn(8, 4, generator=torch.Generator().manual_seed(0)))
    s = torch.tensor([4.0, 2.0, 1.0, 0.5])
    energy = (s**2).cumsum(0) / (s**2).sum()  # 0.7529, 0.9412, 0.9647, 1.0 (of 21.25)
    x, g = torch.diag(s) @ u.T, u[:, :4].T.contiguous()  # G = gᵀ x = U diag(s) Uᵀ
    for fraction, expected in ((0.5, 1), (0.75, 1), (0.76, 2), (0.95, 3), (0.99, 4), (1.0, 4)):
        assert zo_sketch(x, g, energy=fraction)[0].shape[0] == expected, (fraction, energy)
    assert zo_sketch(x, g, rank=2, energy=0.99)[0].shape[0] == 2  # both caps hold
    rank_two = torch.cat([g[:2], torch.zeros(2, 8)])  # G of rank 2: zero singular values are dropped
    assert zo_sketch(x, rank_two)[0].shape[0] == 2


def estimate(device, x, g, *, reuse=True, **options):
    ledger = QueryLedger(device)
    y = ledger.query(x, "forward")
    zo = ZOEstimator(samples=40, reuse_forward=reuse, generator=make_generator(0, "zo"), **options)
    return zo.estimate(ledger, x, g, y), ledger.queries["zo"], zo


@pytest.mark.parametrize("cls", [MZIMesh, SLM])
@pytest.mark.parametrize("batch", [4, 12])  # m = 6: the batch rows and the compressed batch
def test_full_rank_sketch_is_the_papers_estimate_with_rank_rows(cls, batch):
    n, m = 7, 6
    device = cls(n, m, seed=0, name="sketch").double()
    x, g = random_batch(batch, n, m)
    paper, paper_queries, _ = estimate(device, x, g)
    sketched, queries, zo = estimate(device, x, g, batch_rank=64)
    torch.testing.assert_close(sketched, paper, rtol=1e-6, atol=1e-9)
    assert zo.last_rank == min(batch, m) and queries == paper_queries == 40 * min(batch, m)
    two, queries_two, _ = estimate(device, x, g, batch_rank=2)
    assert queries_two == 40 * 2 and queries_two == ZOEstimator(
        samples=40, batch_rank=2, generator=make_generator(0, "zo")
    ).queries_per_step(batch, m, device, True, n)
    assert not torch.allclose(two, paper)


def test_phi_at_theta_from_the_forward_output_is_the_sketch_measured():
    device = MZIMesh(7, 6, seed=1, name="sketch").double()
    x, g = random_batch(10, 7, 6)
    reused, queries, _ = estimate(device, x, g, batch_rank=3)
    requeried, queries_requery, _ = estimate(device, x, g, batch_rank=3, reuse=False)
    assert queries == 40 * 3 and queries_requery == 41 * 3  # φ(θ) re-queried on the 3 probe rows
    torch.testing.assert_close(reused, requeried, rtol=1e-5, atol=1e-8)


def test_a_truncated_sketch_estimates_the_truncated_gradient():
    """E ĝ = ∇_θ⟨A(θ), G_r⟩: with many directions the estimate lines up with that gradient, not ∇_θ⟨A, G⟩."""
    device = SLM(5, 4, seed=2, name="sketch").double()
    x, g = random_batch(6, 5, 4)
    probes, weights = zo_sketch(x, g, rank=1)

    def exact(rows, weights_):
        theta = device.theta.detach().clone().requires_grad_(True)
        return torch.autograd.grad((device.simulate(rows, theta) * weights_).sum(), theta)[0].flatten()

    target, full = exact(probes, weights), exact(x, g)
    ledger = QueryLedger(device)
    zo = ZOEstimator(samples=4000, mu=1e-6, generator=make_generator(3, "zo"), batch_rank=1)
    ghat = zo.estimate(ledger, x, g, ledger.query(x, "forward")).flatten()
    cos = torch.nn.functional.cosine_similarity
    assert cos(ghat, target, dim=0) > 0.95
    assert cos(target, full, dim=0) < 0.9 and cos(ghat, full, dim=0) < cos(ghat, target, dim=0) - 0.05


def test_a_zero_upstream_gradient_costs_no_query_and_keeps_the_stream():
    device = MZIMesh(5, 5, seed=0, name="sketch").double()
    x, _ = random_batch(4, 5, 5)
    ghat, queries, zo = estimate(device, x, torch.zeros(4, 5), batch_rank=2)
    assert queries == 0 and not ghat.any() and zo.last_rank == 0
    _, _, paper = estimate(device, x, torch.zeros(4, 5))
    assert torch.equal(zo.generator.get_state(), paper.generator.get_state())  # same directions drawn


@pytest.mark.parametrize(
    ("key", "value"),
    [
        ("batch_rank", 0),
        ("batch_rank", 2.5),
        ("batch_rank", True),
        ("batch_energy", 0),
        ("batch_energy", 1.5),
        ("batch_energy", "all"),
    ],
)
def test_bad_sketch_settings_are_refused_by_name(key, value):
    with pytest.raises(ConfigError, match=rf"zo\.{key}="):
        validate_zo({key: value})


def test_colored_differences_refuse_a_sketch():
    with pytest.raises(ConfigError, match=r"zo\.batch_rank=4.*not available with zo\.direction=colored"):
        validate_zo({"direction": "colored", "batch_rank": 4})
    validate_zo({"direction": "colored", "batch_rank": None, "batch_energy": None})


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"live_only": True}, r"zo\.live_only=True is not allowed; not a key of the zo group"),
        ({"subspace_rank": 2}, r"zo\.subspace_rank=2 is not allowed; not a key of the zo group"),
        ({"direction": "subspace"}, r"zo\.direction='subspace' is not allowed; choose one of"),
    ],
)
def test_the_measured_and_dropped_direction_options_are_refused_by_name(options, message):
    """Light-cone masks and subspace directions were measured (docs/results.md) and not kept."""
    with pytest.raises(ConfigError, match=message):
        validate_zo(options)


def test_a_non_finite_batch_gives_a_non_finite_estimate_without_a_query():
    """As the unsketched estimate of such a batch: the layer then skips the step and counts it."""
    device = MZIMesh(6, 5, seed=0, name="sketch").double()
    x, g = random_batch(4, 6, 5)
    g[1, 2] = float("nan")
    ghat, queries, zo = estimate(device, x, g, batch_rank=2)
    assert queries == 0 and torch.isnan(ghat).all() and zo.last_rank == 0
    _, _, paper = estimate(device, x, g)
    assert torch.equal(zo.generator.get_state(), paper.generator.get_state())


@pytest.mark.parametrize("cls", [MZIMesh, SLM])
def test_two_sided_and_data_parallel_sketches_match_the_papers_at_full_rank(cls):
    device = cls(7, 6, seed=3, name="sketch").double()
    x, g = random_batch(5, 7, 6)
    paper, paper_queries, _ = estimate(device, x, g, two_sided=True)
    sketched, queries, _ = estimate(device, x, g, two_sided=True, batch_rank=64)
    torch.testing.assert_close(sketched, paper, rtol=1e-6, atol=1e-9)
    assert queries == paper_queries == 2 * 40 * 5
    ledger = QueryLedger(device)
    zo = ZOEstimator(samples=40, generator=make_generator(0, "zo"), batch_rank=2)
    zo.reducer = lambda c: c.clone()  # one process: the mean is the value itself
    reduced = zo.estimate(ledger, x, g, ledger.query(x, "forward"))
    torch.testing.assert_close(reduced, estimate(device, x, g, batch_rank=2)[0], rtol=1e-9, atol=1e-12)


def test_a_float32_sketch_at_full_rank_is_the_float32_papers_estimate():
    """The SVD's float32 round-off, divided by μ, must not spoil the coefficients (φ(θ) from the forward
    output, the probes' φ from the device)."""
    x, g = random_batch(8, 10, 6)
    device = MZIMesh(10, 6, seed=4, name="sketch").float()
    xs, gs = x.float(), g.float()
    results = []
    for options in ({}, {"batch_rank": 64}):
        ledger = QueryLedger(device)
        zo = ZOEstimator(samples=200, mu=1e-3, generator=make_generator(0, "zo"), **options)
        results.append(zo.estimate(ledger, xs, gs, ledger.query(xs, "forward")).double())
    assert torch.nn.functional.cosine_similarity(*results, dim=0) > 0.9999
