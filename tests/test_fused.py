"""The fused mesh kernel (astraora/devices/fused.py, ``device.engine=fused``) against the column route,
run by Triton's interpreter on the CPU.

``TRITON_INTERPRET=1`` must be in the environment before triton is first imported: ``triton.jit``
chooses between compiling and interpreting when it decorates a function, and triton's own
``tl.randn`` is decorated when triton is imported. In a test session other modules (Lightning) have
imported triton long before this file runs, so the kernel checks run in one subprocess started with
the variable set (``python tests/test_fused.py`` prints one JSON record of measured errors per case)
and the tests here check the records. The refusals (no triton, no CUDA) run in this process, and so
does the ahead-of-time compilation for an H100 (sm_90a, no GPU needed), which checks what the
interpreter cannot: that Triton's GPU compiler accepts the kernel and ptxas keeps it in registers.

The ZO estimator's drawn route (``device.engine=fused``: directions generated on chip from a seed,
φ read as inner products, ĝ formed by ``fused.combine``) is checked in the same subprocess against
the standard estimator on ``engine=columns`` fed the same directions (``SameDirections``).
"""

from __future__ import annotations

import json
import math
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
import torch

from astraora.devices.mzi import ENGINES, MZIClassical, MZIMesh, classical_cell_entries, paper_cell_entries
from astraora.errors import ConfigError

triton = pytest.importorskip("triton", reason="the fused engine needs triton, which is not importable here")

REPO = Path(__file__).resolve().parent.parent
DEVICES = {"paper": MZIMesh, "classical": MZIClassical}
# (n, m, modes): odd, lopsided, square, the smallest, and a mesh wider than max(n, m)
MESHES = [(3, 5, None), (6, 2, None), (8, 8, None), (1, 1, None), (3, 3, 8)]
DRAWN_MESHES = MESHES[:2]  # the drawn mode costs more in the interpreter (Philox per phase): the rest is slow
SLOW_MESHES = [(13, 30, None), (32, 32, None)]
FLOAT32 = 2e-6  # max abs difference of two float32 computations of outputs of order 1 (N ≤ 8)


# ----------------------------------------------------------------------------- the cases (interpreter)
def _device(cell: str, n: int, m: int, modes: int | None, engine: str = "columns"):
    return DEVICES[cell](n, m, seed=7, name="fused.test", engine=engine, modes=modes)


def _settings(device, k: int, seed: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return device.theta.detach() + 0.5 * torch.randn(k, device.theta.numel(), generator=gen)


def _rows(shape: tuple[int, ...], seed: int) -> torch.Tensor:
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed))


def case_cells(cell: str) -> float:
    """The kernel's cell formula against the Python cell on phases over several turns."""
    from astraora.devices import fused

    theta, phi = (12 * _rows((2, 333), 1)).unbind(0)
    python = {"paper": paper_cell_entries, "classical": classical_cell_entries}[cell](theta, phi)
    kernel = fused.cell_entries(theta, phi, {"paper": fused.CELL_PAPER, "classical": fused.CELL_CLASSICAL}[cell])
    return float((kernel - python).abs().max())


def case_explicit(cell: str, n: int, m: int, modes: int | None, per_setting: bool, budget: int | None) -> dict:
    """Readings and inner products of K explicit settings against the column route, for inputs shared
    by the settings or one batch per setting; ``budget``: fused.STATE_BUDGET (a small one gives
    several row blocks per setting)."""
    from astraora.devices import fused

    device = _device(cell, n, m, modes)
    code = fused.CELL_PAPER if cell == "paper" else fused.CELL_CLASSICAL
    k, batch = 3, 5
    theta = _settings(device, k, 2)
    x = _rows((k, batch, n) if per_setting else (batch, n), 3)
    weights = _rows((batch, m), 4)
    saved = fused.STATE_BUDGET
    if budget is not None:
        fused.STATE_BUDGET = budget
    try:
        blocks = math.ceil(batch / fused.launch_shape(device.modes, batch)[1])
        readings = fused.transfer(code, theta, x, device.modes, m)
        products = fused.transfer(code, theta, x, device.modes, m, weights=weights)
    finally:
        fused.STATE_BUDGET = saved
    with torch.no_grad():
        reference = device._mesh(theta, x, n, m)  # engine=columns: the column route
    return {
        "readings": float((readings - reference).abs().max()),
        "products": float((products - (reference * weights).sum((1, 2))).abs().max()),
        "shape": list(readings.shape) == [k, batch, m] and list(products.shape) == [k],
        "blocks": blocks,
    }


def case_drawn(cell: str, n: int, m: int, modes: int | None) -> dict:
    """Directions generated on chip: the kernel at θ + step·u_d against the column route at the same
    settings rebuilt with fused.directions, both signs of the step; the stream per direction index."""
    from astraora.devices import fused

    device = _device(cell, n, m, modes)
    code = fused.CELL_PAPER if cell == "paper" else fused.CELL_CLASSICAL
    base, p = device.theta.detach(), device.theta.numel()
    indices = torch.tensor([5, 0, 11, 2])
    seed, batch = 2**40 + 17, 6
    x, weights = _rows((batch, n), 5), _rows((batch, m), 6)
    u = fused.directions(seed, indices, p)
    out = {"readings": 0.0, "products": 0.0}
    for step in (0.3, -0.3):
        readings = fused.transfer_drawn(code, base, x, device.modes, m, seed=seed, indices=indices, step=step)
        products = fused.transfer_drawn(
            code, base, x, device.modes, m, seed=seed, indices=indices, step=step, weights=weights
        )
        with torch.no_grad():
            reference = device._mesh(base + step * u, x, n, m)
        out["readings"] = max(out["readings"], float((readings - reference).abs().max()))
        out["products"] = max(out["products"], float((products - (reference * weights).sum((1, 2))).abs().max()))
    # direction d is the same numbers whichever indices it is drawn with (chunk-independent stream)
    out["stream"] = bool(
        torch.equal(fused.directions(seed, indices[2:], p), u[2:])
        and torch.equal(fused.directions(seed, torch.tensor([11]), p)[0], u[2])
    )
    out["distinct"] = bool(not torch.equal(u[0], u[1]) and not torch.equal(fused.directions(seed + 1, indices, p), u))
    return out


def case_directions_moments() -> dict:
    """Mean and variance of many on-chip normals (Philox + Box-Muller): N(0, 1)."""
    from astraora.devices import fused

    u = fused.directions(3, torch.arange(40), 1000)
    return {"mean": float(u.mean()), "var": float(u.var()), "shape": list(u.shape)}


def case_device(cell: str) -> dict:
    """``device.engine=fused`` through the device: forward query, K settings, the B > n basis route
    and a ZO estimate, against engine=columns; float64 is refused."""
    from astraora.ledger import QueryLedger
    from astraora.zo.estimator import ZOEstimator

    fused_dev, columns = _device(cell, 5, 3, None, "fused"), _device(cell, 5, 3, None)
    x, many = _rows((4, 5), 7), _rows((9, 5), 8)
    theta = _settings(columns, 3, 9)
    out = {
        "forward": float((fused_dev.query(x) - columns.query(x)).abs().max()),
        "settings": float((fused_dev.query(x, theta) - columns.query(x, theta)).abs().max()),
        "basis": float((fused_dev.query(many, theta) - columns.query(many, theta)).abs().max()),
    }
    g = _rows((4, 3), 10)
    y = columns.query(x)
    grads = [  # rademacher directions: the explicit settings route on both engines
        ZOEstimator(samples=8, direction="rademacher", generator=torch.Generator().manual_seed(0)).estimate(
            QueryLedger(d), x, g, y
        )
        for d in (fused_dev, columns)
    ]
    out["zo_relative"] = float((grads[0] - grads[1]).norm() / grads[1].norm())
    try:
        _device(cell, 5, 3, None, "fused").double().query(x.double())
        out["float64"] = "accepted"
    except ConfigError as err:
        out["float64"] = str(err)
    return out


def SameDirections(seed: int, **options):  # noqa: N802 (reads as the class it returns)
    """The standard estimator on the explicit route fed the drawn directions of ``seed``."""
    from astraora.devices import fused

    return fused.explicit_estimator(seed, **options)


def _relative(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm().clamp_min(1e-30))


def case_estimator(cell: str, n: int, m: int, modes: int | None, batch: int, options: dict, nonideal: dict) -> dict:
    """One ZO estimate on ``device.engine=fused`` (drawn directions when the device offers them)
    against the standard estimator on ``engine=columns`` with the same directions, the same
    non-idealities and the same options: the estimates, the ledgers' counters and the setting the
    hardware holds afterwards. The devices' generators (noise, drift) are seeded alike."""
    from astraora.ledger import QueryLedger
    from astraora.zo.estimator import ZOEstimator

    devices = [
        DEVICES[cell](n, m, seed=7, name="fused.zo", engine=engine, modes=modes, nonideal=nonideal)
        for engine in ("fused", "columns")
    ]
    for device in devices:
        for _ in range(2 if nonideal.get("drift_std") else 0):
            device.step_drift()
    ledgers = [QueryLedger(device) for device in devices]
    x, g = _rows((batch, n), 11), _rows((batch, m), 12)
    ys = [ledger.query(x, "forward") for ledger in ledgers]
    drawn = ZOEstimator(generator=torch.Generator().manual_seed(0), **options)
    ghat = drawn.estimate(ledgers[0], x, g, ys[0])
    seed = drawn.last_seed
    if seed is None:  # the explicit route: the same generator stream on both devices
        reference = ZOEstimator(generator=torch.Generator().manual_seed(0), **options)
    else:
        reference = SameDirections(seed, **options)
    expected = reference.estimate(ledgers[1], x, g, ys[1])
    states = [ledger.state_dict() for ledger in ledgers]
    out = {
        "drawn": seed is not None,
        "relative": _relative(ghat, expected),
        "counts": ledgers[0].counts() == ledgers[1].counts(),
        "zo_queries": ledgers[0].queries["zo"],
        "programmed": float((states[0]["programmed"] - states[1]["programmed"]).abs().max()),
        "moved": float((states[0]["programmed"] - devices[0].theta.detach()).abs().max()),
    }
    if seed is not None:  # the data-parallel route: coefficients reduced, then ĝ from the same seed
        calls = []

        def reducer(coefs: torch.Tensor) -> torch.Tensor:
            calls.append(tuple(coefs.shape))
            return 2 * coefs

        again = ZOEstimator(generator=torch.Generator().manual_seed(0), **options)
        again.reducer = reducer
        doubled = again.estimate(QueryLedger(devices[0]), x, g, ys[0])
        out["reducer"] = bool(torch.equal(doubled, 2 * ghat)) and calls == [(drawn.samples,)]
    return out


def case_deferred_retry(cell: str) -> dict:
    """The deferred check (as on a GPU, where the explicit route draws from a generator on the GPU and
    the seed comes from the CPU one): a device that returns non-finite readings makes the first
    pass's ĝ non-finite; the estimate is taken again from the same seed with checks per call, and
    equals the one of a device without faults."""
    from astraora.ledger import QueryLedger
    from astraora.zo.estimator import ZOEstimator

    x, g = _rows((4, 3), 13), _rows((4, 5), 14)
    out = {}
    for faults in (None, {"nonfinite_prob": 0.6}):
        device = DEVICES[cell](3, 5, seed=7, name="fused.retry", engine="fused", faults=faults)
        ledger = QueryLedger(device, max_retries=20)
        estimator = ZOEstimator(samples=6, chunk_size=1, generator=torch.Generator().manual_seed(3))
        estimator.defer_checks = lambda _device: True
        side = torch.Generator().manual_seed(5)  # as on a GPU: the explicit route's generator is another one
        estimator.generator_for = lambda _device, side=side: side
        out["faulty" if faults else "clean"] = (estimator.estimate(ledger, x, g), estimator.last_seed, ledger.retries)
    (clean, clean_seed, _), (faulty, faulty_seed, retries) = out["clean"], out["faulty"]
    return {
        "equal": bool(torch.equal(clean, faulty)) and clean_seed == faulty_seed is not None,
        "retries": retries,
    }


def case_drawn_refused() -> dict:
    """Which devices offer drawn queries (the estimator falls back to explicit settings where not)."""
    offers = {}
    for name, nonideal in {
        "ideal": {},
        "drift": {"drift_std": 0.1},
        "noise": {"output_noise": 0.01},
        "input_bits": {"input_bits": 6},
        "phase_bits": {"phase_bits": 8},
        "crosstalk": {"crosstalk": 0.1},
        "forward-only": {"output_noise": 0.01, "phase_bits": 8, "crosstalk": 0.1, "queries": "forward"},
    }.items():
        offers[name] = MZIMesh(3, 5, engine="fused", nonideal=nonideal).supports_drawn_queries("zo")
    offers["forward-only-readout"] = MZIMesh(
        3, 5, engine="fused", nonideal={"phase_bits": 8, "queries": "forward"}
    ).supports_drawn_queries("readout")
    offers["columns"] = MZIMesh(3, 5).supports_drawn_queries("zo")
    offers["float64"] = MZIMesh(3, 5, engine="fused").double().supports_drawn_queries("zo")
    return offers


ESTIMATES = {  # name: (cell, n, m, modes, batch, options, nonideal)
    **{
        f"estimate-{cell}-{n}x{m}-{'two' if two else 'one'}": (
            cell,
            n,
            m,
            modes,
            batch,
            {"samples": 7, "mu": 0.05, "two_sided": two, "chunk_size": 3},
            {},
        )
        for cell in DEVICES
        for n, m, modes, batch in [(3, 5, None, 4), (6, 2, None, 5)]  # the batch, the compressed batch
        for two in (False, True)
    },
    "estimate-paper-wide-sketched": ("paper", 3, 3, 8, 6, {"samples": 5, "mu": 0.05, "batch_rank": 2}, {}),
    "estimate-classical-requery": ("classical", 3, 5, None, 4, {"samples": 5, "mu": 0.05, "reuse_forward": False}, {}),
    "estimate-paper-small-mu": ("paper", 3, 5, None, 4, {"samples": 6}, {}),
    "estimate-paper-drift": ("paper", 3, 5, None, 4, {"samples": 5, "mu": 0.05}, {"drift_std": 0.1}),
    "estimate-paper-forward-only": (
        "paper",
        6,
        2,
        None,
        5,
        {"samples": 5, "mu": 0.05, "two_sided": True},
        {"output_noise": 0.05, "phase_bits": 6, "crosstalk": 0.1, "queries": "forward"},
    ),
    "estimate-paper-noise": ("paper", 3, 5, None, 4, {"samples": 5, "mu": 0.05}, {"output_noise": 0.01}),
    "estimate-classical-phase-bits": ("classical", 3, 5, None, 4, {"samples": 5, "mu": 0.05}, {"phase_bits": 8}),
    "estimate-paper-rademacher": ("paper", 3, 5, None, 4, {"samples": 5, "mu": 0.05, "direction": "rademacher"}, {}),
}
FALLS_BACK = {"noise", "phase-bits", "rademacher"}  # estimates that must take the explicit route


CASES = {
    **{f"cells-{cell}": (case_cells, (cell,)) for cell in DEVICES},
    **{
        f"explicit-{cell}-{n}x{m}-{modes}-{'per' if per else 'shared'}": (
            case_explicit,
            (cell, n, m, modes, per, None),
        )
        for cell in DEVICES
        for n, m, modes in MESHES
        for per in (False, True)
    },
    **{f"explicit-blocks-{cell}": (case_explicit, (cell, 3, 5, None, False, 8)) for cell in DEVICES},
    **{
        f"drawn-{cell}-{n}x{m}-{modes}": (case_drawn, (cell, n, m, modes))
        for cell in DEVICES
        for n, m, modes in DRAWN_MESHES
    },
    "directions-moments": (case_directions_moments, ()),
    **{f"device-{cell}": (case_device, (cell,)) for cell in DEVICES},
    **{name: (case_estimator, args) for name, args in ESTIMATES.items()},
    **{f"retry-{cell}": (case_deferred_retry, (cell,)) for cell in DEVICES},
    "offers-drawn": (case_drawn_refused, ()),
}
SLOW_CASES = {
    **{
        f"slow-explicit-{cell}-{n}x{m}": (case_explicit, (cell, n, m, modes, False, 64))
        for cell in DEVICES
        for n, m, modes in SLOW_MESHES
    },
    **{
        f"slow-drawn-{cell}-{n}x{m}-{modes}": (case_drawn, (cell, n, m, modes))
        for cell in DEVICES
        for n, m, modes in MESHES[2:] + SLOW_MESHES
    },
}


def _run_cases(names: list[str]) -> dict:
    cases = {**CASES, **SLOW_CASES}
    return {name: cases[name][0](*cases[name][1]) for name in names}


def _in_interpreter(names: list[str]) -> dict:
    """Run the named cases in a subprocess with TRITON_INTERPRET=1 set before triton is imported."""
    path = os.pathsep.join(p for p in (str(REPO), os.environ.get("PYTHONPATH", "")) if p)
    env = {**os.environ, "TRITON_INTERPRET": "1", "PYTHONPATH": path}
    done = subprocess.run(
        [sys.executable, __file__, *names], env=env, cwd=REPO, capture_output=True, text=True, timeout=600
    )
    assert done.returncode == 0, f"the interpreter run failed:\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}"
    return json.loads(done.stdout.strip().splitlines()[-1])


# The quick tier's cases (about 20 s in the interpreter): each kind at least once, both cells; the other
# cases of CASES run in the slow tier, in a subprocess of their own.
QUICK = {
    "cells-paper",
    "cells-classical",
    "explicit-paper-3x5-None-shared",
    "explicit-classical-6x2-None-per",
    "explicit-blocks-paper",
    "drawn-paper-3x5-None",
    "drawn-classical-6x2-None",
    "directions-moments",
    "device-paper",
    "device-classical",
    "estimate-paper-3x5-one",
    "estimate-classical-6x2-two",
    "estimate-paper-wide-sketched",
    "estimate-paper-noise",
    "retry-paper",
    "offers-drawn",
}


@pytest.fixture(scope="module")
def results() -> dict:
    return _in_interpreter(sorted(QUICK))


@pytest.fixture(scope="module")
def slow_results() -> dict:
    return _in_interpreter([name for name in CASES if name not in QUICK])


@pytest.fixture
def record(request) -> dict:
    """The interpreter's record of the case named by the test's ``name`` parameter, from the tier it runs in."""
    name = request.node.callspec.params["name"]
    return request.getfixturevalue("results" if name in QUICK else "slow_results")[name]


def tiered(names) -> list:
    """``names`` as parameters, those outside QUICK marked slow."""
    return [pytest.param(n, marks=() if n in QUICK else pytest.mark.slow) for n in names]


# ----------------------------------------------------------------------------- the tests
@pytest.mark.parametrize("name", tiered(f"cells-{cell}" for cell in DEVICES))
def test_cell_formula_matches_the_python_cell(record, name):
    assert record < 1e-6


@pytest.mark.parametrize("name", tiered(name for name in CASES if name.startswith("explicit-")))
def test_explicit_settings_match_the_column_route(record, name):
    assert record["shape"]
    assert record["readings"] < FLOAT32, record
    assert record["products"] < 10 * FLOAT32, record  # a sum of B·m products
    if "blocks" in name:
        assert record["blocks"] > 1  # several row blocks, their partial products summed


@pytest.mark.parametrize("name", tiered(name for name in CASES if name.startswith("drawn-")))
def test_directions_drawn_on_chip_match_their_reconstruction(record, name):
    assert record["readings"] < FLOAT32, record
    assert record["products"] < 10 * FLOAT32, record
    assert record["stream"] and record["distinct"]


def test_on_chip_directions_are_standard_normal(results):
    record = results["directions-moments"]
    assert record["shape"] == [40, 1000]
    assert abs(record["mean"]) < 0.02 and abs(record["var"] - 1) < 0.03  # 40 000 draws: ±4 standard errors


@pytest.mark.parametrize("name", tiered(f"device-{cell}" for cell in DEVICES))
def test_device_engine_fused_matches_the_column_route(record, name):
    assert max(record["forward"], record["settings"], record["basis"]) < FLOAT32, record
    assert record["zo_relative"] < 1e-2, record  # finite differences at μ = 1e-4 in float32
    assert "device.engine" in record["float64"] and "float32" in record["float64"]


@pytest.mark.parametrize("name", tiered(ESTIMATES))
def test_the_drawn_estimate_is_the_standard_formula_on_the_same_directions(record, name):
    """engine=fused: ĝ with directions drawn on chip equals the explicit route's ĝ (engine=columns) on
    the directions fused.directions rebuilds, to float32 round-off (μ = 0.05, so a φ difference of
    round-off size moves a coefficient by ≈ 1e-6 relative; at μ = 1e-4 by ≈ 1e-3), with the same
    queries and reprograms and the same setting held afterwards; where the device or the options
    do not allow drawn directions, the explicit route with the same generator stream."""
    falls_back = any(name.endswith(tail) for tail in FALLS_BACK)
    assert record["drawn"] is not falls_back, record
    assert record["counts"] and record["zo_queries"] > 0, record
    assert record["moved"] > 0 and record["programmed"] < 1e-6, record
    tolerance = 1e-2 if name.endswith("small-mu") or falls_back else 2e-5
    assert record["relative"] < tolerance, record
    if record["drawn"]:
        assert record["reducer"], record


@pytest.mark.parametrize("name", tiered(f"retry-{cell}" for cell in DEVICES))
def test_a_non_finite_reading_retakes_the_drawn_estimate_from_the_same_seed(record, name):
    assert record["equal"] and record["retries"] > 0, record


def test_drawn_queries_only_where_they_are_exactly_the_explicit_ones(results):
    assert results["offers-drawn"] == {
        "ideal": True,
        "drift": True,  # an offset of θ
        "noise": False,
        "input_bits": False,
        "phase_bits": False,
        "crosstalk": False,
        "forward-only": True,  # ZO queries see the forward's θ moved by the perturbation, no noise
        "forward-only-readout": False,  # a readout sees the quantized setting
        "columns": False,
        "float64": False,
    }


def test_the_ledger_refuses_drawn_queries_a_device_does_not_offer():
    from astraora.ledger import QueryLedger

    ledger = QueryLedger(MZIMesh(3, 5))
    assert not ledger.drawn_queries("zo")
    with pytest.raises(ConfigError, match="does not answer drawn zo queries"):
        ledger.query_drawn(torch.ones(2, 3), torch.ones(2, 5), 1, 0, 4, 0.1, "zo")
    assert ledger.total == 0 and ledger.total_reprograms == 0


@pytest.mark.slow
def test_larger_meshes_in_the_interpreter():
    """Meshes of 30 and 32 wires, several row blocks, both modes (minutes in the interpreter)."""
    records = _in_interpreter(list(SLOW_CASES))
    for name, record in records.items():
        assert record["readings"] < 2e-5 and record["products"] < 2e-4, (name, record)


def test_fused_is_an_engine_and_tiles_stays_the_default():
    assert ENGINES == ("tiles", "columns", "fused")
    text = (REPO / "conf/device/mzi.yaml").read_text()
    assert "engine: tiles " in text
    assert MZIMesh(4, 4).engine == "tiles"


def test_fused_is_refused_without_triton(monkeypatch):
    from astraora.devices import fused

    monkeypatch.setattr(fused, "triton", None)
    with pytest.raises(ConfigError, match=r"device\.engine='fused' needs triton.*choose one of \('tiles'"):
        MZIMesh(4, 4, engine="fused")


def test_fused_is_refused_without_cuda_or_interpreter(monkeypatch):
    """At construction where no CUDA device exists; at the first query where the mesh's tensors are
    on the CPU (a GPU host, trainer=cpu). One line each."""
    from astraora.devices import fused

    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    if fused.interpreting():
        pytest.skip("TRITON_INTERPRET is set for this process")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(ConfigError, match=r"device\.engine='fused' needs a CUDA device") as err:
        MZIMesh(4, 4, engine="fused")
    assert "\n" not in str(err.value) and "('tiles', 'columns', 'fused')" in str(err.value)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    device = MZIMesh(4, 4, engine="fused")
    with pytest.raises(ConfigError, match=r"device\.engine='fused' needs CUDA tensors, the mesh is on cpu"):
        device.query(torch.randn(2, 4))


# ----------------------------------------------------------------------------- compiled for a GPU, without one
def compile_for_h100(modes: int, batch: int, drawn: bool, products: bool, cell: int = 0) -> str:
    """Compile the mesh kernel ahead of time for sm_90a (an H100) as the launch for ``modes`` wires and
    ``batch`` rows would, and return ptxas's report (registers, spills). Needs no GPU."""
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from astraora.devices import fused

    slots, rows, warps = fused.launch_shape(modes, batch)
    strides = ("stride_xk", "stride_xb", "stride_tk", "stride_wb", "stride_ok", "stride_ob")
    ints = (*strides, "batch", "n", "m", "modes", "p")
    signature = {name: "i32" for name in ints} | {"seed": "i64", "step": "fp32"}
    signature |= {name: "*fp32" for name in ("x_ptr", "theta_ptr", "w_ptr", "out_ptr")}
    signature["dir_ptr"] = "*i64" if drawn else "*fp32"
    constants = {"NH": slots, "BLOCK_B": rows, "CELL": cell, "DRAWN": drawn, "PRODUCTS": products}
    names = fused._mesh_kernel.arg_names
    source = ASTSource(
        fused._mesh_kernel,
        {name: signature.get(name, "constexpr") for name in names},
        constexprs=constants,
    )
    kernel = triton.compile(source, target=GPUTarget("cuda", 90, 32), options={"num_warps": warps})
    ptxas = triton.knobs.nvidia.ptxas.path
    with tempfile.TemporaryDirectory() as tmp:
        ptx = Path(tmp) / "mesh.ptx"
        ptx.write_text(kernel.asm["ptx"])
        done = subprocess.run(
            [ptxas, "-v", "--gpu-name=sm_90a", str(ptx), "-o", str(ptx.with_suffix(".cubin"))],
            capture_output=True,
            text=True,
        )
    assert done.returncode == 0, done.stderr
    return done.stderr + done.stdout


def compile_combine_for_h100() -> str:
    """fused._combine_kernel (ĝ = Σ c_i u_i from the seed) compiled ahead of time for sm_90a: ptxas's report."""
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from astraora.devices import fused

    signature = {"c_ptr": "*fp32", "out_ptr": "*fp32", "seed": "i64", "first": "i32", "count": "i32", "p": "i32"}
    names = fused._combine_kernel.arg_names
    source = ASTSource(
        fused._combine_kernel, {name: signature.get(name, "constexpr") for name in names}, constexprs={"BLOCK": 1024}
    )
    kernel = triton.compile(source, target=GPUTarget("cuda", 90, 32), options={"num_warps": 4})
    with tempfile.TemporaryDirectory() as tmp:
        ptx = Path(tmp) / "combine.ptx"
        ptx.write_text(kernel.asm["ptx"])
        done = subprocess.run(
            [triton.knobs.nvidia.ptxas.path, "-v", "--gpu-name=sm_90a", str(ptx), "-o", str(ptx.with_suffix(".cubin"))],
            capture_output=True,
            text=True,
        )
    assert done.returncode == 0, done.stderr
    return done.stderr + done.stdout


def _spills(report: str) -> int:
    return sum(int(n) for n in re.findall(r"(\d+) bytes spill stores", report))


def _compiles_here() -> bool:
    from astraora.devices import fused

    try:
        return not fused.interpreting() and Path(triton.knobs.nvidia.ptxas.path).is_file()
    except Exception:  # no CUDA backend in this triton build
        return False


@pytest.mark.parametrize(("drawn", "products"), [(False, False), (True, True)])
def test_the_kernel_compiles_for_an_h100_without_spills(drawn, products):
    """Triton's GPU compiler (which the interpreter does not exercise) accepts the kernel, and ptxas
    keeps its state in registers, at a small mesh."""
    if not _compiles_here():
        pytest.skip("no ptxas in this triton build, or TRITON_INTERPRET is set")
    report = compile_for_h100(8, 5, drawn, products, cell=1)
    assert "registers" in report and _spills(report) == 0, report


def test_the_combine_kernel_compiles_for_an_h100_without_spills():
    if not _compiles_here():
        pytest.skip("no ptxas in this triton build, or TRITON_INTERPRET is set")
    report = compile_combine_for_h100()
    assert "registers" in report and _spills(report) == 0, report


@pytest.mark.slow
@pytest.mark.parametrize("modes", [64, 256, 1024])
def test_the_kernel_compiles_for_an_h100_without_spills_at_the_check_sizes(modes):
    if not _compiles_here():
        pytest.skip("no ptxas in this triton build, or TRITON_INTERPRET is set")
    for drawn in (False, True):
        report = compile_for_h100(modes, 256, drawn, drawn)
        assert _spills(report) == 0, report


def test_launch_shape_keeps_the_state_within_its_budget():
    from astraora.devices import fused

    for modes, batch in [(2, 1), (6, 5), (64, 256), (256, 256), (1024, 256), (8192, 3)]:
        slots, rows, warps = fused.launch_shape(modes, batch)
        assert slots >= modes // 2 and slots & (slots - 1) == 0 and rows & (rows - 1) == 0
        assert rows == 1 or slots * rows <= fused.STATE_BUDGET
        assert rows <= max(1, 2 * batch) and warps in (4, 8)


if __name__ == "__main__":
    if sys.argv[1:2] == ["--ptxas"]:  # python tests/test_fused.py --ptxas 64,256,1024: registers and spills on an H100
        for modes in map(int, sys.argv[2].split(",")):
            for drawn in (False, True):
                lines = [line.strip() for line in compile_for_h100(modes, 256, drawn, drawn).splitlines()]
                print(modes, "drawn+products" if drawn else "explicit readings", *[x for x in lines if "Used" in x])
    else:  # the interpreter run: TRITON_INTERPRET=1 python tests/test_fused.py [case ...]
        torch.set_num_threads(1)
        print(json.dumps(_run_cases(sys.argv[1:] or list(CASES))))
