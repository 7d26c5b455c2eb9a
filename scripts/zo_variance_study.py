"""What M random directions would cost at accuracy, without paying M's queries.

Each run trains with true gradients (``mode=exact``) and replaces every physical layer's θ-gradient
by a draw from the Gaussian ZO estimator's exact distribution at M directions
(:func:`astraora.zo.variance.gaussian_estimate_draw`; linear regime). M = 0 keeps the true gradient.
The settings per task are the parity study's (``astraora.report.parity.TASK_OVERRIDES``); runs go
to OUT/runs/<task>/<device>/M<M>/seed<S> and are skipped when finished.

    python scripts/zo_variance_study.py --tasks image_folder synthetic_audio --devices mzi \\
        --samples 100 1000 10000 --seeds 0 1 2 3 4 --out outputs/zo_variance --jobs 2
    python scripts/zo_variance_study.py --out outputs/zo_variance --report-only

One training (what the grid runs): ``zo_variance_study.py train M SEED OVERRIDE ...``.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def train_one(samples: int, seed: int, overrides: list[str]) -> None:
    """Run ``train.py OVERRIDES`` with θ's gradient replaced by M-direction draws (M = 0: unchanged)."""
    import torch

    from astraora.cli import main as cli_main
    from astraora.hybrid import HybridLayer
    from astraora.zo.variance import gaussian_estimate_draw

    generator = torch.Generator().manual_seed(1_000_003 * seed + 17)
    true_grad = HybridLayer.theta_grad

    def noisy_grad(self, x, g, y):
        grad = true_grad(self, x, g, y)
        return grad if samples == 0 or grad is None else gaussian_estimate_draw(grad, samples, generator)

    HybridLayer.theta_grad = noisy_grad
    sys.argv = ["train.py", "mode=exact", f"seed={seed}", *overrides]
    cli_main()


def finished(summary: Path) -> bool:
    """A completed run's summary (an interrupted run writes one too, and is run again)."""
    return summary.exists() and json.loads(summary.read_text()).get("status") == "completed"


def run_dir(out: Path, task: str, device: str, samples: int, seed: int) -> Path:
    return out / "runs" / task / device / f"M{samples}" / f"seed{seed}"


def launch(out: Path, task: str, device: str, samples: int, seed: int) -> None:
    from astraora.report.parity import TASK_OVERRIDES

    directory = run_dir(out, task, device, samples, seed)
    if finished(directory / "summary.json"):
        return
    directory.mkdir(parents=True, exist_ok=True)
    data = [f"task.root={out / 'data' / 'image_folder'}"] if task == "image_folder" else []
    overrides = [
        f"task={task}",
        f"device={device}",
        *TASK_OVERRIDES.get(task, []),
        *data,
        f"hydra.run.dir={directory}",
        "logger=csv",
    ]
    started = time.time()
    with open(directory.parent / f"seed{seed}.log", "w") as log:
        code = subprocess.run(
            [sys.executable, __file__, "train", str(samples), str(seed), *overrides],
            cwd=ROOT,
            stdout=log,
            stderr=subprocess.STDOUT,
        ).returncode
    print(f"{task} {device} M={samples} seed {seed}: exit {code}, {time.time() - started:.0f} s", flush=True)


def report(out: Path) -> str:
    """Mean test metric per (task, device, M) with its standard error over seeds."""
    import numpy as np

    rows = {}
    for path in sorted((out / "runs").glob("*/*/M*/seed*/summary.json")):
        if not finished(path):
            continue
        task, device, m = path.parts[-5], path.parts[-4], int(path.parts[-3][1:])
        metrics = json.loads(path.read_text())["metrics"]
        key = "test/acc" if "test/acc" in metrics else "test/loss"
        scale = 100 if key == "test/acc" else 1
        rows.setdefault((task, device, key), {}).setdefault(m, []).append(metrics[key] * scale)
    lines = ["| task | device | metric | M (0: true gradient) | mean ± s.e. | seeds |", "|---|---|---|---|---|---|"]
    for (task, device, key), by_m in sorted(rows.items()):
        for m, values in sorted(by_m.items(), key=lambda item: (item[0] == 0, item[0])):
            v = np.array(values)
            se = v.std(ddof=1) / np.sqrt(len(v)) if len(v) > 1 else float("nan")
            lines.append(f"| {task} | {device} | {key} | {m if m else 'true'} | {v.mean():.2f} ± {se:.2f} | {len(v)} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["train"]:
        train_one(int(argv[1]), int(argv[2]), argv[3:])
        return 0
    from astraora.report.parity import TASK_OVERRIDES, make_image_folder

    parser = argparse.ArgumentParser(prog="zo_variance_study.py", description=__doc__.split("\n\n")[0])
    parser.add_argument("--tasks", nargs="+", default=["image_folder", "synthetic_audio"], choices=list(TASK_OVERRIDES))
    parser.add_argument("--devices", nargs="+", default=["mzi"])
    parser.add_argument(
        "--samples", nargs="+", type=int, default=[100, 1000, 10000], help="M values; 0 = true gradient"
    )
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--jobs", type=int, default=1)
    parser.add_argument("--out", type=Path, default=Path("outputs/zo_variance"))
    parser.add_argument("--report-only", action="store_true")
    args = parser.parse_args(argv)
    out = args.out.resolve()
    if not args.report_only:
        if "image_folder" in args.tasks:
            make_image_folder(out / "data" / "image_folder")
        grid = [(t, d, m, s) for s in args.seeds for t in args.tasks for d in args.devices for m in args.samples]
        with ThreadPoolExecutor(max(1, args.jobs)) as pool:
            list(pool.map(lambda job: launch(out, *job), grid))
    table = report(out)
    (out / "zo_variance.md").write_text(table + "\n", encoding="utf-8")
    print(table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
