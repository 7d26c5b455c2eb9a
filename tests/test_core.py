"""The numerical core: ledger counts, surrogate integrators, ZO estimators, HybridLayer."""

import math

import pytest
import torch
from torch import nn

from astraora.devices import SLM, MatVec, MRRBank
from astraora.errors import ConfigError, DeviceFailure
from astraora.hybrid import HybridLayer
from astraora.ledger import QueryLedger
from astraora.rng import make_generator
from astraora.surrogate import LowRankSurrogate, make_integrator
from astraora.surrogate.lowrank import best_rank_error
from astraora.zo import ZOEstimator


def zo_estimator(samples=10, seed=0, **kwargs):
    return ZOEstimator(samples=samples, generator=make_generator(seed, "zo"), **kwargs)


def cosine(a, b):
    return float(torch.nn.functional.cosine_similarity(a.flatten().double(), b.flatten().double(), dim=0))


# --------------------------------------------------------------------------- ledger
@pytest.mark.parametrize("two_sided", [False, True])
@pytest.mark.parametrize("batch", [4, 12])  # B <= m and B > m (m = 8)
@pytest.mark.parametrize("reuse_forward", [True, False])
def test_ledger_counts_match_formula(two_sided, batch, reuse_forward):
    n, m, r, M, M_sm = 10, 8, 3, 5, 7
    device = SLM(n, m, seed=0, name="d")
    zo = zo_estimator(M, two_sided=two_sided, reuse_forward=reuse_forward)
    layer = HybridLayer(device, rank=r, zo=zo, integrator={"name": "psi_implicit", "samples": M_sm})
    opt = torch.optim.SGD([device.theta], lr=0.1)
    q = min(batch, m)
    settings = 2 * M if two_sided else M
    requery = 0 if (two_sided or reuse_forward) else 1
    for step in (1, 2):
        opt.zero_grad()
        layer(torch.randn(batch, n)).pow(2).sum().backward()
        opt.step()
        layer.after_optimizer_step()
        led = layer.ledger
        assert led.queries == {
            "forward": step * batch,
            "zo": step * q * (settings + requery),
            "surrogate": step * (2 * r + 2 * M_sm),
            "readout": n,
        }
        # readout once; the forward finds the device already at θ (readout or the last surrogate
        # query left it there); each perturbed setting is one reprogram; θ₀ and θ₁ are two.
        assert led.reprograms == {"forward": 0, "zo": step * settings, "surrogate": 2 * step, "readout": 1}
        assert zo.queries_per_step(batch, m) == q * (settings + requery)


def test_ledger_forward_reprogram_when_theta_changed_and_oracle_not_counted():
    device = MatVec(4, 3, seed=0, name="d")
    led = QueryLedger(device)
    led.query(torch.randn(2, 4), "forward")
    led.query(torch.randn(2, 4), "forward")
    assert led.reprograms["forward"] == 1
    with torch.no_grad():
        device.theta.add_(1.0)
    led.query(torch.randn(2, 4), "forward")
    assert led.reprograms["forward"] == 2
    led.oracle_matrix()
    assert led.oracle == 1 and led.total == 6
    with pytest.raises(ValueError, match="purpose"):
        led.query(torch.randn(1, 4), "bogus")


def test_ledger_counts_are_the_logged_keys_of_its_counters():
    """counts() (what is logged and summed into summary.json) from a known history; the same map
    applied to a checkpointed state (the data-parallel failure path) gives the same keys."""
    device = MatVec(4, 3, seed=0, name="d")
    led = QueryLedger(device)
    led.query(torch.randn(2, 4), "forward")
    led.query_settings(torch.randn(5, 4), device.theta.detach() + torch.randn(3, *device.theta.shape), "zo")
    led.query(torch.randn(4, 4), "surrogate")
    led.oracle_matrix()
    led.skipped["surrogate"] += 1
    expected = {
        "queries/forward": 2,
        "queries/zo": 15,
        "queries/surrogate": 4,
        "queries/total": 21,
        "queries/oracle": 1,
        "reprograms": 1 + 3 + 1,
        "queries/retries": 0,
        "skipped/zo": 0,
        "skipped/surrogate": 1,
    }
    assert {k: v for k, v in led.counts().items() if k in expected} == expected
    assert QueryLedger.counts_of(led.state_dict()) == led.counts()


def test_ledger_retries_then_fails():
    device = MatVec(4, 3, seed=0, name="d", faults={"raise_prob": 1.0})
    led = QueryLedger(device, max_retries=2)
    with pytest.raises(DeviceFailure, match="failed 3 times"):
        led.query(torch.randn(2, 4), "forward")
    assert led.retries == 2 and led.total == 0
    flaky = MatVec(4, 3, seed=0, name="d", faults={"nonfinite_prob": 0.5})
    led = QueryLedger(flaky, max_retries=20)
    for _ in range(10):
        assert torch.isfinite(led.query(torch.randn(2, 4), "forward")).all()
    assert led.retries > 0 and led.queries["forward"] == 20


def test_ledger_state_roundtrip():
    device = SLM(5, 4, seed=0, name="d")
    led = QueryLedger(device)
    led.query(torch.randn(3, 5), "forward")
    other = QueryLedger(device)
    other.load_state_dict(led.state_dict())
    assert other.counts() == led.counts()
    other.query(torch.randn(3, 5), "forward")
    assert other.reprograms["forward"] == 1  # the programmed θ travelled with the state


# --------------------------------------------------------------------------- surrogate
def ksl_step(U, S, V, dA):
    """One first-order projector-splitting step on the increment dA, with exact transposes."""
    U1, S_hat = torch.linalg.qr(U @ S + dA @ V)
    S_tilde = S_hat - U1.T @ dA @ V
    V1, S1_T = torch.linalg.qr(V @ S_tilde.T + dA.T @ U1)
    return U1 @ S1_T.T @ V1.T


@pytest.mark.parametrize("device_cls", [SLM, MRRBank])
def test_psi_implicit_with_exact_sketch_equals_ksl(device_cls):
    torch.set_default_dtype(torch.float64)
    try:
        n, m, r = 12, 9, 4
        device = device_cls(n, m, seed=3, name="d")
        led = QueryLedger(device)
        sur = LowRankSurrogate(n, m, r, tuple(device.theta.shape))
        sur.readout(led)
        a0 = device.matrix().detach()
        U, S, V = sur.U.clone(), sur.S.clone(), sur.V.clone()
        with torch.no_grad():
            device.theta.add_(0.05 * torch.randn(device.theta.shape, generator=torch.Generator().manual_seed(0)))
        dA = device.matrix().detach() - a0
        # orthogonal sketch with M_sm = n: ZᵀZ / M_sm = I exactly, so P₂ = ΔAᵀ U₁.
        integ = make_integrator("psi_implicit", generator=make_generator(0, "s"), samples=n, sketch="orthogonal")
        assert integ.step(sur, led, 1)
        torch.testing.assert_close(sur.matrix(), ksl_step(U, S, V, dA), atol=1e-10, rtol=1e-8)
        assert led.queries["surrogate"] == 2 * r + 2 * n
        assert led.reprograms["surrogate"] == 1  # the readout left the hardware at θ₀ already
    finally:
        torch.set_default_dtype(torch.float32)


def track(device_cls, rank, integrator, steps=100, step_size=0.005, samples=400):
    n, m = 64, 48
    device = device_cls(n, m, seed=0, name="d")
    led = QueryLedger(device)
    sur = LowRankSurrogate(n, m, rank, tuple(device.theta.shape))
    sur.readout(led)
    integ = make_integrator(integrator, generator=make_generator(0, "sketch"), samples=samples)
    gen = torch.Generator().manual_seed(1)
    worst_ratio, err, best = 0.0, 0.0, 0.0
    for t in range(1, steps + 1):
        with torch.no_grad():
            device.theta.add_(step_size * torch.randn(device.theta.shape, generator=gen))
        integ.step(sur, led, t)
        a = device.matrix().detach()
        err = float((sur.matrix() - a).norm() / a.norm())
        best = best_rank_error(a, rank)
        worst_ratio = max(worst_ratio, err / best)
    return worst_ratio, err, best


@pytest.mark.parametrize("device_cls", [SLM, MRRBank])
@pytest.mark.parametrize("rank", [5, 20])
def test_psi_implicit_tracks_within_best_rank_error(device_cls, rank):
    ratio, err, best = track(device_cls, rank, "psi_implicit")
    assert ratio <= 1.5
    _, frozen_err, _ = track(device_cls, rank, "frozen")
    assert frozen_err - best > 1.5 * (err - best)  # frozen drifts visibly further from A(θ)


def test_factors_stay_orthonormal_over_thousands_of_updates():
    device = MRRBank(20, 16, seed=0, name="d")
    led = QueryLedger(device)
    sur = LowRankSurrogate(20, 16, 6, tuple(device.theta.shape))
    sur.readout(led)
    integ = make_integrator("psi_implicit", generator=make_generator(0, "s"), samples=10)
    gen = torch.Generator().manual_seed(0)
    for t in range(1, 2001):
        with torch.no_grad():
            device.theta.add_(0.002 * torch.randn(device.theta.shape, generator=gen))
        integ.step(sur, led, t)
    assert sur.orthonormality_error() < 1e-5


def test_integrator_schedule_and_variants():
    device = SLM(8, 6, seed=0, name="d")
    led = QueryLedger(device)
    sur = LowRankSurrogate(8, 6, 2, tuple(device.theta.shape))
    sur.readout(led)
    every = make_integrator("psi_implicit", generator=make_generator(0, "s"), samples=3, every=2, rebuild_every=3)
    changed = []
    for t in range(1, 7):
        with torch.no_grad():
            device.theta.add_(0.01)
        changed.append(every.step(sur, led, t))
    assert changed == [False, True, True, True, False, True]  # t=3, 6 rebuild; t=2, 4 psi
    assert led.queries["readout"] == 8 * 3 and led.queries["surrogate"] == 2 * (2 * 2 + 2 * 3)
    exact = make_integrator("exact", generator=make_generator(0, "s"))
    with torch.no_grad():
        device.theta.add_(0.3)
    before = led.total
    exact.step(sur, led, 1)
    assert led.total == before  # oracle, no hardware queries
    a = device.matrix().detach()
    assert float((sur.matrix() - a).norm() / a.norm()) == pytest.approx(best_rank_error(a, 2), rel=1e-3)
    with pytest.raises(ConfigError, match="integrator.name"):
        make_integrator("magic", generator=make_generator(0, "s"))
    with pytest.raises(ConfigError, match="surrogate.rank=9"):
        LowRankSurrogate(8, 6, 9, (6, 8))


# --------------------------------------------------------------------------- ZO
def zo_setup(device_cls=SLM, n=10, m=6, batch=5, seed=0):
    device = device_cls(n, m, seed=seed, name="d")
    gen = torch.Generator().manual_seed(seed)
    x, g = torch.randn(batch, n, generator=gen), torch.randn(batch, m, generator=gen)
    with torch.enable_grad():
        theta = device.theta.detach().requires_grad_(True)
        exact = torch.autograd.grad((device.simulate(x, theta) * g).sum(), theta)[0]
    return device, x, g, exact


@pytest.mark.parametrize("batch", [4, 12])
def test_zo_cosine_grows_with_samples(batch):
    device, x, g, exact = zo_setup(batch=batch)
    led = QueryLedger(device)
    cosines = []
    for samples in (10, 100, 3000):
        zo = zo_estimator(samples, chunk_size=500)
        cosines.append(cosine(zo.estimate(led, x, g), exact))
    assert cosines[0] < cosines[1] < cosines[2]
    assert cosines[2] >= 0.9


def test_two_sided_has_lower_variance():
    device, x, g, exact = zo_setup(MRRBank)
    led = QueryLedger(device)

    def spread(two_sided):
        zo = zo_estimator(20, mu=0.05, two_sided=two_sided, seed=7)
        est = torch.stack([zo.estimate(led, x, g) for _ in range(200)])
        return float(((est - exact) ** 2).sum(-1).mean())

    assert spread(True) < spread(False)


@pytest.mark.parametrize("direction", ["gaussian", "rademacher", "sphere"])
def test_zo_directions_unbiased(direction):
    torch.set_default_dtype(torch.float64)
    try:
        device, x, g, exact = zo_setup(SLM, n=6, m=4, batch=3)
        led = QueryLedger(device)
        zo = zo_estimator(20000, direction=direction, chunk_size=5000, mu=1e-5)
        est = zo.estimate(led, x, g)
        # standard error of the mean ≈ ‖∇‖·sqrt(p / M); allow 4 of them
        assert float((est - exact).norm()) < 4 * float(exact.norm()) * math.sqrt(exact.numel() / 20000)
    finally:
        torch.set_default_dtype(torch.float32)


def test_zo_vectorised_equals_sample_loop():
    torch.set_default_dtype(torch.float64)  # μ = 1e-4 differences need float64 to compare exactly
    try:
        device, x, g, _ = zo_setup()
        chunked = zo_estimator(12, chunk_size=5).estimate(QueryLedger(device), x, g)
        looped = zo_estimator(12, chunk_size=1).estimate(QueryLedger(device), x, g)
        torch.testing.assert_close(chunked, looped, rtol=1e-8, atol=1e-9)
    finally:
        torch.set_default_dtype(torch.float32)


def test_zo_bad_config():
    with pytest.raises(ConfigError, match="zo.samples=0"):
        zo_estimator(0)
    with pytest.raises(ConfigError, match="zo.direction"):
        zo_estimator(5, direction="cauchy")
    with pytest.raises(ConfigError, match="zo.chunk_size"):
        zo_estimator(5, chunk_size="big")


def test_zo_auto_chunk_fits_the_work_budget():
    zo = zo_estimator(100)
    assert zo.chunk_for(p=4032, rows=64, d_in=64, d_out=64) == 100  # the default 64 × 64 mesh: one call
    assert zo.chunk_for(p=512 * 1024, rows=256, d_in=512, d_out=1024) == 4
    assert zo_estimator(100, chunk_size=7).chunk_for(p=10, rows=1, d_in=1, d_out=1) == 7


# --------------------------------------------------------------------------- HybridLayer
def test_gradient_modes_match_oracle_where_exact():
    device = MRRBank(8, 6, seed=0, name="d")
    x = torch.randn(5, 8)
    g = torch.randn(5, 6)
    layer = HybridLayer(device, mode="exact", rank=3, output_scale=False)
    xr = x.clone().requires_grad_(True)
    (layer(xr) * g).sum().backward()
    a = device.matrix().detach()
    torch.testing.assert_close(xr.grad, g @ a)
    with torch.enable_grad():
        th = device.theta.detach().requires_grad_(True)
        expected = torch.autograd.grad((device.simulate(x, th) * g).sum(), th)[0]
    torch.testing.assert_close(device.theta.grad, expected)


def test_surrogate_input_gradient_and_diagnostics():
    device = SLM(10, 8, seed=0, name="d")
    layer = HybridLayer(device, mode="zo+sm", rank=8, zo=zo_estimator(500, chunk_size=500), output_scale=False)
    x = torch.randn(4, 10, requires_grad=True)
    layer.capture_next_backward = True
    layer(x).sum().backward()
    diag = layer.diagnostics()
    assert diag["surrogate/rel_error"] == pytest.approx(diag["surrogate/rel_error_best_rank_r"], abs=1e-5)
    assert diag["surrogate/grad_cosine"] > 0.999  # rank 8 = min(n, m): Â = A
    assert diag["zo/grad_cosine"] > 0.5


def test_bad_layer_config():
    with pytest.raises(ConfigError, match="mode='magic'"):
        HybridLayer(SLM(4, 4, name="d"), mode="magic")
    with pytest.raises(ConfigError, match="needs a ZO estimator"):
        HybridLayer(SLM(4, 4, name="d"), mode="zo+sm", zo=None)


def blobs(n=1000, dim=10, classes=5, seed=0):
    gen = torch.Generator().manual_seed(seed)
    centers = 0.8 * torch.randn(classes, dim, generator=gen)
    y = torch.randint(0, classes, (n,), generator=gen)
    x = centers[y] + torch.randn(n, dim, generator=gen)
    return x, y


def train_mlp(kind, steps=300):
    torch.manual_seed(0)
    x, y = blobs()
    x, y, xt, yt = x[:700], y[:700], x[700:], y[700:]
    hidden = 16
    if kind == "digital":
        physical = nn.Linear(hidden, hidden)
    else:
        zo = zo_estimator(40, mu=1e-3, chunk_size=40) if kind == "zo+sm" else None
        physical = HybridLayer(
            MRRBank(hidden, hidden, seed=0, name="mlp.physical"),
            mode=kind,
            rank=8,
            zo=zo,
            integrator={"name": "psi_implicit", "samples": 32},
        )
    net = nn.Sequential(
        nn.Linear(10, hidden), nn.ReLU(), physical, nn.BatchNorm1d(hidden), nn.ReLU(), nn.Linear(hidden, 5)
    )
    theta = [p for n_, p in net.named_parameters() if n_.endswith("device.theta")]
    digital = [p for n_, p in net.named_parameters() if not n_.endswith("device.theta")]
    opt = torch.optim.Adam(digital, lr=1e-2)
    opt_theta = torch.optim.Adam(theta, lr=1e-2) if theta else None
    gen = torch.Generator().manual_seed(0)
    for _ in range(steps):
        idx = torch.randint(0, len(x), (32,), generator=gen)
        opt.zero_grad()
        if opt_theta:
            opt_theta.zero_grad()
        nn.functional.cross_entropy(net(x[idx]), y[idx]).backward()
        opt.step()
        if opt_theta:
            opt_theta.step()
            physical.after_optimizer_step()
    net.eval()
    with torch.no_grad():
        return float((net(xt).argmax(1) == yt).float().mean())


@pytest.mark.slow
def test_hybrid_mlp_trains_close_to_exact_and_digital():
    acc = {kind: train_mlp(kind) for kind in ("zo+sm", "exact", "digital")}
    assert acc["digital"] > 0.75
    assert acc["zo+sm"] >= acc["exact"] - 0.05
    assert acc["zo+sm"] >= acc["digital"] - 0.05
