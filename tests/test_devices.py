"""Every device against its closed form, plus the shared non-idealities and fault injection."""

from __future__ import annotations

import cmath
import math
import re
import time
from pathlib import Path

import pytest
import torch

from astraora.build import make_device
from astraora.config import compose_entry
from astraora.devices import BUILT_IN, SLM, Device, MatVec, Monarch, MRRBank, MZIClassical, MZIMesh
from astraora.devices.base import wrap_phase
from astraora.devices.dense import mrr_mean_weight, mrr_transmission
from astraora.errors import ConfigError, DeviceFault

FAMILIES = [MatVec, SLM, MRRBank, MZIMesh, MZIClassical, Monarch]
PHASE_FAMILIES = [SLM, MRRBank, MZIMesh, MZIClassical, Monarch]
CONF_DIR = Path(__file__).resolve().parents[1] / "conf" / "device"
CONF_FILES = BUILT_IN  # every built-in device has its conf/device entry


def make(cls, n: int = 5, m: int = 3, **kwargs) -> Device:
    return cls(n, m, seed=0, name="test", **kwargs).double()


def randn(*shape: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def close(a: torch.Tensor, b: torch.Tensor, tol: float = 1e-10) -> bool:
    return torch.allclose(a, b, rtol=tol, atol=tol)


# ----------------------------------------------------------------- independent closed forms
def paper_cell(theta: float, phi: float) -> list[list[complex]]:
    a, b = (theta - phi) / 2, (theta + phi) / 2
    g = cmath.exp(1j * b) / math.sqrt(2)
    return [
        [g * (math.sin(a) + 1j * math.sin(b)), g * (-math.cos(a) + 1j * math.cos(b))],
        [g * (math.cos(a) + 1j * math.cos(b)), g * (math.sin(a) - 1j * math.sin(b))],
    ]


def classical_cell(phi: float, theta: float) -> list[list[complex]]:
    """The classical cell for its pair in θ order (the paper's code's): external phase φ first."""
    e = cmath.exp(1j * phi)
    return [[e * math.sin(theta), e * math.cos(theta)], [math.cos(theta), -math.sin(theta)]]


CELL_FORMULA = {MZIMesh: paper_cell, MZIClassical: classical_cell}


def mesh_cells(size: int):
    """(column, first wire, flat index of the cell's θ) in the documented layout."""
    index = 0
    for column in range(size):
        start = column % 2
        for j in range(size // 2 - start):
            yield column, start + 2 * j, index
            index += 2


def explicit_unitary(cls, theta: torch.Tensor, size: int) -> torch.Tensor:
    unitary = torch.eye(size, dtype=torch.complex128)
    for column in range(size):
        step = torch.eye(size, dtype=torch.complex128)
        for col, wire, i in mesh_cells(size):
            if col == column:
                cell = CELL_FORMULA[cls](float(theta[i]), float(theta[i + 1]))
                step[wire : wire + 2, wire : wire + 2] = torch.tensor(cell, dtype=torch.complex128)
        unitary = step @ unitary
    return unitary


def explicit_mzi_neighbours(theta: torch.Tensor, size: int) -> torch.Tensor:
    cells = list(mesh_cells(size))
    total = torch.zeros_like(theta)
    for column, wire, i in cells:
        for other_column, other_wire, k in cells:
            if other_column == column and abs(other_wire - wire) == 2:
                total[i : i + 2] += theta[k : k + 2]
    return total


def mrr_t(phi: float, a: float = 0.8, r: float = 0.9) -> float:
    return math.sqrt((a * a + r * r - 2 * a * r * math.cos(phi)) / (1 + a * a * r * r - 2 * a * r * math.cos(phi)))


# ----------------------------------------------------------------- configs
@pytest.mark.parametrize("family", sorted(CONF_FILES))
def test_yaml_instantiates(family):
    cfg = compose_entry("device", family)
    assert "name" not in cfg and cfg.family == family
    device = make_device(cfg, d_in=6, d_out=4, seed=0, name="t")
    assert type(device) is CONF_FILES[family]
    assert device.query(torch.randn(3, 6)).shape == (3, 4)


@pytest.mark.slow
def test_theta_learning_rate_defaults_to_the_device_family():
    """physical_optimizer.lr follows the family's training settings in conf/physical (mrr: 3e-2; slm:
    3e-3 with its colored differences, 1e-2 with random directions), else 1e-2; an explicit value wins, and the paper
    presets keep the paper's 1e-2 on any device."""
    from conftest import compose_config

    def lr(*overrides):
        return compose_config(list(overrides)).physical_optimizer.lr

    assert lr("device=mrr") == 3e-2 and lr("device=mzi") == lr("device=digital") == 1e-2
    assert lr("device=slm") == lr("device=slm", "mode=exact") == 3e-3
    assert lr("device=slm", "zo.direction=gaussian") == lr("device=slm", "zo=rademacher") == 1e-2
    assert lr("device=mrr", "physical_optimizer.lr=0.005") == 0.005
    assert (
        lr("device=mrr", "experiment=paper_urbansound8k_cpu") == lr("device=mrr", "experiment=ablation_modes") == 1e-2
    )


@pytest.mark.slow
def test_zo_estimator_defaults_to_the_device_family():
    """zo.direction follows the family's training settings (conf/physical/zo: slm colored), else gaussian; the paper
    presets and the query-efficiency preset keep random directions on every family."""
    from conftest import compose_config

    def direction(*overrides):
        return compose_config(list(overrides)).zo.direction

    assert direction("device=slm") == "colored"
    assert direction("device=mzi") == direction("device=mrr") == direction("device=matvec") == "gaussian"
    assert direction("device=slm", "zo.direction=gaussian") == "gaussian"
    assert direction("device=mrr", "zo=colored") == "colored"
    for preset in ("paper_cifar10", "paper_lm_cpu", "paper_urbansound8k_cpu", "query_efficient", "ablation_modes"):
        assert direction("device=slm", f"experiment={preset}") == "gaussian", preset


@pytest.mark.parametrize("loss, coupling", [(0.8, 0.9), (0.9, 0.9), (0.95, 0.9), (0.99, 0.99)])
def test_mrr_auto_init_centres_the_weights(loss, coupling):
    """init_high=auto: the initial weights average zero (within sampling error), where the paper's
    [0.01, π/4] puts their mean at +0.47 (a = 0.8, r = 0.9)."""
    bank = MRRBank(64, 128, loss=loss, coupling=coupling, seed=0)
    weights = 2 * mrr_transmission(bank.theta.double(), loss, coupling) - 1
    assert abs(weights.mean().item()) < 3 * weights.std().item() / math.sqrt(weights.numel())
    assert weights.min() < -0.05 and weights.max() > 0.05
    assert 0.01 < bank.init_high < math.pi and bank.theta.min() >= 0.01 and bank.theta.max() <= bank.init_high
    if (loss, coupling) == (0.8, 0.9):
        assert bank.init_high == pytest.approx(0.2517, abs=1e-3)
        paper = MRRBank(64, 128, init_high=math.pi / 4, seed=0)
        paper_weights = 2 * mrr_transmission(paper.theta.double(), loss, coupling) - 1
        assert paper_weights.mean().item() == pytest.approx(0.471, abs=0.02)
    # the mean over the range, by quadrature, against a brute-force sample average
    assert mrr_mean_weight(0.01, math.pi / 4, 0.8, 0.9) == pytest.approx(
        (2 * mrr_transmission(torch.linspace(0.01, math.pi / 4, 200001, dtype=torch.float64), 0.8, 0.9) - 1)
        .mean()
        .item(),
        abs=1e-5,
    )


def test_yaml_holds_paper_constants():
    mrr = compose_entry("device", "mrr")
    assert (mrr.loss, mrr.coupling, mrr.init_low, mrr.init_high) == (0.8, 0.9, 0.01, "auto")
    assert compose_entry("device", "mzi").init_center == math.pi / 2


@pytest.mark.parametrize(
    "cls, kwargs, key",
    [
        (MRRBank, {"loss": 1.5}, "device.loss"),
        (MRRBank, {"coupling": 1.0}, "device.coupling"),
        (MRRBank, {"init_low": 1.0, "init_high": 0.0}, "device.init_high"),
        (MRRBank, {"init_high": "paper"}, "device.init_high"),
        (MRRBank, {"loss": 0.5}, "device.init_high"),  # weights all positive: no zero-mean range
        (MRRBank, {"init_low": -0.5}, "device.init_low"),
        (MZIMesh, {"init_std": -1.0}, "device.init_std"),
        (MZIMesh, {"modes": 4}, "device.modes"),  # fewer wires than max(n, m) = 5
        (MZIClassical, {"modes": 6.5}, "device.modes"),
        (Monarch, {"init_halfwidth": -1.0}, "device.init_halfwidth"),
        (SLM, {"nonideal": {"queries": "some"}}, "device.nonideal.queries"),
        (MatVec, {"nonideal": {"phase_bits": 4}}, "phase_bits"),
        (SLM, {"nonideal": {"phase_bits": 1}}, "device.nonideal.phase_bits"),
        (SLM, {"nonideal": {"output_noise": -0.1}}, "device.nonideal.output_noise"),
        (SLM, {"nonideal": {"bogus": 1}}, "bogus"),
        (SLM, {"faults": {"raise_prob": 2.0}}, "device.faults.raise_prob"),
        (SLM, {"d_in": 0}, "d_in"),
    ],
)
def test_bad_values_raise_config_error_naming_the_key(cls, kwargs, key):
    kwargs = {"d_in": 5, "d_out": 3, **kwargs}
    with pytest.raises(ConfigError, match=re.escape(key)):
        cls(**kwargs)


# ----------------------------------------------------------------- closed forms
def test_matvec_matrix_is_theta():
    device = make(MatVec)
    assert close(device.matrix(), device.theta)


def test_slm_is_cosine_over_root_n():
    device = make(SLM)
    assert close(device.matrix(), torch.cos(device.theta) / math.sqrt(5))


def test_mrr_matches_transmission_formula_and_range():
    device = make(MRRBank)
    phi = torch.linspace(-10, 10, 15, dtype=torch.float64).reshape(3, 5)
    expected = torch.tensor([[2 * mrr_t(float(v)) - 1 for v in row] for row in phi], dtype=torch.float64)
    weights = device.matrix(phi)
    assert close(weights, expected)
    low, high = device.weight_range()
    assert math.isclose(low, 2 * 0.1 / (1 - 0.72) - 1) and math.isclose(high, 2 * 1.7 / 1.72 - 1)
    dense = device.matrix(torch.rand(3, 5, generator=torch.Generator().manual_seed(1), dtype=torch.float64) * 40 - 20)
    assert low - 1e-12 <= dense.min() and dense.max() <= high + 1e-12


@pytest.mark.parametrize("n, m, size", [(1, 1, 2), (4, 4, 4), (3, 5, 6), (5, 3, 6), (7, 2, 8), (2, 7, 8)])
def test_mzi_sizes(n, m, size):
    device = make(MZIMesh, n, m)
    assert device.modes == size and device.theta_shape() == (size * (size - 1),)
    assert device.theta.shape == (size * (size - 1),) and device.matrix().shape == (m, n)


@pytest.mark.parametrize("cls", [MZIMesh, MZIClassical])
def test_wider_mesh_is_the_top_left_block_of_its_unitary(cls):
    """device.modes = N > max(n, m): the layer is Re(U)[:m, :n] of the N-wire mesh, by either
    engine, with N(N − 1) phases."""
    device = make(cls, 3, 5, modes=9)
    assert device.modes == 10 and device.theta_shape() == (90,)
    block = device.unitary().real[:5, :3]
    assert close(device.matrix(), block)
    x = randn(4, 3, seed=7)
    tiles = device.transfer(device.theta.detach()[None], x)[0]
    device.engine = "columns"
    assert close(device.transfer(device.theta.detach()[None], x)[0], tiles) and close(tiles, x @ block.T)


def test_mzi_init_distribution():
    device = MZIMesh(16, 16, seed=3)
    assert abs(device.theta.mean().item() - math.pi / 2) < 0.05
    assert abs(device.theta.std().item() - 0.25) < 0.03
    assert MZIMesh(4, 4, init_center=0.0, init_std=0.0).theta.abs().max() == 0


@pytest.mark.parametrize("cls", [MZIMesh, MZIClassical])
def test_mzi_cell_matches_formula(cls):
    theta, phi = randn(6, seed=1) * 3, randn(6, seed=2) * 3
    cells = cls.cell(theta, phi)
    expected = torch.tensor(
        [CELL_FORMULA[cls](float(t), float(f)) for t, f in zip(theta, phi, strict=True)], dtype=torch.complex128
    )
    assert cells.shape == (6, 2, 2) and close(cells, expected)


@pytest.mark.parametrize("cls", [MZIMesh, MZIClassical])
@pytest.mark.parametrize("n, m", [(3, 5), (4, 4), (6, 1)])
def test_mzi_unitary_is_unitary_and_follows_layout(cls, n, m):
    device = make(cls, n, m)
    theta = randn(*device.theta_shape(), seed=n) * 2
    unitary = device.unitary(theta)
    eye = torch.eye(device.modes, dtype=torch.complex128)
    assert close(unitary @ unitary.conj().T, eye)
    assert close(unitary, explicit_unitary(cls, theta, device.modes))


@pytest.mark.parametrize("cls", [MZIMesh, MZIClassical])
@pytest.mark.parametrize("batch", [2, 9])  # fewer rows than n (mesh on x) and more (mesh on the basis)
def test_mzi_transfer_is_real_part_of_unitary(cls, batch):
    device = make(cls, 5, 3)
    weights = device.unitary().real[:3, :5]
    x = randn(batch, 5)
    assert close(device.matrix(), weights)
    assert close(device.query(x), x @ weights.T)


# Monarch's structure, phase counts and idle phases: tests/test_fidelity.py.
def test_monarch_init_is_the_papers():
    theta = Monarch(64, 32, seed=1, name="t").theta.detach()
    assert (theta - math.pi / 2).abs().max() <= 0.1 and theta.std() > 0.05


# ----------------------------------------------------------------- every device
@pytest.mark.parametrize("cls", FAMILIES)
def test_linear_in_x(cls):
    device = make(cls)
    x1, x2 = randn(4, 5, seed=1), randn(4, 5, seed=2)
    assert close(device.query(2.5 * x1 - 0.7 * x2), 2.5 * device.query(x1) - 0.7 * device.query(x2))


@pytest.mark.parametrize("cls", FAMILIES)
def test_batched_settings_equal_single_settings(cls):
    device = make(cls)
    thetas = device.theta.detach() + 0.3 * randn(3, *device.theta_shape(), seed=4)
    shared, per_setting = randn(7, 5, seed=5), randn(3, 2, 5, seed=6)
    batched = device.query(shared, thetas)
    assert batched.shape == (3, 7, 3)
    assert close(batched, torch.stack([device.query(shared, th) for th in thetas]))
    one_by_one = torch.stack([device.query(x, th) for x, th in zip(per_setting, thetas, strict=True)])
    assert close(device.query(per_setting, thetas), one_by_one)


@pytest.mark.parametrize("cls", FAMILIES)
def test_simulate_gradient_matches_finite_differences(cls):
    device = make(cls, 4, 3)
    theta = device.theta.detach().clone().requires_grad_(True)
    for batch in (2, 6):
        x = randn(batch, 4, seed=batch).requires_grad_(True)
        assert torch.autograd.gradcheck(lambda th, inp: device.simulate(inp, th), (theta, x))


def test_mzi_gradient_with_crosstalk_and_drift():
    device = make(MZIMesh, 3, 4, nonideal={"crosstalk": 0.1, "drift_std": 0.05})
    device.step_drift()
    theta = device.theta.detach().clone().requires_grad_(True)
    assert torch.autograd.gradcheck(lambda th: device.simulate(randn(2, 3), th), (theta,))


# ----------------------------------------------------------------- non-idealities
def test_output_noise_relative_std_and_seed():
    device = make(SLM, 20, 10, nonideal={"output_noise": 0.1})
    x = randn(400, 20)
    clean, noisy = device.simulate(x).detach(), device.query(x)
    relative = (noisy - clean) / clean.abs()
    assert abs(relative.std().item() - 0.1) < 0.005 and abs(relative.mean().item()) < 0.005
    assert torch.equal(noisy, make(SLM, 20, 10, nonideal={"output_noise": 0.1}).query(x))
    assert not torch.equal(noisy, SLM(20, 10, seed=1, name="test", nonideal={"output_noise": 0.1}).double().query(x))
    assert not torch.equal(noisy, device.query(x))  # the generator advances


@pytest.mark.parametrize("cls", [SLM, MRRBank, MZIMesh, Monarch])
def test_phase_quantization(cls):
    device = make(cls, nonideal={"phase_bits": 3})
    theta = (10 * randn(4, *device.theta_shape())).requires_grad_(True)
    quantized = device.effective_theta(theta)
    # Distinct wrapped values, as points e^{iθ} on the circle (the straight-through sum leaves ulp-level noise).
    points = torch.stack([quantized.detach().cos(), quantized.detach().sin()], -1).reshape(-1, 2)
    assert len(torch.unique(torch.round(points * 1e9), dim=0)) <= 8
    steps = (wrap_phase(quantized.detach()) + math.pi) / (2 * math.pi / 8)
    assert close(steps, torch.round(steps), 1e-9)
    assert (wrap_phase(quantized - theta).abs() <= math.pi / 8 + 1e-9).all()
    quantized.sum().backward()
    assert torch.equal(theta.grad, torch.ones_like(theta))
    ideal = make(cls)
    assert close(device.matrix(theta[0].detach()), ideal.matrix(quantized[0].detach()))


def test_input_quantization():
    device = make(MatVec, nonideal={"input_bits": 3})
    x = randn(6, 5)
    scale = x.abs().max() / 3
    quantized = torch.round(x / scale) * scale
    assert len(torch.unique(quantized)) <= 7
    assert close(device.query(x), quantized @ device.theta.detach().T)


def test_drift_is_a_random_walk_the_device_obeys():
    device = make(SLM, 20, 10, nonideal={"drift_std": 0.01})
    before = device.matrix().detach()
    walk = [device.drift.clone()]
    for _ in range(30):
        device.step_drift()
        walk.append(device.drift.clone())
    walk = torch.stack(walk)
    steps = walk.diff(dim=0)
    assert abs(steps.std().item() - 0.01) < 0.0005 and abs(steps.mean().item()) < 0.0005
    lag_corr = torch.corrcoef(torch.stack([steps[:-1].flatten(), steps[1:].flatten()]))[0, 1]
    assert abs(lag_corr) < 0.05
    assert not close(device.matrix(), before, 1e-6)
    assert close(device.matrix(), make(SLM, 20, 10).matrix(device.theta + device.drift))
    still = make(SLM, 20, 10)
    still.step_drift()
    assert torch.equal(still.drift, torch.zeros_like(still.drift))


def test_mrr_crosstalk_matches_explicit_neighbours():
    device = make(MRRBank, nonideal={"crosstalk": 0.05})
    theta = device.theta.detach()
    effective = theta.clone()
    for i in range(3):
        for j in range(5):
            effective[i, j] += 0.05 * sum(float(theta[i, k]) for k in (j - 1, j + 1) if 0 <= k < 5)
    expected = torch.tensor([[2 * mrr_t(float(v)) - 1 for v in row] for row in effective], dtype=torch.float64)
    assert close(device.matrix(), expected)


@pytest.mark.parametrize("n, m", [(5, 3), (2, 2), (8, 8)])
def test_mzi_crosstalk_matches_explicit_neighbours(n, m):
    device = make(MZIMesh, n, m, nonideal={"crosstalk": 0.05})
    theta = randn(*device.theta_shape())
    neighbours = explicit_mzi_neighbours(theta, device.modes)
    assert close(device.neighbour_sum(theta.unsqueeze(0))[0], neighbours)
    assert close(device.matrix(theta), device.unitary(theta + 0.05 * neighbours).real[:m, :n])


# ----------------------------------------------------------------- faults
@pytest.mark.parametrize("cls", FAMILIES)
def test_fault_injection(cls):
    x = randn(4, 5)
    with pytest.raises(DeviceFault):
        make(cls, faults={"raise_prob": 1.0}).query(x)
    broken = make(cls, faults={"nonfinite_prob": 1.0})
    assert not broken.query(x).isfinite().all()
    assert not broken.query(x, broken.theta.detach().expand(2, *broken.theta_shape())).isfinite().all()


def test_slow_fault_delays_the_query():
    device = make(SLM, faults={"slow_prob": 1.0, "slow_seconds": 0.05})
    start = time.perf_counter()
    device.query(randn(2, 5))
    assert time.perf_counter() - start >= 0.05


def test_adam_betas_reach_the_optimizer_and_bad_ones_are_refused():
    """physical_optimizer.betas / task.optimizer.betas: null keeps torch's (0.9, 0.999); a pair in
    [0, 1) reaches Adam; anything else is refused before training, naming the key."""
    from conftest import compose_config

    from astraora.build import make_optimizer
    from astraora.config import validate

    param = [torch.nn.Parameter(torch.zeros(2))]
    cfg = compose_config(["physical_optimizer.betas=[0.95,0.99]"])
    validate(cfg)
    assert make_optimizer(param, cfg.physical_optimizer).defaults["betas"] == (0.95, 0.99)
    assert make_optimizer(param, compose_config([]).physical_optimizer).defaults["betas"] == (0.9, 0.999)
    for key, bad in [
        ("physical_optimizer.betas", "[0.9,1.0]"),
        ("physical_optimizer.betas", "[0.9]"),
        ("task.optimizer.betas", "[0.9,-0.1]"),
    ]:
        with pytest.raises(ConfigError, match=re.escape(key)):
            validate(compose_config([f"+{key}={bad}" if key.startswith("task") else f"{key}={bad}"]))
