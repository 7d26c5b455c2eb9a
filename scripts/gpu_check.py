"""The GPU check of the MZI engines (docs/PERFORMANCE.md, "The fused engine"): one table.

    bash scripts/gpu_check.sh          # or: python scripts/gpu_check.py [--sizes 64,256,1024] [--cap 60]

On one CUDA device, in one process, nothing downloaded:

1. one ZO estimate (M = 100 directions, B = 256 rows, an N → N mesh of the paper's cell) with
   ``device.engine`` = tiles, columns and fused side by side at N = 64, 256, 1024: the fastest of a
   few timed estimates after a warm-up (which compiles the kernels), the peak GPU memory while they
   ran, and how far the fused engine's estimate and readings are from the column route's (same θ,
   inputs and directions);
2. one CIFAR-10-shaped epoch (45,000 generated 3 × 32 × 32 images, B = 256, the paper's CNN with its
   512 → 1024 physical layer), composed as ``python train.py task=cifar10 device=mzi
   device.engine=fused trainer=gpu`` composes it, against ``device=digital``. The data are random
   images through the task's own DataModule and transforms (scripts/_bench.py, as
   scripts/time_epoch.py uses them). Each run is capped at ``--cap`` seconds of training; a run cut
   short is extrapolated to the epoch from its steps after the first (the first compiles), and the
   table says so.

Exits with status 2 and one line where there is no CUDA device or no triton. The whole check is
meant to take under five minutes on an H100-class card (columns at N = 1024 is timed once).
"""

from __future__ import annotations

import argparse
import logging
import math
import sys
import time
import warnings
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))  # _bench, a scripts-local module

ENGINES = ("tiles", "columns", "fused")
SAMPLES, BATCH = 100, 256
DEFAULT_STEPS = 45000 // BATCH  # a CIFAR-10 epoch: 45,000 training images (5,000 held out), last batch dropped


def fail(message: str) -> None:
    print(f"gpu_check: {message}", file=sys.stderr)
    sys.exit(2)


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", default="64,256,1024", help="mesh widths N (default 64,256,1024)")
    parser.add_argument("--repeats", type=int, default=5, help="timed ZO estimates per engine and size (default 5)")
    parser.add_argument("--budget", type=float, default=8.0, help="seconds of timed estimates per cell (default 8)")
    parser.add_argument("--cap", type=float, default=60.0, help="seconds of training per epoch run (default 60)")
    parser.add_argument("--no-epoch", action="store_true", help="skip the CIFAR-10-shaped epoch")
    parser.add_argument(
        "--dry-run",
        action="store_true",
        help="on the CPU under TRITON_INTERPRET=1: the script's logic only, at tiny sizes (timings meaningless)",
    )
    parser.add_argument("overrides", nargs="*", help="Hydra overrides added to both epoch runs")
    return parser.parse_args(argv)


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def peak_mib(device: torch.device) -> float:
    return torch.cuda.max_memory_allocated() / 2**20 if device.type == "cuda" else math.nan


def reset_peak(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()


def zo_cell(engine: str, modes: int, repeats: int, budget: float, device: torch.device) -> dict:
    """Time one ZO estimate on an N → N mesh with ``engine``; also the estimate and one batched
    reading for the comparison with the column route."""
    from astraora.devices import MZIMesh
    from astraora.ledger import QueryLedger
    from astraora.rng import make_generator
    from astraora.zo import ZOEstimator

    mesh = MZIMesh(modes, modes, seed=0, name="gpu_check.mzi", engine=engine).to(device)
    ledger = QueryLedger(mesh)
    gen = make_data_generator()
    x = torch.randn(BATCH, modes, generator=gen).to(device)
    g = torch.randn(BATCH, modes, generator=gen).to(device)
    with torch.no_grad():
        thetas = mesh.theta.detach() + 0.01 * torch.randn(4, *mesh.theta.shape, generator=gen).to(device)
        readings = mesh.query(x, thetas)
    y = ledger.query(x, "forward")

    last = {}

    def estimate() -> torch.Tensor:  # the same directions for every engine: a fresh generator each time
        last["zo"] = ZOEstimator(samples=SAMPLES, generator=make_generator(0, "gpu_check", "zo"))
        return last["zo"].estimate(ledger, x, g, y)

    ghat = estimate()  # warm-up: compiles
    reference = None
    if engine == "fused" and ledger.drawn_queries("zo"):  # its directions are drawn on chip: compare on those
        from astraora.devices import fused

        columns = MZIMesh(modes, modes, seed=0, name="gpu_check.mzi", engine="columns").to(device)
        columns.load_state_dict(mesh.state_dict())
        same = fused.explicit_estimator(last["zo"].last_seed, samples=SAMPLES)
        reference = same.estimate(QueryLedger(columns), x, g, y).cpu()
    synchronize(device)
    reset_peak(device)
    times: list[float] = []
    started = time.perf_counter()
    while len(times) < repeats and (not times or time.perf_counter() - started < budget):
        t0 = time.perf_counter()
        estimate()
        synchronize(device)
        times.append(time.perf_counter() - t0)
    return {
        "seconds": min(times),
        "timed": len(times),
        "peak_mib": peak_mib(device),
        "ghat": ghat.float().cpu(),
        "ghat_reference": None if reference is None else reference.float(),  # the column route, same directions
        "readings": readings.float().cpu(),
    }


#: (fused.STATE_BUDGET, fused.NUM_WARPS) timed for the kernel alone at N = 1024: BLOCK_B = 8, 4, 4, 2 rows
#: per program (all compile for sm_90a without register spills; tests/test_fused.py --ptxas)
LAUNCH_SHAPES = ((4096, 8), (2048, 4), (2048, 8), (1024, 4))


def launch_sweep(modes: int, device: torch.device, repeats: int = 3) -> list[str]:
    """The fused kernel alone (K = M settings, B rows, readings) for each of :data:`LAUNCH_SHAPES`:
    the fastest of ``repeats`` launches after a warm-up that compiles."""
    from astraora.devices import MZIMesh, fused

    mesh = MZIMesh(modes, modes, seed=0, name="gpu_check.mzi", engine="fused").to(device)
    gen = make_data_generator()
    settings = mesh.theta.detach() + 0.01 * torch.randn(SAMPLES, *mesh.theta.shape, generator=gen).to(device)
    x = torch.randn(BATCH, modes, generator=gen).to(device)
    saved = fused.STATE_BUDGET, fused.NUM_WARPS
    out = []
    try:
        for budget, warps in LAUNCH_SHAPES:
            fused.STATE_BUDGET, fused.NUM_WARPS = budget, warps
            _, rows, _ = fused.launch_shape(modes, BATCH)

            def launch() -> None:
                fused.transfer(fused.CELL_PAPER, settings, x, mesh.modes, modes)

            try:
                launch()
                times = []
                for _ in range(repeats):
                    synchronize(device)
                    t0 = time.perf_counter()
                    launch()
                    synchronize(device)
                    times.append(time.perf_counter() - t0)
                out.append(f"BLOCK_B {rows}, {warps} warps: {min(times) * 1e3:.2f} ms")
            except Exception as err:  # noqa: BLE001 - reported
                out.append(f"BLOCK_B {rows}, {warps} warps: failed ({type(err).__name__})")
    finally:
        fused.STATE_BUDGET, fused.NUM_WARPS = saved
    return out


def make_data_generator() -> torch.Generator:
    from astraora.rng import make_generator

    return make_generator(0, "gpu_check", "data")


def relative(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm().clamp_min(1e-30))


def epoch_run(device_overrides: list[str], cap: float, device: torch.device, extra: list[str]) -> dict:
    """One epoch of the CIFAR-10 run on generated images (capped at ``cap`` seconds of training)."""
    import lightning as L
    from _bench import DEFAULT_TRAIN_SIZE, synthetic_datamodule
    from hydra import compose, initialize_config_dir

    from astraora.config import validate
    from astraora.paths import CONFIG_DIR
    from astraora.train import build_module

    overrides = ["task=cifar10", "trainer=gpu" if device.type == "cuda" else "trainer=cpu", *device_overrides, *extra]
    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        cfg = compose(config_name="config", overrides=overrides)
    validate(cfg)
    L.seed_everything(int(cfg.seed), workers=True, verbose=False)
    steps = DEFAULT_TRAIN_SIZE["cifar10"] // int(cfg.task.datamodule.batch_size)  # drop_last
    args = argparse.Namespace(model_kwargs={}, input_shape=None)
    dm, _ = synthetic_datamodule(cfg, steps + 1, args)
    module = build_module(cfg, dm)

    class Clock(L.Callback):
        def __init__(self) -> None:
            self.ends: list[float] = []

        def on_train_batch_end(self, *_) -> None:
            synchronize(device)
            self.ends.append(time.perf_counter())

    clock = Clock()
    trainer = L.Trainer(
        accelerator="gpu" if device.type == "cuda" else "cpu",
        devices=1,
        precision=cfg.trainer.precision,
        max_epochs=1,
        limit_train_batches=steps,
        limit_val_batches=0,
        num_sanity_val_steps=0,
        max_time={"seconds": cap},
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=[clock],
    )
    reset_peak(device)
    started = time.perf_counter()
    trainer.fit(module, datamodule=dm)
    done = len(clock.ends)
    if done < 2:
        return {"seconds": math.nan, "done": done, "steps": steps, "peak_mib": peak_mib(device)}
    per_step = (clock.ends[-1] - clock.ends[0]) / (done - 1)  # after the first step (compilation, warm-up)
    whole = clock.ends[-1] - started
    return {
        "seconds": whole if done == steps else (clock.ends[0] - started) + per_step * (steps - 1),
        "done": done,
        "steps": steps,
        "per_step": per_step,
        "peak_mib": peak_mib(device),
    }


def attempt(what: str, call, *args) -> dict:
    """``call(*args)``, or where it raises {"error": its first line} (printed), so that one failure
    leaves the rest of the table to be measured."""
    try:
        return call(*args)
    except Exception as err:  # noqa: BLE001 - reported in the table
        line = f"{type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}"[:160]
        print(f"  {what} failed: {line}", file=sys.stderr, flush=True)
        return {"error": line}


def reference_ghat(cells: dict) -> torch.Tensor:
    """The column route's ĝ on the fused estimate's directions (drawn on chip: its own reference), or
    the columns cell's ĝ (the same generator's directions)."""
    reference = cells["fused"].get("ghat_reference")
    return cells["columns"]["ghat"] if reference is None else reference


def ms(cell: dict) -> str:
    return "failed" if "error" in cell else f"{cell['seconds'] * 1e3:.2f} ms"


def span(run: dict) -> str:
    if "error" in run:
        return "failed"
    extra = "" if run["done"] == run["steps"] else f" (extrapolated from {run['done']} steps)"
    return f"{run['seconds']:.1f} s{extra}"


def zo_row(modes: int, cells: dict) -> str:
    peaks = " / ".join("—" if "error" in cells[e] else f"{cells[e]['peak_mib']:.0f}" for e in ENGINES)
    if "error" in cells["fused"] or "error" in cells["columns"]:
        diff = "; ".join(f"{e}: {cells[e]['error']}" for e in ENGINES if "error" in cells[e])
    else:
        diff = (
            f"ĝ {relative(cells['fused']['ghat'], reference_ghat(cells)):.1e}, "
            f"readings {relative(cells['fused']['readings'], cells['columns']['readings']):.1e}"
        )
    return (
        f"| ZO estimate, N = {modes}, M = {SAMPLES}, B = {BATCH} | {ms(cells['tiles'])} | {ms(cells['columns'])} "
        f"| {ms(cells['fused'])} | — | {peaks} (t / c / f) | {diff} |"
    )


def main(argv: list[str] | None = None) -> None:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    device = torch.device("cpu" if args.dry_run else "cuda")
    if not args.dry_run and not torch.cuda.is_available():
        fail("no CUDA device here (torch.cuda.is_available() is False); this check needs one GPU. Nothing was run.")
    try:
        import triton
    except ImportError:
        fail("triton is not importable; device.engine=fused needs it. Nothing was run.")
    logging.getLogger("lightning.pytorch").setLevel(logging.WARNING)
    logging.getLogger("lightning.fabric").setLevel(logging.WARNING)
    warnings.filterwarnings("ignore", message=".*does not have many workers.*")
    torch.set_flush_denormal(True)
    card = torch.cuda.get_device_name() if device.type == "cuda" else "the CPU (dry run: timings meaningless)"
    rows = []
    for modes in [int(s) for s in args.sizes.split(",") if s]:
        cells = {}
        for engine in ENGINES:
            repeats = 1 if engine == "columns" and modes >= 1024 else args.repeats
            cells[engine] = attempt(f"N={modes} {engine}", zo_cell, engine, modes, repeats, args.budget, device)
            print(f"  N={modes} {engine}: {ms(cells[engine])}", file=sys.stderr, flush=True)
            if device.type == "cuda":
                torch.cuda.empty_cache()
        rows.append((modes, cells))
    largest = max((modes for modes, _ in rows), default=0)
    sweep = []
    if largest:
        sweep = attempt("launch shapes", lambda: {"lines": launch_sweep(largest, device)}).get("lines", [])
    epoch = {}
    if not args.no_epoch:
        for name, overrides in (("digital", ["device=digital"]), ("fused", ["device=mzi", "device.engine=fused"])):
            epoch[name] = attempt(f"epoch {name}", epoch_run, overrides, args.cap, device, args.overrides)
            print(f"  epoch {name}: {span(epoch[name])}", file=sys.stderr, flush=True)

    print(f"gpu_check on {card} (torch {torch.__version__}, triton {triton.__version__})")
    print()
    print("| measurement | tiles | columns | fused | digital | peak MiB | fused vs columns (rel.) |")
    print("|---|---|---|---|---|---|---|")
    for modes, cells in rows:
        print(zo_row(modes, cells))
    ratio = None
    if epoch:
        digital, fused = epoch["digital"], epoch["fused"]
        failed = "error" in digital or "error" in fused
        ratio = None if failed else fused["seconds"] / digital["seconds"]
        steps = DEFAULT_STEPS if failed else fused["steps"]
        peaks = "—" if failed else f"{fused['peak_mib']:.0f} / {digital['peak_mib']:.0f} (f / d)"
        note = "; ".join(f"{k}: {v['error']}" for k, v in epoch.items() if "error" in v) or f"ratio {ratio:.2f}×"
        print(
            f"| CIFAR-10-shaped epoch, {steps} steps of B = {BATCH} (mzi: engine=fused) | — | — "
            f"| {span(fused)} | {span(digital)} | {peaks} | {note} |"
        )
    if sweep:
        print()
        print(f"fused kernel alone, N = {largest}, K = {SAMPLES}, B = {BATCH}, readings: " + "; ".join(sweep))
    print()
    big = [cells["fused"] for modes, cells in rows if modes == 1024 and "error" not in cells["fused"]]
    if big:
        zo_ms = big[0]["seconds"] * 1e3
        print(f"target: one ZO estimate at N = 1024 ≤ 20 ms: {zo_ms:.1f} ms ({'met' if zo_ms <= 20 else 'not met'})")
    if ratio is not None:
        verdict = "met" if ratio <= 2 else "not met"
        print(f"target: CIFAR-10 epoch with device=mzi within 2× of digital: {ratio:.2f}× ({verdict})")


if __name__ == "__main__":
    main()
