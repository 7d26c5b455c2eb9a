"""Benchmark the core costs of astraora on every device family (ALGORITHM.md §3–§5).

    python scripts/benchmark_core.py [--devices slm,mzi] [--quick] [--device cuda] [--json out.json]
        [--engines] [--step-ratio]

On a busy shared CPU pass ``--threads 1``: oversubscribed OpenMP threads made the MZI queries up
to 10x slower and the timings erratic in our runs.

For each device family it measures:

1. one ZO estimate, vectorised (``ZOEstimator`` with ``chunk_size=--chunk``) vs a per-sample loop
   (the same estimator with ``chunk_size=1``: one ledger query per sample), and their ratio;
2. one ``psi_implicit`` surrogate update after a small θ change vs a full readout + truncated SVD
   (``LowRankSurrogate.readout``), and their ratio;
3. the queries of one training step of a real ``HybridLayer`` (forward B rows, backward with ZO,
   optimizer step, ``after_optimizer_step``), read from its ledger on the second step (after the
   one-time readout), against ALGORITHM.md §5: B + M·min(B, m) [+ min(B, m)] + 2r + 2·M_sm.

Timings use ``time.perf_counter`` (with ``torch.cuda.synchronize`` on a GPU), a warm-up call and
the median of ``--repeats`` runs. A measurement stops repeating early once its runs have used
``--budget`` seconds (at least one run is always kept). When even that would be too slow (the MZI
mesh at N = 1024 on a CPU takes seconds per perturbed setting) a ZO estimate is timed on a subset
of its M samples and scaled up linearly; such numbers carry a ``*`` and a footnote. Likewise the
query count of a device whose real training step would blow the budget is taken with its physics
replaced by a cheap stand-in map of the same θ shape: the ledger, estimator, integrator and layer
code are unchanged and the counts depend only on shapes, but the footnote says so (use
``--real-steps`` to insist on the real transfer).

With ``--engines`` it also times, for the MZI families among ``--devices``, the tile engine
against the column-by-column reference (``device.engine=tiles`` vs ``columns``): one ZO estimate
(on ``--engine-samples`` of the M samples, scaled to M), one psi_implicit update and one readout,
interleaved in one process (:func:`astraora.perf.compare_engines`). With ``--step-ratio`` it
times training steps of the default run (``python train.py``) against its ``device=digital``
twin, in turns (:func:`astraora.perf.compare_steps`).

Exit code 1 when a measured query count differs from the formula.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field

import torch

from astraora import perf
from astraora.devices import SLM, Device, MatVec, Monarch, MRRBank, MZIClassical, MZIMesh
from astraora.devices.base import dense_transfer
from astraora.hybrid import HybridLayer
from astraora.ledger import QueryLedger
from astraora.rng import make_generator
from astraora.surrogate import LowRankSurrogate, PsiImplicitIntegrator
from astraora.zo import ZOEstimator

FAMILIES: dict[str, type[Device]] = {
    "matvec": MatVec,
    "slm": SLM,
    "mrr": MRRBank,
    "mzi": MZIMesh,
    "mzi_classical": MZIClassical,
    "monarch": Monarch,
}
DEFAULTS = {"n": 512, "m": 1024, "batch": 256}
QUICK = {"n": 64, "m": 128, "batch": 32}
THETA_STEP = 1e-3  # std of the random θ change before each timed psi_implicit update


# ----------------------------------------------------------------------------- settings
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


def parse_args(argv: list[str] | None = None) -> tuple[Settings, str | None]:
    """Command line → (:class:`Settings`, the ``--json`` path). Explicit size flags win over ``--quick``."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--devices", default=",".join(FAMILIES), help=f"comma-separated subset of {','.join(FAMILIES)}")
    parser.add_argument("--n", type=int, default=None, help="device input width (default 512; --quick: 64)")
    parser.add_argument("--m", type=int, default=None, help="device output width (default 1024; --quick: 128)")
    parser.add_argument("--batch", "-B", type=int, default=None, help="batch rows B (default 256; --quick: 32)")
    parser.add_argument("--samples", "-M", type=int, default=100, help="ZO samples M")
    parser.add_argument("--sketch", "--m-sm", type=int, default=100, help="psi_implicit sketch rows M_sm")
    parser.add_argument("--rank", "-r", type=int, default=10, help="surrogate rank r")
    parser.add_argument("--chunk", type=int, default=4, help="perturbed settings per batched call in the vectorised ZO")
    parser.add_argument("--repeats", type=int, default=3, help="timed runs per measurement (median reported)")
    parser.add_argument(
        "--budget",
        type=float,
        default=60.0,
        help="seconds of timed runs per measurement before repeating stops / sampling is subset",
    )
    parser.add_argument(
        "--requery-phi",
        action="store_true",
        help="re-query φ(θ) in the ZO estimate (the paper's count, +min(B, m) queries)",
    )
    parser.add_argument(
        "--real-steps", action="store_true", help="always count queries with the real device transfer, however slow"
    )
    parser.add_argument("--quick", action="store_true", help="smoke-run sizes n=64, m=128, B=32")
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--threads",
        type=int,
        default=0,
        help="torch intra-op threads (default: torch's choice); 1 avoids oversubscription on a busy machine",
    )
    parser.add_argument("--json", default=None, metavar="PATH", help="also write the numbers to PATH")
    parser.add_argument("--engines", action="store_true", help="MZI tile engine vs the column reference, side by side")
    parser.add_argument("--engine-samples", type=int, default=4, help="ZO samples timed per engine (scaled to M)")
    parser.add_argument("--step-ratio", action="store_true", help="default run: hybrid vs digital training step")
    parser.add_argument("--steps", type=int, default=10, help="--step-ratio: timed steps per round (3 rounds)")
    args = parser.parse_args(argv)

    devices = [d.strip() for d in args.devices.split(",") if d.strip()]
    unknown = sorted(set(devices) - set(FAMILIES))
    if unknown or not devices:
        parser.error(f"--devices: unknown {unknown}; choose from {list(FAMILIES)}")
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: no CUDA device is available")
    sizes = QUICK if args.quick else DEFAULTS
    settings = Settings(
        devices=devices,
        n=args.n or sizes["n"],
        m=args.m or sizes["m"],
        batch=args.batch or sizes["batch"],
        samples=args.samples,
        sketch=args.sketch,
        rank=args.rank,
        chunk=args.chunk,
        repeats=max(1, args.repeats),
        budget=args.budget,
        requery_phi=args.requery_phi,
        real_steps=args.real_steps,
        device=args.device,
        seed=args.seed,
        threads=args.threads,
        engines=args.engines,
        engine_samples=args.engine_samples,
        step_ratio=args.step_ratio,
        steps=args.steps,
    )
    return settings, args.json


# ----------------------------------------------------------------------------- timing
def synchronize(device: str) -> None:
    """Wait for queued GPU work so that wall-clock timings are honest."""
    if device == "cuda":
        torch.cuda.synchronize()


def timed_call(fn: Callable[[], object], device: str) -> float:
    """Seconds taken by one call of ``fn``."""
    synchronize(device)
    start = time.perf_counter()
    fn()
    synchronize(device)
    return time.perf_counter() - start


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


# ----------------------------------------------------------------------------- the device
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


# ----------------------------------------------------------------------------- 1. ZO estimate
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


# ----------------------------------------------------------------------------- 2. surrogate
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


# ----------------------------------------------------------------------------- 3. queries per step
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


# ----------------------------------------------------------------------------- one device
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


# ----------------------------------------------------------------------------- report
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


def engine_table(comparisons: list[perf.EngineComparison], settings: Settings) -> str:
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


def main(argv: list[str] | None = None) -> int:
    settings, json_path = parse_args(argv)
    if settings.threads > 0:
        torch.set_num_threads(settings.threads)
    torch.set_flush_denormal(True)  # as training runs do (astraora.train.run)
    env = environment()
    print(header(settings, env), flush=True)
    start = time.perf_counter()
    results = []
    for family in settings.devices:
        t0 = time.perf_counter()
        results.append(benchmark_device(family, settings))
        print(f"  {family}: done in {time.perf_counter() - t0:.1f} s", file=sys.stderr, flush=True)
    print(markdown_table(results))
    notes = footnotes(results, settings)
    if notes:
        print("\n" + "\n".join(notes))
    extra: dict = {}
    meshes = [f for f in settings.devices if f in perf.MESHES]
    if settings.engines and meshes:
        comparisons = [
            perf.compare_engines(
                f,
                settings.n,
                settings.m,
                settings.batch,
                settings.samples,
                settings.engine_samples,
                settings.rank,
                settings.sketch,
                settings.repeats,
                settings.seed,
                settings.device,
            )
            for f in meshes
        ]
        print("\n" + engine_table(comparisons, settings))
        extra["engines"] = {
            c.family: asdict(c)
            | {"zo_speedup": c.zo_speedup, "psi_speedup": c.psi_speedup, "readout_speedup": c.readout_speedup}
            for c in comparisons
        }
    if settings.step_ratio:
        steps = perf.compare_steps(steps=settings.steps)
        print(
            f"\ndefault run (python train.py), one training step: hybrid {1e3 * steps.hybrid_median:.1f} ms, "
            f"digital {1e3 * steps.digital_median:.1f} ms (medians of {steps.steps}); "
            f"hybrid/digital = {steps.ratio:.1f}x"
        )
        extra["step_ratio"] = asdict(steps) | {"ratio": steps.ratio}
    runtime = time.perf_counter() - start
    print(f"\nruntime: {runtime:.1f} s")
    if json_path:
        with open(json_path, "w") as file:
            json.dump(to_json(results, settings, env, runtime) | extra, file, indent=2)
    return 0 if all(r.step.match for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
