"""Tests that fail on a silently wrong gradient.

Each ZO estimate is checked against a reference built from the settings the device was actually
queried at (so it is independent of how the estimator draws or chunks its directions), and
against the oracle VJP; each input gradient against the matrix it must use.
"""

from __future__ import annotations

import math

import pytest
import torch
from conftest import compose_config, random_batch, run_cli
from torch import nn

from astraora.config import validate
from astraora.devices import SLM, MRRBank, MZIMesh
from astraora.errors import ConfigError
from astraora.hybrid import HybridLayer
from astraora.ledger import QueryLedger
from astraora.lit.module import HybridModule
from astraora.rng import make_generator
from astraora.surrogate.lowrank import best_rank_error
from astraora.zo import ZOEstimator

pytestmark = pytest.mark.usefixtures("float64")


def zo_estimator(samples=20, seed=0, **kwargs) -> ZOEstimator:
    return ZOEstimator(samples=samples, generator=make_generator(seed, "zo"), **kwargs)


data = random_batch


def oracle_vjp(device, x, g) -> torch.Tensor:
    """∇_θ Σ_b ⟨A(θ) x_b, g_b⟩ by autograd through the simulator."""
    theta = device.theta.detach().clone().requires_grad_(True)
    return torch.autograd.grad((device.simulate(x, theta) * g).sum(), theta)[0]


def record_zo_settings(device) -> list[torch.Tensor]:
    """Wrap ``device.query`` so that every setting queried for ``zo`` is recorded, one row each."""
    settings: list[torch.Tensor] = []
    query = device.query

    def recording(x, theta=None, *, purpose="forward"):
        if purpose == "zo":
            theta = device.theta.detach() if theta is None else theta
            single = theta.dim() == len(device.theta_shape())
            settings.extend((theta.unsqueeze(0) if single else theta).detach().clone())
        return query(x, theta, purpose=purpose)

    device.query = recording
    return settings


def reference_zo(device, x, g, settings, mu: float, samples: int, two_sided: bool) -> torch.Tensor:
    """ALGORITHM.md §3 from the recorded settings θ_j = θ + d_j, with φ(θ') = Σ_b ⟨A(θ') x_b, g_b⟩
    on the uncompressed batch (the noise-free simulator):
    one-sided (1/M) Σ_j (φ(θ_j) − φ(θ))/μ · d_j/μ; two-sided (1/M) Σ_j φ(θ_j)/(2μ) · d_j/μ over the
    2M settings ±μu (the pairs give (φ(θ + μu) − φ(θ − μu))/(2μ) · u)."""
    theta = device.theta.detach()
    phi = lambda th: float((device.simulate(x, th) * g).sum())  # noqa: E731
    perturbed = [s for s in settings if not torch.equal(s, theta)]
    assert len(perturbed) == (2 * samples if two_sided else samples)
    total = torch.zeros_like(theta)
    for setting in perturbed:
        u = (setting - theta) / mu
        coef = phi(setting) / (2 * mu) if two_sided else (phi(setting) - phi(theta)) / mu
        total += coef * u
    return total / samples


def cosine(a, b) -> float:
    return float(torch.nn.functional.cosine_similarity(a.flatten(), b.flatten(), dim=0))


# --------------------------------------------------------------------------- the ZO formula
@pytest.mark.parametrize("batch", [3, 9])  # B ≤ m and B > m (compressed batch), m = 5
@pytest.mark.parametrize("two_sided", [False, True])
@pytest.mark.parametrize("reuse_forward", [True, False])
def test_zo_estimate_is_the_formula_on_the_uncompressed_batch(batch, two_sided, reuse_forward):
    """The compressed batch (B > m, queries of C = GᵀX) must give exactly the uncompressed
    estimate for the same directions; so must reusing φ(θ) from the forward output."""
    device = MRRBank(6, 5, seed=0, name="d")
    x, g = data(batch, 6, 5)
    ledger = QueryLedger(device)
    y = ledger.query(x, "forward")
    settings = record_zo_settings(device)
    zo = zo_estimator(7, mu=1e-4, two_sided=two_sided, reuse_forward=reuse_forward, chunk_size=3)
    estimate = zo.estimate(ledger, x, g, y)
    expected = reference_zo(device, x, g, settings, 1e-4, 7, two_sided)
    torch.testing.assert_close(estimate, expected, rtol=1e-7, atol=1e-9)
    assert ledger.queries["zo"] == zo.queries_per_step(batch, 5, device) == len(settings) * min(batch, 5)


def test_reusing_phi_equals_requerying_it():
    device = SLM(7, 4, seed=2, name="d")
    x, g = data(3, 7, 4)
    estimates, counts = [], []
    for reuse in (True, False):
        ledger = QueryLedger(device)
        y = ledger.query(x, "forward")
        estimates.append(zo_estimator(9, reuse_forward=reuse).estimate(ledger, x, g, y))
        counts.append(ledger.queries["zo"])
    torch.testing.assert_close(estimates[0], estimates[1], rtol=1e-9, atol=1e-12)
    assert counts == [9 * 3, 10 * 3]


@pytest.mark.parametrize(
    "batch, nonideal, reused",
    [
        (3, {"input_bits": 8}, True),  # the same rows X, quantized with the same range: exact
        (12, {"input_bits": 8}, False),  # C = GᵀX is quantized with another range than X
        (3, {"phase_bits": 6, "queries": "forward"}, True),  # both at the quantized setting
        (3, {"output_noise": 0.1, "queries": "forward"}, False),  # the forward output is noisy, ZO is not
        (3, {"input_bits": 8, "queries": "forward"}, False),  # the forward quantizes X, ZO does not
    ],
)
def test_phi_is_requeried_where_the_forward_output_is_not_what_zo_measures(batch, nonideal, reused):
    device = SLM(7, 4, seed=2, name="d", nonideal=nonideal)
    x, g = data(batch, 7, 4)
    ledger = QueryLedger(device)
    y = ledger.query(x, "forward")
    reuse = zo_estimator(9, reuse_forward=True).estimate(ledger, x, g, y)
    requery = zo_estimator(9, reuse_forward=False).estimate(QueryLedger(device), x, g)
    torch.testing.assert_close(reuse, requery, rtol=1e-9, atol=1e-12)
    q = min(batch, 4)
    assert ledger.queries["zo"] == q * (9 if reused else 10) == zo_estimator(9).queries_per_step(batch, 4, device)


def test_queries_per_step_counts_the_requery_without_a_forward_output():
    device = SLM(7, 4, seed=2, name="d")
    x, g = data(3, 7, 4)
    zo = zo_estimator(5, reuse_forward=True)
    ledger = QueryLedger(device)
    zo.estimate(ledger, x, g)  # no forward output: φ(θ) must be queried
    assert ledger.queries["zo"] == zo.queries_per_step(3, 4, device, forward_output=False) == 3 * 6
    assert zo.queries_per_step(3, 4, device) == 3 * 5


# --------------------------------------------------------------------------- the four modes
@pytest.mark.parametrize("mode", ["zo+sm", "exact+sm", "zo+exact", "exact"])
@pytest.mark.parametrize("batch", [2, 6])  # B ≤ m and B > m (m = 3)
def test_mode_gradients_against_the_oracle(mode, batch):
    device = SLM(4, 3, seed=1, name="d")
    zo = zo_estimator(3000, mu=1e-5, chunk_size=1000) if mode.startswith("zo") else None
    layer = HybridLayer(device, mode=mode, rank=1, zo=zo, output_scale=False)  # rank 1: Â ≠ A
    x, g = data(batch, 4, 3)
    settings = record_zo_settings(device)
    x = x.clone().requires_grad_(True)
    (layer(x) * g).sum().backward()
    a = device.matrix().detach()
    exact = oracle_vjp(device, x.detach(), g)

    if mode.endswith("+sm"):
        torch.testing.assert_close(x.grad, g @ layer.surrogate.matrix())
        assert (x.grad - g @ a).norm() > 0.05 * (g @ a).norm()  # the surrogate's, not the true one
    else:
        torch.testing.assert_close(x.grad, g @ a, rtol=1e-12, atol=1e-12)

    if mode.startswith("zo"):
        expected = reference_zo(device, x.detach(), g, settings, 1e-5, 3000, two_sided=False)
        torch.testing.assert_close(device.theta.grad, expected, rtol=1e-6, atol=1e-9)
        # p = 12, M = 3000: E cosine ≈ √(M / (M + p)) ≈ 0.998, ‖ĝ‖/‖∇‖ ≈ √(1 + p/M)
        assert cosine(device.theta.grad, exact) > 0.98
        assert 0.9 < float(device.theta.grad.norm() / exact.norm()) < 1.1
    else:
        torch.testing.assert_close(device.theta.grad, exact, rtol=1e-12, atol=1e-12)


def test_surrogate_input_gradient_uses_s_not_its_transpose():
    """After PSI steps S is not diagonal. At full rank r = m with an exact sketch the projector-
    splitting step is exact, so G Â must equal G A(θ) — which G U Sᵀ Vᵀ would not."""
    device = SLM(6, 4, seed=0, name="d")
    layer = HybridLayer(
        device,
        mode="exact+sm",
        rank=4,
        output_scale=False,
        integrator={"name": "psi_implicit", "samples": 6, "sketch": "orthogonal"},
    )
    gen = torch.Generator().manual_seed(0)
    x, g = data(5, 6, 4)
    layer(x)  # initial readout
    for _ in range(3):
        with torch.no_grad():
            device.theta.add_(0.3 * torch.randn(device.theta.shape, generator=gen))
        layer.after_optimizer_step()
    s = layer.surrogate.S
    assert (s - torch.diag(s.diagonal())).norm() > 0.1 * s.norm()
    x = x.clone().requires_grad_(True)
    (layer(x) * g).sum().backward()
    torch.testing.assert_close(x.grad, g @ device.matrix().detach(), rtol=1e-9, atol=1e-10)


# --------------------------------------------------------------------------- end to end
def fit_teacher(train_theta: bool, steps: int = 150) -> tuple[float, float]:
    """(first, last) loss of a 8 → 6 SLM layer (θ and its output scale s) fitted by zo+sm to a
    teacher SLM; with ``train_theta`` False only s learns."""
    device = SLM(8, 6, seed=0, name="student")
    teacher = SLM(8, 6, seed=1, name="teacher").matrix().detach()
    layer = HybridLayer(
        device,
        mode="zo+sm",
        rank=4,
        zo=zo_estimator(40, mu=1e-4, seed=3),
        integrator={"name": "psi_implicit", "samples": 16},
    )
    opt = torch.optim.Adam([layer.scale] + ([device.theta] if train_theta else []), lr=2e-2)
    gen = torch.Generator().manual_seed(0)
    losses = []
    for _ in range(steps):
        x = torch.randn(16, 8, generator=gen)
        opt.zero_grad()
        loss = (layer(x) - x @ teacher.T).pow(2).mean()
        loss.backward()
        opt.step()
        layer.after_optimizer_step()
        losses.append(float(loss.detach()))
    return sum(losses[:5]) / 5, sum(losses[-10:]) / 10


def test_zo_trained_theta_lowers_the_loss_far_more_than_frozen_theta():
    first, trained = fit_teacher(True)
    _, frozen = fit_teacher(False)
    assert trained < 0.2 * frozen and trained < 0.2 * first


# --------------------------------------------------------------------------- non-idealities
def test_queries_forward_gives_zo_and_surrogate_the_ideal_device_at_the_quantized_setting():
    nonideal = {"phase_bits": 4, "output_noise": 0.1, "input_bits": 6, "crosstalk": 0.05, "drift_std": 0.01}
    device = MZIMesh(5, 4, seed=0, name="d", nonideal={**nonideal, "queries": "forward"})
    device.step_drift()
    x = torch.randn(3, 5, generator=torch.Generator().manual_seed(0))
    live = device.theta.detach()
    delta = 1e-3 * torch.randn(2, *live.shape, generator=torch.Generator().manual_seed(1))
    at_forward_point = device.effective_theta(live.unsqueeze(0))
    # ZO: the forward's effective setting plus the perturbation, continuously; no noise, no DAC
    torch.testing.assert_close(
        device.query(x, live + delta, purpose="zo"), device.transfer(at_forward_point + delta, x)
    )
    # surrogate / readout: the quantized setting itself, noise-free
    torch.testing.assert_close(device.query(x, live + delta, purpose="surrogate"), device.simulate(x, live + delta))
    # the forward pass sees everything
    assert not torch.allclose(device.query(x, purpose="forward"), device.simulate(x))
    hardware = MZIMesh(5, 4, seed=0, name="d", nonideal={**nonideal, "queries": "all"})
    assert not torch.allclose(hardware.query(x, purpose="zo"), hardware.simulate(x))


@pytest.mark.parametrize("cls", [SLM, MZIMesh])
def test_zo_cosine_with_quantized_phases(cls):
    """8-bit phases: useful under `forward` (the paper's setting); under `all` a step μ below the
    resolution measures rounding only, so it is refused."""
    x, g = data(8, 12, 12)
    device = cls(12, 12, seed=0, name="d", nonideal={"phase_bits": 8, "queries": "forward"})
    ledger = QueryLedger(device)
    estimate = zo_estimator(1000, mu=1e-4).estimate(ledger, x, g, ledger.query(x, "forward"))
    assert cosine(estimate, oracle_vjp(device, x, g)) > 0.8
    hardware = cls(12, 12, seed=0, name="d", nonideal={"phase_bits": 8, "queries": "all"})
    with pytest.raises(ConfigError, match=r"zo\.mu=0\.0001 is below half the phase resolution 2π/2\^8 = 0\.02454"):
        HybridLayer(hardware, zo=zo_estimator(10, mu=1e-4))
    HybridLayer(hardware, zo=zo_estimator(10, mu=2 * math.pi / 2**8))  # a step of one level is accepted


def test_zo_step_below_resolution_refused_by_config_validation():
    cfg = compose_config(["device=slm", "device.nonideal.phase_bits=8"])
    with pytest.raises(ConfigError, match=r"zo\.mu=0\.0001 .*2π/2\^8"):
        validate(cfg)
    validate(compose_config(["device=slm", "device.nonideal.phase_bits=8", "device.nonideal.queries=forward"]))
    validate(compose_config(["device=slm", "device.nonideal.phase_bits=8", "mode=exact+sm"]))


def test_zo_step_below_resolution_exits_2_with_one_line(tmp_path):
    result = run_cli(["device=mrr", "device.nonideal.phase_bits=6", f"hydra.run.dir={tmp_path / 'r'}"], cwd=tmp_path)
    assert result.returncode == 2, result.stderr[-2000:]
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and "zo.mu" in lines[0] and "2π/2^6" in lines[0]


@pytest.mark.parametrize("queries", ["forward", "all"])
def test_surrogate_under_output_noise(queries):
    """ε = 0.1: under `forward` the readout and the integrator's queries see the noise-free device,
    so after 20 PSI steps the surrogate is about as good as rank r allows; under `all` the noise in
    Y(θ₁) − Y(θ₀) swamps the small increments ΔA. The paper's initial range: its weights' common
    mode gives rank 8 a clear gap to track (centred weights have a flat spectrum, best rank-8 error
    0.57 against 0.36, and both ratios move towards 1)."""
    device = MRRBank(
        32, 24, seed=0, name="d", init_high=math.pi / 4, nonideal={"output_noise": 0.1, "queries": queries}
    )
    layer = HybridLayer(
        device, mode="zo+sm", rank=8, zo=zo_estimator(10), integrator={"name": "psi_implicit", "samples": 100}
    )
    layer(torch.randn(4, 32))
    gen = torch.Generator().manual_seed(0)
    for _ in range(20):
        with torch.no_grad():
            device.theta.add_(0.01 * torch.randn(device.theta.shape, generator=gen))
        layer.after_optimizer_step()
    a = device.matrix().detach()
    ratio = float((layer.surrogate.matrix() - a).norm() / a.norm()) / best_rank_error(a, 8)
    assert ratio < 1.1 if queries == "forward" else ratio > 1.5


# --------------------------------------------------------------------------- bookkeeping
def test_surrogate_update_skipped_when_theta_did_not_move():
    device = SLM(6, 4, seed=0, name="d")
    layer = HybridLayer(
        device, mode="zo+sm", rank=2, zo=zo_estimator(5), integrator={"name": "psi_implicit", "samples": 3}
    )
    layer(torch.randn(2, 6))
    before = dict(layer.ledger.queries), dict(layer.ledger.reprograms)
    with torch.no_grad():
        device.theta.mul_(1 + 1e-14)  # unchanged to relative 1e-12
    layer.after_optimizer_step()
    assert (dict(layer.ledger.queries), dict(layer.ledger.reprograms)) == before
    assert layer.ledger.skipped["surrogate"] == 1
    with torch.no_grad():
        device.theta.add_(1e-6)
    layer.after_optimizer_step()
    assert layer.ledger.queries["surrogate"] == 2 * 2 + 2 * 3 and layer.ledger.skipped["surrogate"] == 1


def test_output_scale_trained_by_the_physical_optimizer_without_weight_decay():
    layer = HybridLayer(SLM(4, 3, seed=0, name="d"), mode="exact", rank=2)
    model = nn.Sequential(nn.Linear(5, 4), layer)
    module = HybridModule(
        model,
        optimizer={"name": "adamw", "lr": 1e-3, "weight_decay": 0.1},
        physical_optimizer={"name": "adam", "lr": 1e-2, "weight_decay": 0.05},
        scheduler={"name": "constant"},
    )
    (digital, physical), _ = module.configure_optimizers()
    ids = lambda opt: [[id(p) for p in group["params"]] for group in opt.param_groups]  # noqa: E731
    assert ids(physical) == [[id(layer.theta)], [id(layer.scale)]]
    assert [group["weight_decay"] for group in physical.param_groups] == [0.05, 0.0]
    assert id(layer.scale) not in sum(ids(digital), []) and id(layer.theta) not in sum(ids(digital), [])
