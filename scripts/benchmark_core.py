"""Benchmark the core costs of astraora on every device family (ALGORITHM.md §3–§5).

    python scripts/benchmark_core.py [--devices slm,mzi] [--quick] [--device cuda] [--json out.json]
        [--engines] [--step-ratio] [--threads 1]

Per device family: (1) one ZO estimate, vectorised (``chunk_size=--chunk``) vs a per-sample loop,
and their ratio; (2) one ``psi_implicit`` update after a small θ change vs a full readout +
truncated SVD, and their ratio; (3) the queries of one training step of a real ``HybridLayer``
(second step, after the one-time readout) against ALGORITHM.md §5: B + M·min(B, m) [+ min(B, m)]
+ 2r + 2·M_sm. Medians of ``--repeats`` runs after a warm-up, stopped early past ``--budget``
seconds; work too slow for the budget is timed on a subset of the M samples and scaled (marked
``*``), or counted on a stand-in transfer of the same θ shape (marked ``†``; ``--real-steps``
insists on the real one). ``--engines``: the MZI tile engine against the column reference,
interleaved; ``--step-ratio``: the default run's training step against its ``device=digital`` twin,
in turns. On a busy shared CPU pass ``--threads 1``. The timing code is in scripts/_bench.py.
Exit code 1 when a measured query count differs from the formula.
"""

import argparse
import json
import sys
import time
from dataclasses import asdict

import _bench as bench
import torch

SIZES = {False: {"n": 512, "m": 1024, "batch": 256}, True: {"n": 64, "m": 128, "batch": 32}}  # by --quick


def parse_args(argv: list[str] | None = None) -> tuple[bench.Settings, str | None]:
    """Command line → (settings, the ``--json`` path). Explicit size flags win over ``--quick``."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add = parser.add_argument
    add("--devices", default=",".join(bench.FAMILIES), help=f"comma-separated subset of {','.join(bench.FAMILIES)}")
    for flag, default in SIZES[False].items():
        add(
            f"--{flag}",
            *(["-B"] if flag == "batch" else []),
            type=int,
            default=None,
            help=f"default {default}; --quick: {SIZES[True][flag]}",
        )
    add("--samples", "-M", type=int, default=100, help="ZO samples M")
    add("--sketch", "--m-sm", type=int, default=100, help="psi_implicit sketch rows M_sm")
    add("--rank", "-r", type=int, default=10, help="surrogate rank r")
    add("--chunk", type=int, default=4, help="perturbed settings per batched call in the vectorised ZO")
    add("--repeats", type=int, default=3, help="timed runs per measurement (median reported)")
    add("--budget", type=float, default=60.0, help="seconds of timed runs per measurement before it is cut short")
    add("--requery-phi", action="store_true", help="re-query φ(θ) in the ZO estimate (+min(B, m) queries)")
    add("--real-steps", action="store_true", help="always count queries with the real device transfer")
    add("--quick", action="store_true", help="smoke-run sizes n=64, m=128, B=32")
    add("--device", choices=("cpu", "cuda"), default="cpu")
    add("--seed", type=int, default=0)
    add("--threads", type=int, default=0, help="torch intra-op threads (0: torch's choice)")
    add("--json", default=None, metavar="PATH", help="also write the numbers to PATH")
    add("--engines", action="store_true", help="MZI tile engine vs the column reference, side by side")
    add("--engine-samples", type=int, default=4, help="ZO samples timed per engine (scaled to M)")
    add("--step-ratio", action="store_true", help="default run: hybrid vs digital training step")
    add("--steps", type=int, default=10, help="--step-ratio: timed steps per round (3 rounds)")
    args = vars(parser.parse_args(argv))
    devices = [d.strip() for d in args.pop("devices").split(",") if d.strip()]
    if not devices or set(devices) - set(bench.FAMILIES):
        parser.error(
            f"--devices: unknown {sorted(set(devices) - set(bench.FAMILIES))}; choose from {list(bench.FAMILIES)}"
        )
    if args["device"] == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: no CUDA device is available")
    sizes = SIZES[args.pop("quick")]
    args.update({key: args[key] or sizes[key] for key in sizes}, repeats=max(1, args["repeats"]))
    json_path = args.pop("json")
    return bench.Settings(devices=devices, **args), json_path


def main(argv: list[str] | None = None) -> int:
    settings, json_path = parse_args(argv)
    if settings.threads > 0:
        torch.set_num_threads(settings.threads)
    torch.set_flush_denormal(True)  # as training runs do (astraora.train.run)
    env = bench.environment()
    print(bench.header(settings, env), flush=True)
    start, results, extra = time.perf_counter(), [], {}
    for family in settings.devices:
        t0 = time.perf_counter()
        results.append(bench.benchmark_device(family, settings))
        print(f"  {family}: done in {time.perf_counter() - t0:.1f} s", file=sys.stderr, flush=True)
    print(bench.markdown_table(results))
    notes = bench.footnotes(results, settings)
    if notes:
        print("\n" + "\n".join(notes))
    meshes = [f for f in settings.devices if f in bench.MESHES]
    if settings.engines and meshes:
        s = settings
        sizes = (s.n, s.m, s.batch, s.samples, s.engine_samples, s.rank, s.sketch, s.repeats, s.seed, s.device)
        comparisons = [bench.compare_engines(f, *sizes) for f in meshes]
        print("\n" + bench.engine_table(comparisons, settings))
        speedups = ("zo_speedup", "psi_speedup", "readout_speedup")
        extra["engines"] = {c.family: asdict(c) | {k: getattr(c, k) for k in speedups} for c in comparisons}
    if settings.step_ratio:
        steps = bench.compare_steps(steps=settings.steps)
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
            json.dump(bench.to_json(results, settings, env, runtime) | extra, file, indent=2)
    return 0 if all(r.step.match for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
