"""Side-by-side timings behind ``scripts/benchmark_core.py``: the MZI tile engine against the
column-by-column reference, and a hybrid training step against its digital twin.

Every comparison runs both sides in one process, interleaved (A, B, A, B, …), and keeps the
fastest of the repeats of each, so that a shared, noisy machine slows both alike; the ratio is
the figure to read, not the absolute times.
"""

from __future__ import annotations

import logging
import statistics
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass

import torch

from astraora.devices.mzi import MZIClassical, MZIMesh
from astraora.ledger import QueryLedger
from astraora.rng import make_generator
from astraora.surrogate import LowRankSurrogate, PsiImplicitIntegrator
from astraora.zo import ZOEstimator

MESHES = {"mzi": MZIMesh, "mzi_classical": MZIClassical}


def synchronize(device: str | torch.device) -> None:
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
    import lightning as L
    from hydra import compose, initialize_config_dir

    from astraora.build import instantiate
    from astraora.train import CONFIG_DIR, build_module

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
