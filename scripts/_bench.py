"""Timing code behind scripts/benchmark_core.py and scripts/time_epoch.py (a scripts-local module).

Timing primitives (wall clock with GPU synchronisation; interleaved A/B repeats keeping the fastest
of each, so that a shared, noisy machine slows both sides alike), the core-cost measurements of
benchmark_core.py (ZO estimate, surrogate update, queries per training step; the MZI tile engine
against the column reference; a hybrid training step against its digital twin), and the epoch
estimate of time_epoch.py (the task's real DataModule fed synthetic data, a few real steps timed).
"""

from __future__ import annotations

import argparse
import logging
import math
import os
import statistics
import sys
import time
import warnings
from collections.abc import Callable
from dataclasses import asdict, dataclass, field

import lightning as L
import torch
from omegaconf import DictConfig
from torch.utils.data import Dataset, TensorDataset

from astraora.build import hybrid_layers, instantiate
from astraora.devices import BUILT_IN, Device, MZIClassical, MZIMesh
from astraora.devices.base import dense_transfer
from astraora.hybrid import HybridLayer
from astraora.ledger import PURPOSES, QueryLedger
from astraora.rng import make_generator
from astraora.surrogate import LowRankSurrogate, PsiImplicitIntegrator
from astraora.zo import ZOEstimator

FAMILIES = BUILT_IN
MESHES = {"mzi": MZIMesh, "mzi_classical": MZIClassical}
THETA_STEP = 1e-3  # std of the random θ change before each timed psi_implicit update
#: training examples per epoch when --train-size is not given (language models: samples_per_epoch)
DEFAULT_TRAIN_SIZE = {"cifar10": 45000, "mnist": 54000, "speechcommands": 84843}
#: class counts the DataModule would find on disk
NUM_CLASSES = {"speechcommands": 35, "urbansound8k": 10}
#: character-level vocabulary sizes the DataModule would find on disk
CHAR_VOCAB = {"tinyshakespeare": 65}


# ---------------------------------------------------------------------------- timing primitives
def synchronize(device: str | torch.device) -> None:
    """Wait for queued GPU work so that wall-clock timings are honest."""
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def interleaved(
    calls: dict[str, Callable[[], object]],
    repeats: int,
    device: str | torch.device = "cpu",
    setup: Callable[[], object] | None = None,
) -> dict[str, float]:
    """Fastest of ``repeats`` runs of each call, the calls taking turns (after one warm-up each)."""
    best = {name: float("inf") for name in calls}
    for rep in range(repeats + 1):
        for name, call in calls.items():
            if setup is not None:
                setup()
            synchronize(device)
            start = time.perf_counter()
            call()
            synchronize(device)
            if rep:  # the first round warms up caches, buffers and plans
                best[name] = min(best[name], time.perf_counter() - start)
    return best


def timed_call(fn: Callable[[], object], device: str) -> float:
    """Seconds taken by one call of ``fn``."""
    synchronize(device)
    start = time.perf_counter()
    fn()
    synchronize(device)
    return time.perf_counter() - start


# ---------------------------------------------------------------------------- core costs (benchmark_core.py)
@dataclass
class Settings:
    """Everything a run depends on (printed and written to the JSON)."""

    devices: list[str]
    n: int
    m: int
    batch: int
    samples: int  # M
    sketch: int  # M_sm
    rank: int  # r
    chunk: int
    repeats: int
    budget: float
    requery_phi: bool
    real_steps: bool
    device: str
    seed: int
    threads: int  # torch intra-op threads (0: torch's default)
    engines: bool = False  # also compare the MZI tile engine with the column reference
    engine_samples: int = 4  # ZO samples timed per engine
    step_ratio: bool = False  # also time the default run's hybrid vs digital step
    steps: int = 10  # timed steps per round for step_ratio

    @property
    def q(self) -> int:
        """Rows per perturbed setting: min(B, m)."""
        return min(self.batch, self.m)


def repeat_runs(
    fn: Callable[[], object],
    settings: Settings,
    first: list[float] | None = None,
    setup: Callable[[], object] | None = None,
) -> list[float]:
    """Timed runs of ``fn`` (``setup`` untimed before each), starting from the runs in ``first``:
    up to ``settings.repeats`` of them, fewer once they have used ``settings.budget`` seconds."""
    times = list(first or [])
    while len(times) < settings.repeats and (not times or sum(times) < settings.budget):
        if setup is not None:
            setup()
        times.append(timed_call(fn, settings.device))
    return times


@dataclass
class Timing:
    """A median time, scaled to the full workload when only ``timed`` of ``total`` units ran."""

    seconds: float
    runs: int
    timed: int = 1
    total: int = 1

    @property
    def extrapolated(self) -> bool:
        return self.timed < self.total

    @classmethod
    def of(cls, times: list[float], timed: int = 1, total: int = 1) -> Timing:
        return cls(statistics.median(times) * total / timed, len(times), timed, total)


def time_fixed(fn: Callable[[], object], settings: Settings, setup: Callable[[], object] | None = None) -> Timing:
    """Warm-up call, then :func:`repeat_runs`; for work that cannot be subset (updates, readouts)."""
    if setup is not None:
        setup()
    fn()
    synchronize(settings.device)
    return Timing.of(repeat_runs(fn, settings, setup=setup))


# ---------------------------------------------------------------------------- the device
def make_device(family: str, settings: Settings) -> Device:
    """A device of ``family`` with its default (ideal) physics, on ``settings.device``."""
    device = FAMILIES[family](settings.n, settings.m, seed=settings.seed, name=f"bench.{family}")
    return device.to(settings.device)


def use_stand_in_transfer(device: Device) -> None:
    """Replace the device's physics by a cheap dense map x (a₀·(1 + mean(θ − θ₀)))ᵀ, keeping its θ
    shape, so that a training step runs the same ledger/estimator/integrator code at a fraction
    of the cost. Only for counting queries, which depend on shapes alone."""
    gen = make_generator(device.seed, device.name, "stand-in")
    a0 = (torch.randn(device.d_out, device.d_in, generator=gen) / math.sqrt(device.d_in)).to(device.theta)
    theta0 = device.theta.detach().reshape(-1).clone()

    def transfer(theta: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        shift = (theta.reshape(theta.shape[0], -1) - theta0).mean(1)
        return dense_transfer(a0 * (1 + shift)[:, None, None], x)

    device.transfer = transfer  # instance attribute shadows the method


# ---------------------------------------------------------------------------- 1. ZO estimate
def time_zo(
    ledger: QueryLedger, x: torch.Tensor, g: torch.Tensor, y: torch.Tensor, settings: Settings, per_sample: bool
) -> Timing:
    """One ZO estimate with M samples: vectorised (``chunk_size=--chunk``) or per-sample
    (``chunk_size=1``).

    A first run on one unit (one chunk, or one sample) gives the cost per sample. If M samples ×
    repeats fit the budget they are all timed (the unit run was the warm-up); otherwise the
    largest whole number of units that fits (at least one) is timed and scaled to M, and if that
    is the unit itself its first run already counts. Within 2x of the budget all M are timed.
    """
    chunk = 1 if per_sample else settings.chunk
    unit = min(chunk, settings.samples)

    def run(samples: int) -> Callable[[], object]:
        estimator = ZOEstimator(
            samples=samples,
            chunk_size=chunk,
            reuse_forward=not settings.requery_phi,
            generator=make_generator(settings.seed, ledger.device.name, "zo"),
        )
        return lambda: estimator.estimate(ledger, x, g, y)

    first = timed_call(run(unit), settings.device)
    fits = int(settings.budget / (settings.repeats * max(first, 1e-9) / unit))
    # Within 2x of the budget, time all M samples rather than extrapolate from nearly all of them.
    samples = settings.samples if 2 * fits >= settings.samples else max(unit, fits // unit * unit)
    times = repeat_runs(run(samples), settings, first=[first] if samples == unit else None)
    return Timing.of(times, samples, settings.samples)


# ---------------------------------------------------------------------------- 2. surrogate
def time_surrogate(ledger: QueryLedger, settings: Settings) -> tuple[Timing, Timing]:
    """(one psi_implicit update after a small θ change, one full readout + truncated SVD)."""
    device = ledger.device
    surrogate = LowRankSurrogate(device.d_in, device.d_out, settings.rank, tuple(device.theta.shape)).to(
        settings.device
    )
    surrogate.readout(ledger)
    integrator = PsiImplicitIntegrator(settings.sketch, generator=make_generator(settings.seed, device.name, "sketch"))
    gen = make_generator(settings.seed, device.name, "theta-step")

    @torch.no_grad()
    def move_theta() -> None:
        step = torch.randn(device.theta.shape, generator=gen, dtype=device.theta.dtype)
        device.theta.add_(THETA_STEP * step.to(device.theta.device))

    psi = time_fixed(lambda: integrator.update(surrogate, ledger), settings, setup=move_theta)
    readout = time_fixed(lambda: surrogate.readout(ledger), settings)
    return psi, readout


# ---------------------------------------------------------------------------- 3. queries per step
def expected_queries(settings: Settings) -> dict[str, int]:
    """ALGORITHM.md §5 for one one-sided step after the initial readout, by ledger purpose."""
    q = settings.q
    return {
        "forward": settings.batch,
        "zo": settings.samples * q + (q if settings.requery_phi else 0),
        "surrogate": 2 * settings.rank + 2 * settings.sketch,
        "readout": 0,
    }


@dataclass
class StepCount:
    """Ledger counts of the second training step of a real HybridLayer."""

    measured: dict[str, int]
    expected: dict[str, int]
    reprograms: int
    seconds: float
    stand_in: bool
    match: bool = field(init=False)

    def __post_init__(self) -> None:
        self.match = self.measured == self.expected

    @property
    def total(self) -> int:
        return sum(self.measured.values())

    @property
    def expected_total(self) -> int:
        return sum(self.expected.values())


def count_step_queries(family: str, settings: Settings, stand_in: bool) -> StepCount:
    """Two training steps (forward, backward with ZO, Adam step, after_optimizer_step) of a fresh
    HybridLayer in ``zo+sm`` mode; the ledger's increments over the second one."""
    device = make_device(family, settings)
    if stand_in:
        use_stand_in_transfer(device)
    zo = ZOEstimator(
        samples=settings.samples,
        chunk_size=settings.chunk,
        reuse_forward=not settings.requery_phi,
        generator=make_generator(settings.seed, device.name, "zo"),
    )
    layer = HybridLayer(
        device,
        mode="zo+sm",
        rank=settings.rank,
        zo=zo,
        integrator={"name": "psi_implicit", "samples": settings.sketch},
        seed=settings.seed,
        name=device.name,
    ).to(settings.device)
    optimizer = torch.optim.Adam(layer.parameters(), lr=1e-2)
    gen = make_generator(settings.seed, device.name, "step-data")
    x = torch.randn(settings.batch, settings.n, generator=gen).to(settings.device).requires_grad_(True)
    target = torch.randn(settings.batch, settings.m, generator=gen).to(settings.device)

    def step() -> None:
        optimizer.zero_grad()
        loss = torch.nn.functional.mse_loss(layer(x), target)
        loss.backward()
        optimizer.step()
        layer.after_optimizer_step()

    step()
    before, reprograms_before = dict(layer.ledger.queries), layer.ledger.total_reprograms
    seconds = timed_call(step, settings.device)
    measured = {p: layer.ledger.queries[p] - before[p] for p in before}
    return StepCount(
        measured, expected_queries(settings), layer.ledger.total_reprograms - reprograms_before, seconds, stand_in
    )


# ---------------------------------------------------------------------------- one device
@dataclass
class DeviceResult:
    family: str
    params: int
    zo_vectorised: Timing
    zo_loop: Timing
    psi_update: Timing
    readout_svd: Timing
    step: StepCount

    @property
    def zo_ratio(self) -> float:
        return self.zo_loop.seconds / self.zo_vectorised.seconds

    @property
    def surrogate_ratio(self) -> float:
        return self.readout_svd.seconds / self.psi_update.seconds


def benchmark_device(family: str, settings: Settings) -> DeviceResult:
    """All three measurements for one device family."""
    device = make_device(family, settings)
    ledger = QueryLedger(device)
    gen = make_generator(settings.seed, device.name, "zo-data")
    x = torch.randn(settings.batch, settings.n, generator=gen).to(settings.device)
    g = torch.randn(settings.batch, settings.m, generator=gen).to(settings.device)
    y = ledger.query(x, "forward")  # also warms the device's transfer up
    zo_loop = time_zo(ledger, x, g, y, settings, per_sample=True)
    zo_vec = time_zo(ledger, x, g, y, settings, per_sample=False)
    psi, readout = time_surrogate(ledger, settings)
    # A step costs about M vectorised samples plus one surrogate update; two steps are needed.
    step_estimate = 2 * (zo_vec.seconds + psi.seconds)
    stand_in = not settings.real_steps and step_estimate > settings.budget
    step = count_step_queries(family, settings, stand_in)
    return DeviceResult(family, device.num_params, zo_vec, zo_loop, psi, readout, step)


# ---------------------------------------------------------------------------- core costs: the report
def fmt_time(timing: Timing) -> str:
    return f"{timing.seconds:.4g}" + ("*" if timing.extrapolated else "")


def markdown_table(results: list[DeviceResult]) -> str:
    """One row per device, columns padded for reading in a terminal."""
    header = [
        "device",
        "p (θ entries)",
        "ZO vec [s]",
        "ZO loop [s]",
        "loop/vec",
        "ψ update [s]",
        "readout+SVD [s]",
        "readout/ψ",
        "queries/step",
        "formula §5",
        "match",
        "reprograms",
        "step [s]",
    ]
    rows = []
    for r in results:
        rows.append(
            [
                r.family,
                f"{r.params:,}",
                fmt_time(r.zo_vectorised),
                fmt_time(r.zo_loop),
                f"{r.zo_ratio:.2f}x",
                fmt_time(r.psi_update),
                fmt_time(r.readout_svd),
                f"{r.surrogate_ratio:.2f}x",
                f"{r.step.total:,}" + ("†" if r.step.stand_in else ""),
                f"{r.step.expected_total:,}",
                "yes" if r.step.match else "NO",
                str(r.step.reprograms),
                "n/a†" if r.step.stand_in else f"{r.step.seconds:.4g}",
            ]
        )
    widths = [max(len(row[i]) for row in [header, *rows]) for i in range(len(header))]
    line = lambda cells: "| " + " | ".join(c.ljust(w) for c, w in zip(cells, widths, strict=True)) + " |"  # noqa: E731
    return "\n".join([line(header), "|" + "|".join("-" * (w + 2) for w in widths) + "|", *map(line, rows)])


def footnotes(results: list[DeviceResult], settings: Settings) -> list[str]:
    """Which numbers were extrapolated, timed on fewer runs than asked, or counted on a stand-in."""
    notes = []
    for r in results:
        for label, t in (
            ("ZO vec", r.zo_vectorised),
            ("ZO loop", r.zo_loop),
            ("ψ update", r.psi_update),
            ("readout+SVD", r.readout_svd),
        ):
            if t.extrapolated:
                notes.append(
                    f"* {r.family}: {label} EXTRAPOLATED: timed on {t.timed} of {t.total} samples "
                    f"and scaled ×{t.total / t.timed:.3g} ({t.runs} run(s))."
                )
            elif t.runs < settings.repeats:
                notes.append(f"  {r.family}: {label}: median of {t.runs} run(s) only (budget {settings.budget:g} s).")
        if r.step.stand_in:
            notes.append(
                f"† {r.family}: queries counted with a STAND-IN transfer (same θ shape and layer/ledger code; "
                f"the real step would take ≈{r.zo_vectorised.seconds + r.psi_update.seconds:.3g} s; "
                "use --real-steps to insist)."
            )
        if not r.step.match:
            notes.append(f"! {r.family}: per-purpose counts {r.step.measured} differ from §5 {r.step.expected}.")
    return notes


def environment() -> dict:
    """Torch version, threads and hardware, as printed in the header."""
    env = {
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "interop_threads": torch.get_num_interop_threads(),
        "cpu_count": os.cpu_count(),
        "python": sys.version.split()[0],
    }
    if hasattr(os, "getloadavg"):
        env["loadavg_1min"] = round(os.getloadavg()[0], 2)
    if torch.cuda.is_available():
        env["cuda_device"] = torch.cuda.get_device_name(0)
    return env


def header(settings: Settings, env: dict) -> str:
    s = settings
    extra = " + min(B,m)" if s.requery_phi else ""
    return "\n".join(
        [
            "# astraora core benchmark",
            "",
            f"settings: n={s.n}, m={s.m}, B={s.batch}, M={s.samples}, M_sm={s.sketch}, r={s.rank}, chunk={s.chunk}, "
            f"repeats={s.repeats}, budget={s.budget:g} s, requery_phi={s.requery_phi}, device={s.device}, "
            f"seed={s.seed}",
            "environment: " + ", ".join(f"{k}={v}" for k, v in env.items()),
            *(
                ["warning: load average above the CPU count, timings are noisy"]
                if env.get("loadavg_1min", 0) > (env["cpu_count"] or 1)
                else []
            ),
            f"formula (§5, per step after the initial readout): B + M·min(B,m){extra} + 2r + 2·M_sm",
            "times: median seconds per call; ZO = one estimate with M samples; ψ = one psi_implicit update",
            "",
        ]
    )


def to_json(results: list[DeviceResult], settings: Settings, env: dict, runtime: float) -> dict:
    devices = {}
    for r in results:
        entry = {
            k: asdict(v) | {"extrapolated": v.extrapolated}
            for k, v in (
                ("zo_vectorised", r.zo_vectorised),
                ("zo_loop", r.zo_loop),
                ("psi_update", r.psi_update),
                ("readout_svd", r.readout_svd),
            )
        }
        entry.update(
            params=r.params,
            zo_loop_over_vectorised=r.zo_ratio,
            readout_over_psi=r.surrogate_ratio,
            step=asdict(r.step) | {"total": r.step.total, "expected_total": r.step.expected_total},
        )
        devices[r.family] = entry
    return {"settings": asdict(settings), "environment": env, "runtime_s": runtime, "devices": devices}


def engine_table(comparisons: list[EngineComparison], settings: Settings) -> str:
    lines = [
        f"MZI engines at n={settings.n}, m={settings.m}, B={settings.batch}, M={settings.samples} "
        f"(ZO timed on {settings.engine_samples} samples and scaled), r={settings.rank}, M_sm={settings.sketch}; "
        "seconds, fastest of interleaved repeats",
        "",
        "| device | ZO tiles s | ZO columns s | ZO speed-up | ψ tiles s | ψ columns s | ψ speed-up "
        "| readout tiles s | readout columns s | readout speed-up | max rel. diff |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for c in comparisons:
        lines.append(
            f"| {c.family} | {c.zo_tiles:.3g} | {c.zo_columns:.3g} | {c.zo_speedup:.1f}x | {c.psi_tiles:.3g} | "
            f"{c.psi_columns:.3g} | {c.psi_speedup:.1f}x | {c.readout_tiles:.3g} | {c.readout_columns:.3g} | "
            f"{c.readout_speedup:.1f}x | {c.max_rel_diff:.1e} |"
        )
    return "\n".join(lines)


# ---------------------------------------------------------------------------- side by side (benchmark_core.py)
@dataclass
class EngineComparison:
    """Seconds per operation for the tile engine and the column reference, and how far apart their
    outputs are (max relative difference of one batched query)."""

    family: str
    zo_tiles: float  # one ZO estimate of M samples (timed on ``zo_timed`` samples, scaled to M)
    zo_columns: float
    zo_timed: int
    psi_tiles: float  # one psi_implicit update
    psi_columns: float
    readout_tiles: float  # one full readout + truncated SVD
    readout_columns: float
    max_rel_diff: float

    @property
    def zo_speedup(self) -> float:
        return self.zo_columns / self.zo_tiles

    @property
    def psi_speedup(self) -> float:
        return self.psi_columns / self.psi_tiles

    @property
    def readout_speedup(self) -> float:
        return self.readout_columns / self.readout_tiles


def compare_engines(
    family: str,
    n: int = 512,
    m: int = 1024,
    batch: int = 256,
    samples: int = 100,
    timed: int = 4,
    rank: int = 10,
    sketch: int = 100,
    repeats: int = 2,
    seed: int = 0,
    device: str = "cpu",
) -> EngineComparison:
    """Time one ZO estimate (on ``timed`` of the M samples, scaled to M), one psi_implicit update
    and one readout with ``engine=tiles`` and ``engine=columns`` on the same θ, inputs and draws
    (subnormal floats flushed to zero, as training runs do)."""
    torch.set_flush_denormal(True)
    meshes = {
        engine: MESHES[family](n, m, seed=seed, name=f"bench.{family}", engine=engine).to(device)
        for engine in ("tiles", "columns")
    }
    ledgers = {engine: QueryLedger(mesh) for engine, mesh in meshes.items()}
    gen = make_generator(seed, "bench", "data")
    x = torch.randn(batch, n, generator=gen).to(device)
    g = torch.randn(batch, m, generator=gen).to(device)
    with torch.no_grad():
        thetas = meshes["tiles"].theta.detach() + 0.01 * torch.randn(3, *meshes["tiles"].theta.shape, generator=gen).to(
            device
        )
        outputs = {engine: mesh.query(x, thetas) for engine, mesh in meshes.items()}
    diff = float(((outputs["tiles"] - outputs["columns"]).norm(dim=(1, 2)) / outputs["columns"].norm(dim=(1, 2))).max())
    y = {engine: ledgers[engine].query(x, "forward") for engine in meshes}

    def zo_call(engine: str) -> Callable[[], object]:
        def call() -> None:
            est = ZOEstimator(samples=timed, generator=make_generator(seed, "bench", "zo"))
            est.estimate(ledgers[engine], x, g, y[engine])

        return call

    zo = interleaved({e: zo_call(e) for e in meshes}, repeats, device)

    surrogates = {e: LowRankSurrogate(n, m, rank, tuple(meshes[e].theta.shape)).to(device) for e in meshes}
    for e in meshes:
        surrogates[e].readout(ledgers[e])
    integrators = {e: PsiImplicitIntegrator(sketch, generator=make_generator(seed, "bench", "sketch")) for e in meshes}
    step_gen = make_generator(seed, "bench", "theta-step")

    @torch.no_grad()
    def move_theta() -> None:
        step = 1e-3 * torch.randn(meshes["tiles"].theta.shape, generator=step_gen).to(device)
        for mesh in meshes.values():
            mesh.theta.add_(step)

    psi = interleaved(
        {e: (lambda e=e: integrators[e].update(surrogates[e], ledgers[e])) for e in meshes},
        repeats,
        device,
        setup=move_theta,
    )
    readout = interleaved({e: (lambda e=e: surrogates[e].readout(ledgers[e])) for e in meshes}, repeats, device)
    scale = samples / timed
    return EngineComparison(
        family,
        zo["tiles"] * scale,
        zo["columns"] * scale,
        timed,
        psi["tiles"],
        psi["columns"],
        readout["tiles"],
        readout["columns"],
        diff,
    )


@dataclass
class StepComparison:
    """Per-step wall times of a hybrid training step and of its digital twin (seconds)."""

    hybrid_median: float
    digital_median: float
    hybrid_min: float
    digital_min: float
    steps: int

    @property
    def ratio(self) -> float:
        return self.hybrid_median / self.digital_median


def compare_steps(overrides: list[str] = (), steps: int = 10, rounds: int = 3) -> StepComparison:
    """Training steps of ``python train.py <overrides>`` against the same with ``device=digital``:
    both modules built as :func:`astraora.train.run` builds them, trained in turns for ``steps``
    batches per round (``rounds`` rounds, the first batch of each round left out), timed from
    batch start to batch end (forward, backward, ZO, optimizer steps, surrogate update, logging),
    with the run's ``cpu_threads``."""
    from hydra import compose, initialize_config_dir

    from astraora.paths import CONFIG_DIR
    from astraora.train import build_module

    class BatchTimer(L.Callback):
        def __init__(self) -> None:
            self.times: list[float] = []

        def on_train_batch_start(self, *args) -> None:
            self._start = time.perf_counter()

        def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx) -> None:
            if batch_idx:  # the first batch of a round pays for the loader and trainer set-up
                self.times.append(time.perf_counter() - self._start)

    torch.set_flush_denormal(True)  # as run() does
    threads = torch.get_num_threads()
    runs = {}
    for name, extra in (("hybrid", []), ("digital", ["device=digital"])):
        with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
            cfg = compose("config", overrides=[*overrides, *extra])
        torch.manual_seed(int(cfg.seed))
        dm = instantiate(cfg.task.datamodule)
        dm.setup("fit")
        runs[name] = (dm, build_module(cfg, dm), BatchTimer())
    for name in ("lightning", "lightning.pytorch", "lightning.fabric"):
        logging.getLogger(name).setLevel(logging.ERROR)
    if cfg.get("cpu_threads") and cfg.trainer.accelerator == "cpu":
        torch.set_num_threads(int(cfg.cpu_threads))  # the run's threads, as run() sets them
    for _ in range(rounds):
        for dm, module, timer in runs.values():
            trainer = L.Trainer(
                max_epochs=1,
                limit_train_batches=steps + 1,
                limit_val_batches=0,
                logger=False,
                enable_checkpointing=False,
                enable_progress_bar=False,
                enable_model_summary=False,
                callbacks=[timer],
                accelerator="cpu",
                devices=1,
            )
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                trainer.fit(module, dm)
    torch.set_num_threads(threads)
    hybrid, digital = runs["hybrid"][2].times, runs["digital"][2].times
    return StepComparison(statistics.median(hybrid), statistics.median(digital), min(hybrid), min(digital), len(hybrid))


# ---------------------------------------------------------------------------- epoch estimate (time_epoch.py)
# The configuration is composed exactly as `python train.py` composes it (same `conf/`, same
# overrides), and the run is built as :func:`astraora.train.run` builds it:
#
# * the task's own DataModule is instantiated from the config, but its data are synthetic: random
#   tensors of the real shapes and dtypes are put where the files would be read (`build_splits`
#   for classification, `load` for language models), so its real `train_dataloader` (batch size,
#   sampler, `drop_last`, worker count) and the real per-item transforms run:
#
#   - CIFAR-10 / MNIST: random uint8 images through the real transforms (CIFAR-10: random crop with
#     4 px padding + flip, then ToDtype + Normalize), i.e. `(B, C, H, W)` float32 standardised;
#   - audio tasks: random 1 s waveforms through the DataModule's real `Frontend` (mel spectrogram,
#     dB, per-clip standardisation, SpecAugment) into `(B, n_mels, frames)` log-mels, so the
#     feature-extraction cost is measured (audio file decoding is not);
#   - language models: a random token stream cut into the real random windows `(B, T)` int64;
#
# * the model is `astraora.build.build_model(cfg, dm.model_kwargs())` (`--model-kwargs` adds to or
#   replaces those kwargs), wrapped in the task's LightningModule with run()'s optimizer specs;
# * a `lightning.Trainer` (CPU, no logger, no checkpoints, no validation) runs
#   `warmup + steps` batches of the module's own `training_step`; a callback records each
#   batch's wall time (`on_train_batch_start` → `on_train_batch_end`), the time spent in the
#   oracle diagnostics (which `training_step` runs every `callbacks.diagnostics.every_n_steps`
#   steps, step 0 included) and in one-time surrogate readouts (the first hybrid forward), and the
#   ledger's query counters.
#
# The estimate: `steps/epoch × (median step + data per batch, when the loader has no workers and so
# runs serially) + diagnostic steps per epoch × diagnostics time`. The median is taken over the
# timed steps after the warm-up, each with its diagnostics and readout time taken out (both are
# reported separately). `steps/epoch` is `train_size // batch_size` for classification (the real
# loader drops the last partial batch) and `ceil(train_size / batch_size)` for language models.
# Default train sizes: cifar10 45000 (50000 minus the 10 % validation split), mnist 54000,
# speechcommands 84843 (the official v2 training list), language models `samples_per_epoch`.
# Validation, test, checkpointing and logging are not timed.


class TimedDataset(Dataset):
    """Wraps a dataset and records how long each ``__getitem__`` takes (the per-item transforms).

    Only visible in this process, i.e. when the loader has no worker processes."""

    def __init__(self, dataset: Dataset):
        self.dataset, self.item_seconds = dataset, []

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, i):
        start = time.perf_counter()
        item = self.dataset[i]
        self.item_seconds.append(time.perf_counter() - start)
        return item

    def batch_seconds(self, batch_size: int) -> float | None:
        """Median item time × batch size (the median ignores first-call set-up costs)."""
        return statistics.median(self.item_seconds) * batch_size if self.item_seconds else None


def synthetic_classification_sets(
    cfg: DictConfig, dm, n_items: int, args: argparse.Namespace, gen: torch.Generator
) -> tuple[TimedDataset, Dataset, Dataset]:
    """Train/val/test datasets of random examples shaped as ``dm``'s real ones (val/test: one batch)."""
    from torchvision.transforms import v2

    from astraora.data.audio import AudioDataModule, AudioTensors
    from astraora.data.vision import CIFAR10DataModule, MNISTDataModule, TensorImages, to_float

    def split(make, n_eval: int):
        return TimedDataset(make(n_items, True)), make(n_eval, False), make(n_eval, False)

    n_eval = dm.batch_size
    if isinstance(dm, CIFAR10DataModule):

        def make(n, train):
            images = torch.randint(0, 256, (n, 3, 32, 32), dtype=torch.uint8, generator=gen)
            steps = [v2.RandomCrop(32, padding=4), v2.RandomHorizontalFlip()] if train and dm.augment else []
            return TensorImages(
                images, torch.randint(0, 10, (n,), generator=gen), v2.Compose([*steps, *to_float(dm.MEAN, dm.STD)])
            )

        return split(make, n_eval)
    if isinstance(dm, MNISTDataModule):

        def make(n, train):
            images = torch.randint(0, 256, (n, 1, 28, 28), dtype=torch.uint8, generator=gen)
            return TensorImages(
                images, torch.randint(0, 10, (n,), generator=gen), v2.Compose(to_float(dm.MEAN, dm.STD))
            )

        return split(make, n_eval)
    num_classes = int(
        args.model_kwargs.get("num_classes") or NUM_CLASSES.get(cfg.task.name) or getattr(dm, "num_classes", 0)
    )
    if not num_classes:
        raise SystemExit(
            f"error: say how many classes task={cfg.task.name} has: --model-kwargs '{{\"num_classes\": K}}'."
        )
    if isinstance(dm, AudioDataModule):
        dm.classes = [f"class{k}" for k in range(num_classes)]

        def make(n, train):
            waves = 0.1 * torch.randn(n, dm.frontend.samples, generator=gen)
            return AudioTensors(waves, torch.randint(0, num_classes, (n,), generator=gen), dm.frontend, train=train)

        return split(make, n_eval)
    if args.input_shape is None:
        raise SystemExit(
            f"error: no synthetic source for {type(dm).__name__}; give the per-example input "
            "shape with --input-shape (e.g. 64 or 3,64,64) and --model-kwargs with the model's kwargs."
        )
    shape = tuple(int(s) for s in args.input_shape.split(","))

    def make(n, train):
        return TensorDataset(torch.randn(n, *shape, generator=gen), torch.randint(0, num_classes, (n,), generator=gen))

    return split(make, n_eval)


def synthetic_datamodule(
    cfg: DictConfig, n_batches: int, args: argparse.Namespace
) -> tuple[L.LightningDataModule, TimedDataset | None]:
    """The task's real DataModule with random data in place of the files.

    Returns the DataModule, already ``setup("fit")``, and the timed training set (None for
    language models, whose window slicing is negligible and not timed)."""
    from astraora.data.text import ByteTokenizer, CharTokenizer, TextDataModule
    from astraora.data.vision import ClassificationDataModule

    dm = instantiate(cfg.task.datamodule, _convert_="all")
    gen = torch.Generator().manual_seed(int(cfg.seed))
    timed = None
    if isinstance(dm, TextDataModule):
        vocab = args.model_kwargs.get("vocab_size")
        byte_level = cfg.task.name == "wikitext2" or cfg.task.get("tokenizer") == "byte"
        if byte_level and vocab in (None, 256):
            tokenizer, dtype = ByteTokenizer(), torch.uint8
        else:
            vocab = vocab or CHAR_VOCAB.get(cfg.task.name)
            if not vocab:
                raise SystemExit(
                    f"error: say how large the vocabulary of task={cfg.task.name} is: "
                    "--model-kwargs '{\"vocab_size\": V}'."
                )
            tokenizer, dtype = CharTokenizer("".join(chr(32 + k) for k in range(int(vocab)))), torch.int32
        length = max(4 * dm.block_size, 1_000_000)
        tokens = {
            s: torch.randint(0, tokenizer.vocab_size, (length,), generator=gen).to(dtype)
            for s in ("train", "val", "test")
        }
        dm.load = lambda: (tokenizer, tokens)
    elif isinstance(dm, ClassificationDataModule):
        sets = synthetic_classification_sets(cfg, dm, n_batches * dm.batch_size, args, gen)
        timed = sets[0]
        dm.build_splits = lambda: sets
    else:
        raise SystemExit(f"error: no synthetic source for {type(dm).__name__}.")
    dm.prepare_data = lambda: None  # nothing to download: Trainer.fit would call it
    dm.setup("fit")
    return dm, timed


class Stopwatch:
    """Adds up the wall time spent in the functions it wraps."""

    def __init__(self):
        self.seconds = 0.0

    def wrap(self, fn):
        def timed(*a, **kw):
            start = time.perf_counter()
            try:
                return fn(*a, **kw)
            finally:
                self.seconds += time.perf_counter() - start

        return timed


class OtherLoad:
    """Context manager: how many CPU cores processes other than this one kept busy on average while
    it was open (Linux ``/proc/stat`` minus this process's own CPU time); ``cores`` is None where
    that cannot be read. Anything well above 0 means the timings are slowed by sharing the CPUs."""

    @staticmethod
    def _busy_seconds() -> float | None:
        try:
            with open("/proc/stat") as f:
                fields = [int(v) for v in f.readline().split()[1:]]
        except (OSError, ValueError):
            return None
        idle = fields[3] + (fields[4] if len(fields) > 4 else 0)  # idle + iowait
        return (sum(fields[:8]) - idle) / os.sysconf("SC_CLK_TCK")  # guest time is already in user

    def __enter__(self) -> OtherLoad:
        self.cores = None
        times = os.times()
        self._start = (time.perf_counter(), self._busy_seconds(), times.user + times.system)
        return self

    def __exit__(self, *exc) -> None:
        wall0, busy0, own0 = self._start
        busy1, times = self._busy_seconds(), os.times()
        wall = time.perf_counter() - wall0
        if busy0 is not None and busy1 is not None and wall > 0:
            self.cores = max(0.0, (busy1 - busy0 - (times.user + times.system - own0)) / wall)


@dataclass
class StepRecord:
    """One training batch: its global step, wall seconds (whole ``training_step``), the seconds of
    it spent in oracle diagnostics and in surrogate readouts, and the ledger queries by purpose."""

    step: int
    wall_s: float
    diagnostics_s: float
    readout_s: float
    queries: dict[str, int]

    @property
    def steady_s(self) -> float:
        """The step without its diagnostics and readout time."""
        return self.wall_s - self.diagnostics_s - self.readout_s

    @property
    def steady_queries(self) -> int:
        return self.queries["total"] - self.queries["readout"]


class StepTimer(L.Callback):
    """Records a :class:`StepRecord` per training batch and prints it to stderr as it ends."""

    def __init__(self, module, label: str):
        self.records: list[StepRecord] = []
        self.label = label
        self.diagnostics, self.readout = Stopwatch(), Stopwatch()
        module.diagnostics = self.diagnostics.wrap(module.diagnostics)  # called by training_step
        for layer in module.physical.values():
            layer.surrogate.readout = self.readout.wrap(layer.surrogate.readout)

    @staticmethod
    def _queries(pl_module) -> dict[str, int]:
        totals = pl_module.query_totals()
        return {p: totals.get(f"queries/{p}", 0) for p in (*PURPOSES, "total")}  # a digital twin has none

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self._start = (pl_module.global_step, self.diagnostics.seconds, self.readout.seconds, self._queries(pl_module))
        self._t0 = time.perf_counter()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        wall = time.perf_counter() - self._t0
        step, diag0, read0, q0 = self._start
        q1 = self._queries(pl_module)
        rec = StepRecord(
            step, wall, self.diagnostics.seconds - diag0, self.readout.seconds - read0, {p: q1[p] - q0[p] for p in q1}
        )
        self.records.append(rec)
        extra = (
            f" (diagnostics {rec.diagnostics_s:.2f} s, readout {rec.readout_s:.2f} s)"
            if rec.diagnostics_s + rec.readout_s > 0.005
            else ""
        )
        print(f"  [{self.label}] step {step}: {wall:.2f} s{extra}", file=sys.stderr, flush=True)


@dataclass
class EpochTiming:
    """What one timed configuration produced, and the epoch estimate from it."""

    task: str
    device: str
    mode: str
    batch_size: int
    physical: list[str]
    warmup: int
    records: list[StepRecord]
    steps_per_epoch: int
    train_size: int
    drop_last: bool
    data_s: float | None  # per batch: median item time × batch size (None: not measured)
    data_serial: bool  # the loader has no workers: data time adds to the step time
    data_what: str
    diagnostics_every: int
    setup_s: float
    others_cores: float | None  # CPU cores other processes kept busy meanwhile (None: unknown)
    notes: list[str] = field(default_factory=list)

    @property
    def timed(self) -> list[StepRecord]:
        return self.records[self.warmup :]

    @property
    def step_s(self) -> float:
        return statistics.median(r.steady_s for r in self.timed)

    @property
    def diagnostics_s(self) -> float:
        """Diagnostics time of one diagnostic step (median over those seen, warm-up included)."""
        seen = (
            [r.diagnostics_s for r in self.records if r.step % self.diagnostics_every == 0]
            if self.diagnostics_every
            else []
        )
        return statistics.median(seen) if seen else 0.0

    @property
    def diagnostic_steps(self) -> int:
        """Diagnostic steps in the first epoch (global steps 0, every, 2·every, ...)."""
        return math.ceil(self.steps_per_epoch / self.diagnostics_every) if self.diagnostics_every else 0

    @property
    def readout_s(self) -> float:
        return sum(r.readout_s for r in self.records)

    @property
    def queries_per_step(self) -> int:
        return int(statistics.median(r.steady_queries for r in self.timed))

    @property
    def epoch_s(self) -> float:
        per_step = self.step_s + (self.data_s if self.data_serial and self.data_s else 0.0)
        return self.steps_per_epoch * per_step + self.diagnostic_steps * self.diagnostics_s


def train_size_for(cfg: DictConfig, args: argparse.Namespace) -> int:
    if args.train_size:
        return int(args.train_size)
    if cfg.task.kind == "language_model":
        return int(cfg.task.datamodule.samples_per_epoch)
    if cfg.task.name in DEFAULT_TRAIN_SIZE:
        return DEFAULT_TRAIN_SIZE[cfg.task.name]
    raise SystemExit(f"error: no default training-set size for task={cfg.task.name}; pass --train-size N.")


def time_training(cfg: DictConfig, args: argparse.Namespace) -> EpochTiming:
    """Build the run of ``cfg`` on synthetic data and time ``args.warmup + args.steps`` training steps."""
    from astraora.train import build_module

    started = time.perf_counter()
    train_size = train_size_for(cfg, args)  # before the slow part: a missing size fails at once
    L.seed_everything(int(cfg.seed), workers=True, verbose=False)
    n_steps = args.warmup + args.steps
    dm, timed_set = synthetic_datamodule(cfg, n_steps + 1, args)
    model_kwargs = {**dm.model_kwargs(), **args.model_kwargs}
    module = build_module(cfg, dm, model_kwargs)
    model = module.model
    layers = hybrid_layers(model)
    device_label = cfg.device.family
    timer = StepTimer(module, f"{cfg.task.name}/{device_label}")
    trainer = L.Trainer(
        accelerator="cpu",
        devices=1,
        precision=cfg.trainer.precision,
        max_steps=n_steps,
        max_epochs=1,
        limit_val_batches=0,
        num_sanity_val_steps=0,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=[timer],
    )
    setup_s = time.perf_counter() - started
    with OtherLoad() as others:
        trainer.fit(module, datamodule=dm)
    if len(timer.records) < n_steps:
        raise SystemExit(f"error: only {len(timer.records)} of {n_steps} steps ran.")

    drop_last = cfg.task.kind == "classification"
    steps_per_epoch = train_size // dm.batch_size if drop_last else math.ceil(train_size / dm.batch_size)
    num_workers = getattr(dm, "num_workers", 0)
    data_s, data_what = None, "token windows (slicing a tensor; not timed)"
    if timed_set is not None:
        data_what = {
            "AudioTensors": "log-mel Frontend per clip (waveform decoding not timed)",
            "TensorImages": "image transforms per item",
        }.get(type(timed_set.dataset).__name__, "random tensors")
        if num_workers == 0:
            data_s = timed_set.batch_seconds(dm.batch_size)
    notes = []
    if timed_set is not None and num_workers > 0:
        notes.append(f"the loader has {num_workers} workers: data loading overlaps the step and is not timed")
    return EpochTiming(
        task=cfg.task.name,
        device=device_label,
        mode=cfg.mode if layers else "digital",
        batch_size=dm.batch_size,
        physical=[
            f"{name}: {layer.d_in} → {layer.d_out} ({type(layer.device).__name__})" for name, layer in layers.items()
        ],
        warmup=args.warmup,
        records=timer.records,
        steps_per_epoch=steps_per_epoch,
        train_size=train_size,
        drop_last=drop_last,
        data_s=data_s,
        data_serial=num_workers == 0,
        data_what=data_what,
        diagnostics_every=int(cfg.callbacks.diagnostics.every_n_steps),
        setup_s=setup_s,
        others_cores=others.cores,
        notes=notes,
    )


def hours(seconds: float) -> str:
    return f"{seconds:,.0f} s = {seconds / 3600:.2f} h"


def format_report(t: EpochTiming) -> str:
    """The figures of one timed configuration, one per line."""
    timed = t.timed
    walls = [r.steady_s for r in timed]
    lines = [
        f"task             {t.task}",
        f"device           {t.device}",
        f"mode             {t.mode}",
        f"batch size       {t.batch_size}",
    ]
    if t.physical:
        lines.append(f"physical layers  {'; '.join(t.physical)}")
    lines += [
        f"torch threads    {torch.get_num_threads()} of {os.cpu_count()} CPUs"
        + (f"; other processes kept {t.others_cores:.1f} cores busy meanwhile" if t.others_cores is not None else ""),
        f"timed steps      {len(timed)} after {t.warmup} warm-up "
        f"(steady times {', '.join(f'{w:.2f}' for w in walls)} s)",
        f"seconds/step     {t.step_s:.3f} (median; model step = forward + backward + optimizers + surrogate update)",
    ]
    if t.data_s is not None:
        lines.append(
            f"data/batch       {t.data_s:.3f} s ({t.data_what}; {'serial, added' if t.data_serial else 'overlapped'})"
        )
    else:
        lines.append(f"data/batch       not timed ({t.data_what})")
    if t.diagnostic_steps:
        lines.append(
            f"diagnostics      {t.diagnostics_s:.2f} s per diagnostic step, every {t.diagnostics_every} steps "
            f"({t.diagnostic_steps} per epoch)"
        )
    if t.readout_s > 0:
        lines.append(f"readout          {t.readout_s:.2f} s once per run (first forward; not in the epoch estimate)")
    how = "//" if t.drop_last else "ceil /"
    lines += [
        f"steps/epoch      {t.steps_per_epoch} (train size {t.train_size} {how} batch {t.batch_size})",
        f"epoch estimate   {hours(t.epoch_s)}",
        f"queries/step     {t.queries_per_step:,} (ledger, readout excluded; last step by purpose: "
        + ", ".join(f"{p} {timed[-1].queries[p]:,}" for p in PURPOSES)
        + ")",
        f"setup            {t.setup_s:.1f} s (build data + model, not in the estimate)",
    ]
    lines += [f"note             {n}" for n in t.notes]
    return "\n".join(lines)
