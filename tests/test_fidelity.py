"""The `monarch` and `mzi_classical` devices against the paper's code's formulas, re-derived here
independently and slowly: the Monarch factors as explicit dense matrices from the flat θ layout,
the classical cell and its mesh from their closed forms."""

from __future__ import annotations

import cmath
import math

import pytest
import torch

from astraora.devices import Monarch, MZIClassical, native
from astraora.devices.monarch import monarch_side
from astraora.devices.mzi import swap_cell_phases
from astraora.errors import ConfigError

# ----------------------------------------------------------------- Monarch, the paper's construction
PAPER_COUNTS = {  # (n, m): phases, as the paper's code allocates them
    (6144, 192): 294_912,
    (1536, 1536): 524_288,
    (512, 1024): 65_536,
    (33, 20): 1_024,
    (100, 37): 3_072,
    (64, 64): 1_024,
    (7, 300): 4_608,
}
MATRIX_SIZES = [(33, 20), (100, 37), (64, 64), (7, 300), (1, 1), (2, 3), (5, 17), (16, 4)]


def paper_side(d: int) -> int:
    """Blocks per side and wires per block, the paper's rule as written: 2^⌈log₂(d)/2⌉."""
    return 2 ** math.ceil(math.log2(d) / 2)


def paper_count(n: int, m: int) -> int:
    b_in, b_out = paper_side(n), paper_side(m)
    return b_out * b_in * b_in + b_out * b_out * b_in  # θ₁ (b_out, b_in, k_in), θ₂ (k_out, b_out, b_in)


def paper_monarch(theta: torch.Tensor, n: int, m: int) -> torch.Tensor:
    """Re(Q L P R)[:m, :n] for a flat θ in the paper's layout, every factor a dense matrix built
    entry by entry: R = blockdiag over input blocks i of (b_out × k_in) phase masks / √k_in, P the
    block transpose, L = blockdiag over output blocks k of (k_out × b_in) masks / √b_in, Q the
    read-out order (output q of block k on wire q·b_out + k)."""
    b_in = k_in = paper_side(n)
    b_out = k_out = paper_side(m)
    split = b_out * b_in * k_in
    assert theta.numel() == split + k_out * b_out * b_in
    first = theta[:split].reshape(b_out, b_in, k_in)  # θ₁[k, i, j]
    second = theta[split:].reshape(k_out, b_out, b_in)  # θ₂[q, k, i]
    R = torch.zeros(b_in * b_out, b_in * k_in, dtype=torch.complex128)
    for i in range(b_in):
        for k in range(b_out):
            for j in range(k_in):
                R[i * b_out + k, i * k_in + j] = cmath.exp(1j * float(first[k, i, j])) / math.sqrt(k_in)
    P = torch.zeros(b_out * b_in, b_in * b_out, dtype=torch.complex128)
    for i in range(b_in):
        for k in range(b_out):
            P[k * b_in + i, i * b_out + k] = 1
    L = torch.zeros(b_out * k_out, b_out * b_in, dtype=torch.complex128)
    for k in range(b_out):
        for q in range(k_out):
            for i in range(b_in):
                L[k * k_out + q, k * b_in + i] = cmath.exp(1j * float(second[q, k, i])) / math.sqrt(b_in)
    Q = torch.zeros(k_out * b_out, b_out * k_out, dtype=torch.complex128)
    for q in range(k_out):
        for k in range(b_out):
            Q[q * b_out + k, k * k_out + q] = 1
    x = torch.zeros(b_in * k_in, n, dtype=torch.complex128)  # zero padding: the n inputs are the first wires
    x[:n] = torch.eye(n, dtype=torch.complex128)
    return (Q @ L @ P @ R @ x).real[:m]


def uniform_phases(count: int, seed: int) -> torch.Tensor:
    return (torch.rand(count, generator=torch.Generator().manual_seed(seed), dtype=torch.float64) * 2 - 1) * math.pi


def relative_error(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max() / b.abs().max())


@pytest.mark.parametrize("n, m", sorted(PAPER_COUNTS))
def test_monarch_phase_count_is_the_papers(n, m):
    device = Monarch(n, m, name="t")
    assert device.num_params == device.theta.numel() == paper_count(n, m) == PAPER_COUNTS[(n, m)]
    assert (device.blocks_in, device.blocks_out) == (paper_side(n), paper_side(m))


def test_monarch_block_rule_at_every_size():
    """The device's integer rule equals 2^⌈log₂(d)/2⌉ for every width up to 2^16 + 1."""
    for d in range(1, 2**16 + 2):
        assert monarch_side(d) == paper_side(d), d


def test_monarch_refuses_the_old_block_size_key():
    with pytest.raises(ConfigError, match=r"^device\.block_size=8 is no longer a setting"):
        Monarch(6144, 192, block_size=8)


@pytest.mark.parametrize("n, m", MATRIX_SIZES)
def test_monarch_matrix_is_the_papers(n, m):
    """A θ vector in the paper's flat layout gives the paper's matrix, by the device's matrix()
    (the simulator), its query() (the hardware path) and a batch of settings, to float64 round-off."""
    device = Monarch(n, m, seed=0, name="t").double()
    thetas = torch.stack([uniform_phases(device.num_params, seed) for seed in range(3)])
    expected = torch.stack([paper_monarch(theta, n, m) for theta in thetas])
    assert relative_error(device.matrix(thetas[0]).detach(), expected[0]) < 1e-13
    eye = torch.eye(n, dtype=torch.float64)
    assert relative_error(device.query(eye, thetas).transpose(-1, -2), expected) < 1e-13
    x = torch.randn(3, 4, n, generator=torch.Generator().manual_seed(1), dtype=torch.float64)  # one batch per setting
    assert relative_error(device.query(x, thetas), x @ expected.transpose(-1, -2)) < 1e-13
    assert relative_error(device.simulate(x[0], thetas[0]).detach(), x[0] @ expected[0].T) < 1e-13


@pytest.mark.parametrize("n, m", [(6144, 192), (1536, 1536)])
def test_monarch_paths_at_the_papers_sizes(n, m):
    """At the paper's sizes (too large for dense factors) some columns, against the single-path
    formula A[q·b_out + k, i·k_in + j] = cos(θ₁[k, i, j] + θ₂[q, k, i]) / k_in."""
    device = Monarch(n, m, seed=0, name="t").double()
    theta = uniform_phases(device.num_params, 5)
    b_in, b_out = paper_side(n), paper_side(m)
    first = theta[: b_out * b_in * b_in].reshape(b_out, b_in, b_in)
    second = theta[b_out * b_in * b_in :].reshape(b_out, b_out, b_in)
    wires = [0, 1, b_in - 1, b_in, n // 2 + 3, n - 1]
    columns = device.query(torch.eye(n, dtype=torch.float64)[wires], theta).T  # (m, len(wires))
    for c, wire in enumerate(wires):
        i, j = divmod(wire, b_in)
        for o in range(0, m, 7):
            q, k = divmod(o, b_out)
            assert math.isclose(columns[o, c], math.cos(first[k, i, j] + second[q, k, i]) / b_in, abs_tol=1e-14)


@pytest.mark.parametrize("n, m", [(33, 20), (100, 37), (64, 64), (7, 300)])
def test_monarch_exactly_the_padded_phases_are_idle(n, m):
    """Phases on a path from one of the n inputs to one of the m outputs get a gradient; the others
    (on padded wires only) get none."""
    device = Monarch(n, m, seed=0, name="t").double()
    b_in, b_out = paper_side(n), paper_side(m)
    used_first = torch.tensor(
        [
            [
                [i * b_in + j < n and any(q * b_out + k < m for q in range(b_out)) for j in range(b_in)]
                for i in range(b_in)
            ]
            for k in range(b_out)
        ]
    )
    used_second = torch.tensor(
        [[[q * b_out + k < m and i * b_in < n for i in range(b_in)] for k in range(b_out)] for q in range(b_out)]
    )
    theta = uniform_phases(device.num_params, 2).requires_grad_(True)
    x = torch.randn(5, n, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    g = torch.randn(5, m, generator=torch.Generator().manual_seed(4), dtype=torch.float64)
    (grad,) = torch.autograd.grad((device.simulate(x, theta) * g).sum(), theta)
    assert torch.equal(grad != 0, torch.cat([used_first.flatten(), used_second.flatten()]))


def test_monarch_crosstalk_neighbours_stay_inside_a_mask_row():
    """Crosstalk couples adjacent entries along the last axis of θ₁ (b_out, b_in, k_in) and of θ₂
    (k_out, b_out, b_in), never across rows or from one mask into the other."""
    n, m = 7, 20
    device = Monarch(n, m, seed=0, name="t", nonideal={"crosstalk": 0.05}).double()
    theta = uniform_phases(device.num_params, 6)
    b_in, b_out = paper_side(n), paper_side(m)
    shapes = [(b_out, b_in, b_in), (b_out, b_out, b_in)]
    expected, offset = torch.zeros_like(theta), 0
    for shape in shapes:
        rows, width = math.prod(shape[:-1]), shape[-1]
        for r in range(rows):
            for c in range(width):
                here = offset + r * width + c
                expected[here] = sum(float(theta[offset + r * width + cc]) for cc in (c - 1, c + 1) if 0 <= cc < width)
        offset += math.prod(shape)
    assert torch.allclose(device.neighbour_sum(theta[None])[0], expected, rtol=0, atol=1e-14)
    assert relative_error(device.matrix(theta).detach(), paper_monarch(theta + 0.05 * expected, n, m)) < 1e-13


# ----------------------------------------------------------------- the classical MZI cell
def paper_classical_cell(first: float, second: float) -> torch.Tensor:
    """The paper's code's classical cell for a pair of phases in θ order: e^{i·first} on the top
    row, sin/cos of the second."""
    e = cmath.exp(1j * first)
    return torch.tensor(
        [[e * math.sin(second), e * math.cos(second)], [math.cos(second), -math.sin(second)]], dtype=torch.complex128
    )


def paper_classical_mesh(theta: torch.Tensor, size: int, angle_first: bool = False) -> torch.Tensor:
    """U for the rectangular mesh on `size` wires (even), cells in θ order column by column, each
    column's cells top to bottom, each cell's pair (first, second) consecutive; ``angle_first``
    reads each pair the other way round, (second, first)."""
    unitary, index = torch.eye(size, dtype=torch.complex128), 0
    for column in range(size):
        step = torch.eye(size, dtype=torch.complex128)
        for wire in range(column % 2, size - 1, 2):
            first, second = float(theta[index]), float(theta[index + 1])
            pair = (second, first) if angle_first else (first, second)
            step[wire : wire + 2, wire : wire + 2] = paper_classical_cell(*pair)
            index += 2
        unitary = step @ unitary
    assert index == theta.numel()
    return unitary


def test_classical_cell_in_the_papers_phase_order():
    first, second = uniform_phases(7, 1), uniform_phases(7, 2)
    expected = torch.stack([paper_classical_cell(float(a), float(b)) for a, b in zip(first, second, strict=True)])
    assert torch.allclose(MZIClassical.cell(first, second), expected, rtol=0, atol=1e-15)
    device = MZIClassical(2, 2, seed=0, name="t").double()  # one cell: U is the cell itself
    pair = torch.tensor([0.3, 1.1], dtype=torch.float64)
    assert torch.allclose(device.unitary(pair), paper_classical_cell(0.3, 1.1), rtol=0, atol=1e-15)
    for engine in ("tiles", "columns"):
        device.engine = engine
        assert torch.allclose(device.matrix(pair).detach(), paper_classical_cell(0.3, 1.1).real, rtol=0, atol=1e-15)


@pytest.mark.parametrize("n, m", [(6, 6), (7, 3), (2, 9)])
@pytest.mark.parametrize("engine", ["tiles", "columns"])
@pytest.mark.parametrize("compiled", [True, False])
def test_classical_mesh_in_the_papers_phase_order(n, m, engine, compiled, monkeypatch):
    """A θ in the paper's order gives Re(U)[:m, :n] of the mesh of the paper's cells, by both
    engines, with the compiled block build and without, for one setting and a batch of them."""
    if not compiled:
        monkeypatch.setattr(native, "library", lambda: None)
    device = MZIClassical(n, m, seed=0, name="t", engine=engine).double()
    thetas = torch.stack([uniform_phases(device.num_params, seed) for seed in range(3)])
    expected = torch.stack([paper_classical_mesh(theta, device.modes).real[:m, :n] for theta in thetas])
    assert relative_error(device.query(torch.eye(n, dtype=torch.float64), thetas).transpose(-1, -2), expected) < 1e-12
    x = torch.randn(2 * n + 1, n, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    assert relative_error(device.query(x, thetas), x @ expected.transpose(-1, -2)) < 1e-12
    assert relative_error(device.matrix(thetas[1]).detach(), expected[1]) < 1e-12
    assert torch.allclose(device.unitary(thetas[2]), paper_classical_mesh(thetas[2], device.modes), rtol=0, atol=1e-12)


def test_swap_cell_phases_relabels_the_other_order():
    """A θ stored angle first (each pair (θ, φ), astraora's order before) is this device's θ with
    every pair swapped."""
    device = MZIClassical(5, 4, seed=0, name="t").double()
    angle_first = uniform_phases(device.num_params, 8)
    as_paper = swap_cell_phases(angle_first)
    assert torch.equal(as_paper[0::2], angle_first[1::2]) and torch.equal(as_paper[1::2], angle_first[0::2])
    assert torch.equal(swap_cell_phases(as_paper), angle_first)
    expected = paper_classical_mesh(angle_first, device.modes, angle_first=True).real[:4, :5]
    assert relative_error(device.matrix(as_paper).detach(), expected) < 1e-12
    assert relative_error(device.matrix(angle_first).detach(), expected) > 0.1
