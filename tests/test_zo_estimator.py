"""The ZO equations as pure functions (docs/ALGORITHM.md §3 and §9) against exact gradients, and the
zo group's one set of rules (:func:`astraora.zo.validate_zo`) as the config and the constructors apply it."""

from __future__ import annotations

import re

import pytest
import torch
from conftest import compose_config, random_batch
from omegaconf import OmegaConf

from astraora.config import validate
from astraora.errors import ConfigError
from astraora.rng import make_generator
from astraora.zo import (
    ColoredEstimator,
    ZOEstimator,
    color_masks,
    colored_derivatives,
    colored_gradient,
    make_estimator,
    validate_zo,
    zo_coefficients,
    zo_gradient,
    zo_phi,
    zo_probes,
)

pytestmark = pytest.mark.usefixtures("float64")


def linear_phi(theta: torch.Tensor, x: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
    """φ(θ) = Σ_b ⟨A(θ) x_b, g_b⟩ for the linear map A(θ) = θ (m, n), measured as the estimator does:
    the probes' outputs at each setting θ' (K, m, n), reduced by zo_phi."""
    probes = zo_probes(x, g)
    return zo_phi(probes @ theta.transpose(-2, -1), g)


# --------------------------------------------------------------------------- §3: φ, coefficients, ĝ
@pytest.mark.parametrize("batch", [3, 9])  # B <= m and B > m (the compressed batch), m = 5
def test_phi_is_the_batch_sum_or_the_compressed_trace(batch):
    n, m = 4, 5
    x, g = random_batch(batch, n, m)
    thetas = torch.randn(3, m, n, generator=torch.Generator().manual_seed(1))
    assert zo_probes(x, g).shape == (min(batch, m), n)
    direct = torch.stack([((x @ t.T) * g).sum() for t in thetas])  # Σ_b ⟨A x_b, g_b⟩
    torch.testing.assert_close(linear_phi(thetas, x, g), direct, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("two_sided", [False, True])
def test_coefficients_are_the_directional_derivatives_of_a_linear_phi(two_sided):
    n, m, batch, mu = 4, 5, 9, 1e-3
    x, g = random_batch(batch, n, m)
    theta = torch.randn(m, n, generator=torch.Generator().manual_seed(2))
    u = torch.randn(6, m * n, generator=torch.Generator().manual_seed(3))
    plus = linear_phi(theta + mu * u.view(6, m, n), x, g)
    base = linear_phi(theta - mu * u.view(6, m, n), x, g) if two_sided else linear_phi(theta.unsqueeze(0), x, g)[0]
    exact = u @ (g.T @ x).reshape(-1)  # ⟨u_i, ∇φ⟩, ∇φ = Gᵀ X
    torch.testing.assert_close(zo_coefficients(plus, base, mu, two_sided), exact, rtol=1e-8, atol=1e-8)


def test_gradient_of_scaled_unit_directions_is_exact_in_any_chunking():
    """u_i = √p e_i, c_i = ⟨u_i, ∇φ⟩: (1/p) Σ c_i u_i = ∇φ, whether the p pairs come in one chunk or several."""
    p = 7
    truth = torch.randn(p, generator=torch.Generator().manual_seed(4))
    u = p**0.5 * torch.eye(p)
    c = u @ truth
    torch.testing.assert_close(zo_gradient([(c, u)], p), truth, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(zo_gradient([(c[:3], u[:3]), (c[3:], u[3:])], p), truth, rtol=1e-12, atol=1e-12)
    with pytest.raises(ValueError):
        zo_gradient([], p)


@pytest.mark.parametrize("two_sided", [False, True])
@pytest.mark.parametrize("batch", [3, 9])
def test_the_estimate_averages_to_the_true_gradient(two_sided, batch):
    """E[ĝ] = ∇φ for E[u uᵀ] = I: over many estimates of M Gaussian directions the mean is within a
    few standard errors of Gᵀ X, the exact gradient of the linear map."""
    n, m, M, trials, mu = 4, 3, 4, 3000, 1e-3
    x, g = random_batch(batch, n, m)
    theta = torch.randn(m, n, generator=torch.Generator().manual_seed(5))
    truth = (g.T @ x).reshape(-1)
    gen = torch.Generator().manual_seed(6)
    u = torch.randn(trials, M, m * n, generator=gen)
    settings = lambda step: (theta + step * u.view(trials, M, m, n)).reshape(-1, m, n)  # noqa: E731
    plus = linear_phi(settings(mu), x, g).view(trials, M)
    base = linear_phi(settings(-mu), x, g).view(trials, M) if two_sided else linear_phi(theta[None], x, g)[0]
    coefficients = zo_coefficients(plus, base, mu, two_sided)
    estimates = torch.stack([zo_gradient([(coefficients[t], u[t])], M) for t in range(trials)])
    mean, se = estimates.mean(0), estimates.std(0) / trials**0.5
    assert ((mean - truth).abs() <= 5 * se).all(), (mean - truth).abs().max()
    # and an estimate is noisy: E‖ĝ − ∇φ‖² = ‖∇φ‖² (p + 1)/M for Gaussian directions
    mse = float((estimates - truth).square().sum(1).mean() / truth.square().sum())
    assert mse == pytest.approx((m * n + 1) / M, rel=0.15)


def test_the_estimator_is_the_pure_functions_on_its_own_directions():
    """ZOEstimator on a linear device gives zo_gradient of zo_coefficients on the directions its
    generator draws (the class adds only scheduling, chunking and the ledger)."""
    from astraora.devices import MatVec
    from astraora.ledger import QueryLedger

    n, m, batch, M, mu = 4, 3, 5, 6, 1e-3
    device = MatVec(n, m, seed=0)
    x, g = random_batch(batch, n, m)
    theta = device.theta.detach().clone()
    ghat = ZOEstimator(samples=M, mu=mu, chunk_size=4, generator=make_generator(0, "zo")).estimate(
        QueryLedger(device), x, g
    )
    u = ZOEstimator(samples=M, generator=make_generator(0, "zo")).directions(M, m * n, theta.dtype)
    plus = linear_phi(theta + mu * u.view(M, m, n), x, g)
    expected = zo_gradient([(zo_coefficients(plus, linear_phi(theta[None], x, g)[0], mu, False), u)], M)
    torch.testing.assert_close(ghat, expected.view(m, n), rtol=1e-9, atol=1e-12)


# --------------------------------------------------------------------------- §9: colored differences
def crosstalk_map(theta: torch.Tensor, c: float = 0.3) -> torch.Tensor:
    """An entry-wise device with row-neighbour crosstalk: A[i, j] = sin(θ[i, j] + c (θ[i, j−1] + θ[i, j+1]))."""
    padded = torch.nn.functional.pad(theta, (1, 1))
    return torch.sin(theta + c * (padded[..., :-2] + padded[..., 2:]))


def test_color_masks_split_the_columns():
    masks = color_masks(3, 2, 7, torch.float64)
    assert masks.shape == (3, 2, 7)
    assert torch.equal(masks.sum(0), torch.ones(2, 7))
    assert torch.equal(masks[1, 0], torch.tensor([0.0, 1, 0, 0, 1, 0, 0]))


@pytest.mark.parametrize("two_sided, order", [(False, 1), (True, 2)])
def test_colored_gradient_is_exact_to_order_mu(two_sided, order):
    """With k = 3 colors and offsets (−1, 0, 1) the colored VJP matches autograd's ∇_θ ⟨A(θ), C⟩ up
    to O(μ) one-sided, O(μ²) two-sided: ten times smaller μ, 10^order times smaller error."""
    m, n, offsets = 4, 8, (-1, 0, 1)
    gen = torch.Generator().manual_seed(7)
    theta, c = torch.randn(m, n, generator=gen), torch.randn(m, n, generator=gen)
    leaf = theta.clone().requires_grad_(True)
    exact = torch.autograd.grad((crosstalk_map(leaf) * c).sum(), leaf)[0]
    masks = color_masks(3, m, n, theta.dtype)

    def error(mu: float) -> float:
        plus = crosstalk_map(theta + mu * masks)
        base = crosstalk_map(theta - mu * masks) if two_sided else crosstalk_map(theta)[None]
        ghat = colored_gradient(c, colored_derivatives(plus, base, mu, two_sided), offsets)
        return float((ghat - exact).norm() / exact.norm())

    coarse, fine = error(1e-2), error(1e-3)
    assert fine < 1e-3 and coarse / fine == pytest.approx(10**order, rel=0.3)


def test_one_color_cannot_separate_crosstalking_neighbours():
    """The colors are what keeps neighbours apart: perturbing every control at once (k = 1) sums the
    neighbours' terms into each control and misses the gradient by far more than O(μ)."""
    m, n, mu = 3, 6, 1e-6
    gen = torch.Generator().manual_seed(8)
    theta, c = torch.randn(m, n, generator=gen), torch.randn(m, n, generator=gen)
    leaf = theta.clone().requires_grad_(True)
    exact = torch.autograd.grad((crosstalk_map(leaf) * c).sum(), leaf)[0]
    one = color_masks(1, m, n, theta.dtype)
    ghat = colored_gradient(
        c, colored_derivatives(crosstalk_map(theta + mu * one), crosstalk_map(theta)[None], mu, False), (0,)
    )
    assert float((ghat - exact).norm() / exact.norm()) > 0.05


# --------------------------------------------------------------------------- validate_zo
GROUPS = [
    ["zo=gaussian"],
    ["zo=rademacher"],
    ["zo=sphere"],
    ["zo=colored", "device=slm"],
    ["device=slm"],  # the slm's colored default (conf/physical/zo) on top of the gaussian group's keys
    ["zo=gaussian", "zo.chunk_size=8", "zo.two_sided=true"],
    ["experiment=query_efficient", "task=synthetic_audio", "device=mrr"],
]


@pytest.mark.parametrize("overrides", GROUPS, ids=lambda o: " ".join(o))
def test_every_composed_zo_group_passes_and_builds_its_estimator(overrides):
    zo = OmegaConf.to_container(compose_config(overrides).zo, resolve=True)
    validate_zo(zo)
    estimator = make_estimator(zo, generator=make_generator(0, "zo"))
    expected = ColoredEstimator if zo["direction"] == "colored" else ZOEstimator
    assert type(estimator) is expected and estimator.mu == zo["mu"]


def test_rademacher_and_sphere_groups_are_the_gaussian_group_with_another_direction():
    plain = OmegaConf.to_container(compose_config(["zo=gaussian", "device=mzi"]).zo, resolve=True)
    for name in ("rademacher", "sphere"):
        zo = OmegaConf.to_container(compose_config([f"zo={name}", "device=mzi"]).zo, resolve=True)
        assert list(zo) == list(plain) and zo == {**plain, "direction": name}


BAD = [
    ({"direction": "cauchy"}, "zo.direction='cauchy' is not allowed; choose one of", "'colored'"),
    ({"mu": 0}, "zo.mu=0 is not allowed", "> 0"),
    ({"mu": "small"}, "zo.mu='small' is not allowed", "> 0"),
    ({"two_sided": "yes"}, "zo.two_sided='yes' is not allowed", "true or false"),
    ({"samples": 0}, "zo.samples=0 is not allowed", ">= 1"),
    ({"samples": 2.5}, "zo.samples=2.5 is not allowed", "integer"),
    ({"chunk_size": "big"}, "zo.chunk_size='big' is not allowed", "'auto'"),
    ({"chunk_size": 0}, "zo.chunk_size=0 is not allowed", "'auto'"),
    ({"chunk_size": True}, "zo.chunk_size=True is not allowed", "'auto'"),
    ({"reuse_forward": 1}, "zo.reuse_forward=1 is not allowed", "true or false"),
    ({"every": 0}, "zo.every=0 is not allowed", ">= 1"),
    ({"between": "sometimes"}, "zo.between='sometimes' is not allowed", "'momentum', 'last'"),
    ({"reuse_readout": True}, "zo.reuse_readout=True: only with zo.direction=colored", "'gaussian'"),
    ({"orthogonal": True}, "zo.orthogonal=True is not allowed; not a key of the zo group", "'between'"),
    ({"direction": "colored", "reuse_readout": "yes"}, "zo.reuse_readout='yes' is not allowed", "true or false"),
    (
        {"direction": "colored", "every": 2},
        "zo.every=2: not available with zo.direction=colored",
        "zo.direction=gaussian",
    ),
    ({"direction": "colored", "blocks": 4}, "zo.blocks=4 is not allowed; not a key of the zo group", "'reuse_readout'"),
]


@pytest.mark.parametrize("options, names, allowed", BAD, ids=lambda v: repr(v)[:40])
def test_validate_zo_names_the_key_the_value_and_what_is_allowed(options, names, allowed):
    good = {"direction": "gaussian", "samples": 4, "mu": 1e-4, "chunk_size": "auto"}
    with pytest.raises(ConfigError) as err:
        validate_zo({**good, **options})
    assert names in str(err.value) and allowed in str(err.value) and "\n" not in str(err.value)


@pytest.mark.parametrize("options, names, allowed", BAD, ids=lambda v: repr(v)[:40])
def test_make_estimator_applies_the_same_rules(options, names, allowed):
    """A removed or misspelled key is a ConfigError naming it, not a TypeError from a constructor."""
    with pytest.raises(ConfigError, match="^" + re.escape(names)):
        make_estimator({"samples": 4, **options}, generator=make_generator(0, "zo"))


ZO_KWARGS = ("mu", "two_sided", "samples", "chunk_size", "reuse_forward", "every", "between")


@pytest.mark.parametrize(
    "options, names",
    [(o, n) for o, n, _ in BAD if "direction" not in o and set(o) <= set(ZO_KWARGS)]
    + [(o, n) for o, n, _ in BAD if o.get("direction") == "colored"],
    ids=lambda v: repr(v)[:40],
)
def test_the_constructors_apply_the_same_rules(options, names):
    if options.get("direction") == "colored":
        with pytest.raises(ConfigError, match="^" + re.escape(names)):
            ColoredEstimator(**{k: v for k, v in options.items() if k != "direction"})
    else:
        with pytest.raises(ConfigError, match="^" + re.escape(names)):
            ZOEstimator(generator=make_generator(0, "zo"), **options)


def test_random_directions_refuse_the_colored_direction():
    with pytest.raises(ConfigError, match="zo.direction='colored' is not allowed for random directions"):
        ZOEstimator(direction="colored", generator=make_generator(0, "zo"))


@pytest.mark.parametrize(
    "overrides",
    [
        ["zo.samples=0"],
        ["zo.samples=abc"],
        ["zo.direction=cauchy"],
        ["zo.mu=0"],
        ["zo.chunk_size=big"],
        ["zo.chunk_size=0"],
        ["zo.every=0"],
        ["zo.between=sometimes"],
        ["+zo.reuse_readout=true"],
        ["device=slm", "zo=colored", "zo.reuse_readout=yes"],
        ["device=slm", "zo=colored", "+zo.every=2"],
        ["device=slm", "zo.direction=colored", "zo.every=3"],
    ],
    ids=" ".join,
)
def test_the_config_refuses_what_validate_zo_refuses_naming_the_same_key(overrides):
    cfg = compose_config(overrides)
    with pytest.raises(ConfigError) as from_zo:
        validate_zo(OmegaConf.to_container(cfg.zo, resolve=True))
    with pytest.raises(ConfigError) as from_config:
        validate(cfg, import_targets=False)
    key = str(from_zo.value).split("=")[0]
    assert key.startswith("zo.") and str(from_config.value).startswith(key + "=")
