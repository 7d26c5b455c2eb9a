"""The accuracy-parity study: where the hybrid loses to its digital twin, and why.

Per task and device, the same network is trained five ways (ALGORITHM.md §6): ``digital`` (the
physical layer an ordinary Linear), ``exact`` (true gradients through the simulator: the device's
own ceiling), ``exact+sm``, ``zo+exact`` and ``zo+sm`` (the method). The gap to digital splits into

    device    = exact − digital        what the device's matrix family costs, with perfect gradients
    surrogate = exact+sm − exact       the rank-r surrogate carrying the input gradient
    ZO        = zo+exact − exact       ZO noise in θ's gradient
    combined  = zo+sm − exact          the method against the device's ceiling (the target)
    total     = zo+sm − digital        = device + combined

each a paired difference per seed (averaged over the seeds that have both runs), signed so that
positive = worse: accuracy in points (×100), losses in percent of the reference run's loss.

    python scripts/parity_study.py [--tasks digits pydoc_text image_folder synthetic_audio]
                                   [--devices mzi mrr slm] [--seeds 0] [--jobs 1] [--out outputs/parity]
                                   [--modes digital exact exact+sm zo+exact zo+sm] [--set KEY=VALUE ...]
    python scripts/parity_study.py --report-only [DIR ...] --out OUT   # report from finished runs

Every run is an ordinary ``python train.py task=X device=Y mode=Z seed=S <study overrides>`` in
``OUT/runs/<task>/<device>/<mode>/seed<S>`` (the digital twin, one per task and seed, in
``OUT/runs/<task>/digital/seed<S>``); a run whose summary.json exists is not run again, so an
interrupted study continues where it stopped. The report reads any tree of run directories
(a multirun too) by the task, device, mode and seed their summary.json names. Writes
OUT/parity.md, OUT/parity.csv and OUT/parity_<task>.png.
"""

from __future__ import annotations

import argparse
import csv
import math
import statistics
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from astraora.report.compare import COMPLETED, find_run_dirs, load_run

ROOT = Path(__file__).resolve().parents[2]
DIGITAL = "digital"
MODES = ("exact", "exact+sm", "zo+exact", "zo+sm")
COLUMNS = (DIGITAL, *MODES)  # the five trainings of a (task, device) cell, in table order
DEVICES = ("mzi", "mrr", "slm")
# name -> (worse run, better run): the gap is how much worse the first is, per seed
GAPS = {
    "device": ("exact", DIGITAL),
    "surrogate": ("exact+sm", "exact"),
    "zo": ("zo+exact", "exact"),
    "combined": ("zo+sm", "exact"),
    "total": ("zo+sm", DIGITAL),
}
# The targets on the combined gap (zo+sm against exact), in the gap's unit.
TARGETS = {"acc": 0.5, "loss": 1.0}
# CPU-sized study settings per task (stated in the report): image_folder is the generated set of
# make_image_folder (600 images of 32 × 32, 120 for test); synthetic_audio made harder than its
# default (which every mode solves to 100 %); pydoc_text one epoch of its 128 steps.
TASK_OVERRIDES: dict[str, list[str]] = {
    "digits": [],
    "pydoc_text": ["task.max_epochs=1"],
    "image_folder": [
        "task.datamodule.image_size=32",
        "task.datamodule.batch_size=32",
        "task.max_epochs=8",
        "task.datamodule.test_fraction=0.2",
        "task.datamodule.num_workers=0",
    ],
    "synthetic_audio": [
        "task.datamodule.noise=1.5",
        "task.datamodule.num_classes=8",
        "task.datamodule.clips_per_class=64",
    ],
}
# the test metric compared per task kind
TEST_METRICS = ("test/acc", "test/loss")


# ---------------------------------------------------------------------------- data the study makes


def make_image_folder(
    root: Path, classes_per_image: int = 150, size: int = 32, noise: float = 0.8, seed: int = 1234
) -> Path:
    """A class-per-folder PNG set of four flip-invariant textures in noise (horizontal stripes,
    vertical stripes, checkerboard, rings) with random frequency and phase: ``root/<class>/<i>.png``.
    Written once (kept when ``root`` already holds it); returns ``root``."""
    from PIL import Image

    names = ("hstripes", "vstripes", "checker", "rings")
    if all(len(list((root / name).glob("*.png"))) == classes_per_image for name in names):
        return root
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float64) / size
    for label, name in enumerate(names):
        folder = root / name
        folder.mkdir(parents=True, exist_ok=True)
        for index in range(classes_per_image):
            freq, phase = rng.uniform(2.0, 5.0), rng.uniform(0, 2 * np.pi)
            if label == 0:
                pattern = np.sin(2 * np.pi * freq * yy + phase)
            elif label == 1:
                pattern = np.sin(2 * np.pi * freq * xx + phase)
            elif label == 2:
                pattern = np.sin(2 * np.pi * freq * xx + phase) * np.sin(2 * np.pi * freq * yy + phase)
            else:
                cy, cx = rng.uniform(0.25, 0.75, size=2)
                pattern = np.sin(2 * np.pi * freq * np.hypot(yy - cy, xx - cx) + phase)
            pixels = 0.5 * pattern[..., None] + noise * rng.standard_normal((size, size, 3))
            image = np.clip(127.5 + 127.5 * pixels, 0, 255).astype(np.uint8)
            Image.fromarray(image, "RGB").save(folder / f"{index:04d}.png")
    return root


# ---------------------------------------------------------------------------- running the grid


def run_dir(out: Path, task: str, device: str, mode: str, seed: int) -> Path:
    """``OUT/runs/<task>/<device>/<mode>/seed<S>``; the digital twin ``OUT/runs/<task>/digital/seed<S>``."""
    base = out / "runs" / task
    return base / DIGITAL / f"seed{seed}" if device == DIGITAL else base / device / mode / f"seed{seed}"


def command(out: Path, task: str, device: str, mode: str, seed: int, extra: tuple[str, ...] = ()) -> list[str]:
    """The ``train.py`` command line of one run of the study; ``extra`` overrides go to the hybrid
    runs only (e.g. ``surrogate.rank=32``: the digital twin has no surrogate)."""
    data = [f"task.root={out / 'data' / 'image_folder'}"] if task == "image_folder" else []
    hybrid = [] if device == DIGITAL else [f"mode={mode}", *extra]
    return [
        sys.executable,
        "-m",
        "astraora.train",
        f"task={task}",
        f"device={device}",
        *hybrid,
        f"seed={seed}",
        *TASK_OVERRIDES.get(task, []),
        *data,
        f"hydra.run.dir={run_dir(out, task, device, mode, seed)}",
        "logger=csv",
    ]


def jobs(tasks, devices, seeds, columns=COLUMNS) -> list[tuple[str, str, str, int]]:
    """(task, device, mode, seed) of every run of ``columns``, seed-major (a cut-short study has
    whole seeds), the digital twin once per task and seed."""
    grid = []
    for seed in seeds:
        for task in tasks:
            grid += [(task, DIGITAL, DIGITAL, seed)] if DIGITAL in columns else []
            grid += [(task, device, mode, seed) for device in devices for mode in MODES if mode in columns]
    return grid


def train(out: Path, task: str, device: str, mode: str, seed: int, extra: tuple[str, ...] = ()) -> bool:
    """Run one training unless its summary.json exists; True when it exists afterwards."""
    directory = run_dir(out, task, device, mode, seed)
    if (directory / "summary.json").exists():
        return True
    directory.mkdir(parents=True, exist_ok=True)
    started = time.time()
    with open(directory.parent / f"seed{seed}.log", "w") as log:
        code = subprocess.run(
            command(out, task, device, mode, seed, extra), cwd=ROOT, stdout=log, stderr=subprocess.STDOUT
        ).returncode
    print(f"{task} {device} {mode} seed {seed}: exit {code}, {time.time() - started:.0f} s", flush=True)
    return (directory / "summary.json").exists()


# ---------------------------------------------------------------------------- the decomposition


@dataclass
class Cell:
    """One (task, device): each column's test metric per seed, and the gaps built from them."""

    task: str
    device: str
    metric: str  # test/acc or test/loss
    values: dict[str, dict] = field(default_factory=dict)  # column -> {seed: value}
    gaps: dict[str, tuple[float, float | None, int] | None] = field(default_factory=dict)

    @property
    def seeds(self) -> list:
        """The seeds this device was trained with (the digital twin's only where it has no run):
        the task's digital twin may have more seeds than a device."""
        own = {seed for column in COLUMNS if column != DIGITAL for seed in self.values.get(column, {})}
        return sorted(own or set(self.values.get(DIGITAL, {})), key=str)

    @property
    def unit(self) -> str:
        return "pt" if self.metric.endswith("acc") else "%"

    def mean(self, column: str) -> tuple[float, float | None] | None:
        seeds = self.values.get(column) or {}
        return _mean_std(list(seeds.values()))

    @property
    def target(self) -> float:
        return TARGETS["acc" if self.metric.endswith("acc") else "loss"]

    @property
    def meets_target(self) -> bool | None:
        combined = self.gaps.get("combined")
        return None if combined is None else combined[0] <= self.target


def gap(metric: str, worse: float, better: float) -> float:
    """How much ``worse`` trails ``better``: accuracy in points, a loss in percent of ``better``."""
    if metric.endswith("acc"):
        return 100.0 * (better - worse)
    return 100.0 * (worse - better) / better


def collect(paths) -> list[Cell]:
    """Read every completed run under ``paths`` and build one Cell per (task, device), with the
    digital twin of the task in every device's cell. Several runs of the same task, device, mode
    and seed are averaged."""
    values: dict[tuple, list[float]] = {}
    metrics: dict[str, str] = {}
    for path in find_run_dirs(paths):
        try:
            run = load_run(path)
        except (OSError, ValueError) as error:
            print(f"parity: skipped {path}: {error}", file=sys.stderr)
            continue
        if run.status not in (None, COMPLETED):
            continue
        metric = next((name for name in TEST_METRICS if run.summary_metric(name) is not None), None)
        if metric is None:
            continue
        mode = DIGITAL if run.is_digital else run.setting("mode")
        metrics.setdefault(run.task, metric)
        values.setdefault((run.task, run.device, mode, run.setting("seed")), []).append(run.summary_metric(metric))
    cells = []
    for task in sorted(metrics):
        devices = sorted(
            {device for (t, device, _, _) in values if t == task and device != DIGITAL},
            key=lambda d: (DEVICES.index(d) if d in DEVICES else len(DEVICES), d),
        )
        for device in devices:
            cell = Cell(task, device, metrics[task])
            for (t, d, mode, seed), seed_values in values.items():
                if t == task and (d == device or d == DIGITAL) and mode in COLUMNS:
                    cell.values.setdefault(mode, {})[seed] = statistics.fmean(seed_values)
            cell.gaps = {name: paired_gap(cell, worse, better) for name, (worse, better) in GAPS.items()}
            cells.append(cell)
    return cells


def paired_gap(cell: Cell, worse: str, better: str) -> tuple[float, float | None, int] | None:
    """(mean, sample std or None, number of seeds) of the per-seed gap of ``worse`` behind
    ``better`` over the seeds both ran; None when no seed has both."""
    a, b = cell.values.get(worse, {}), cell.values.get(better, {})
    diffs = [gap(cell.metric, a[seed], b[seed]) for seed in a if seed in b]
    if not diffs:
        return None
    return statistics.fmean(diffs), statistics.stdev(diffs) if len(diffs) > 1 else None, len(diffs)


# ---------------------------------------------------------------------------- output


def markdown(cells: list[Cell], settings: dict[str, str] | None = None) -> str:
    """One table per task: each column's test metric (mean ± std over seeds) and the gaps."""
    settings = settings or {}
    lines = []
    for task in dict.fromkeys(cell.task for cell in cells):
        task_cells = [cell for cell in cells if cell.task == task]
        metric, unit = task_cells[0].metric, task_cells[0].unit
        target = task_cells[0].target
        gaps = "points" if unit == "pt" else "% of the reference loss"
        title = f"### {task} ({metric}; gaps in {gaps}, positive = worse)"
        lines += [title, ""]
        if task in settings:
            lines += [f"Settings: `{settings[task]}`", ""]
        header = [
            "device",
            "seeds",
            *COLUMNS,
            "device gap",
            "surrogate",
            "ZO",
            "combined",
            "total vs digital",
            f"combined ≤ {target:g} {unit}",
        ]
        lines += ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
        for cell in task_cells:
            row = [cell.device, ", ".join(map(str, cell.seeds))]
            row += [
                _format(cell.mean(column), 100 if unit == "pt" else 1, ".2f" if unit == "pt" else ".4f")
                for column in COLUMNS
            ]
            row += [
                _format(cell.gaps.get(name) and cell.gaps[name][:2], 1, "+.2f")
                for name in ("device", "surrogate", "zo", "combined", "total")
            ]
            met = cell.meets_target
            row.append("—" if met is None else "yes" if met else "**no**")
            lines.append("| " + " | ".join(row) + " |")
        lines.append("")
    lines += [
        "Columns digital … zo+sm: test metric, mean ± sample std over seeds (accuracy in %). Gaps are",
        "paired per seed: device = exact vs digital, surrogate = exact+sm vs exact, ZO = zo+exact vs",
        "exact, combined = zo+sm vs exact (the method against the device's ceiling), total = zo+sm vs",
        "digital (= device + combined); accuracy gaps in points, loss gaps in % of the better run's loss.",
        "— = not run.",
    ]
    return "\n".join(lines)


CSV_FIELDS = (
    "task",
    "device",
    "metric",
    "unit",
    "seeds",
    *(f"{column}{suffix}" for column in COLUMNS for suffix in ("", "_std")),
    *(f"gap_{name}{suffix}" for name in GAPS for suffix in ("", "_std")),
    "target",
    "meets_target",
)


def write_csv(cells: list[Cell], path: Path) -> None:
    """One row per (task, device): raw metric means and stds, gaps in their units; empty = not run."""
    with path.open("w", newline="", encoding="utf-8") as file:
        writer = csv.DictWriter(file, fieldnames=CSV_FIELDS)
        writer.writeheader()
        for cell in cells:
            row = {
                "task": cell.task,
                "device": cell.device,
                "metric": cell.metric,
                "unit": cell.unit,
                "seeds": ";".join(map(str, cell.seeds)),
                "target": cell.target,
                "meets_target": "" if cell.meets_target is None else cell.meets_target,
            }
            for column in COLUMNS:
                mean_std = cell.mean(column) or (None, None)
                row[column], row[f"{column}_std"] = (_csv(v) for v in mean_std)
            for name in GAPS:
                mean, std, _ = cell.gaps.get(name) or (None, None, 0)
                row[f"gap_{name}"], row[f"gap_{name}_std"] = _csv(mean), _csv(std)
            writer.writerow(row)


def plot(cells: list[Cell], task: str, path: Path) -> bool:
    """``path``: left, the five columns' test metric per device (error bars: std over seeds);
    right, the gaps per device. False (nothing written) when the task has no cell."""
    task_cells = [cell for cell in cells if cell.task == task]
    if not task_cells:
        return False
    scale = 100 if task_cells[0].unit == "pt" else 1
    figure = Figure(figsize=(12, 4.5), layout="constrained")
    FigureCanvasAgg(figure)
    left, right = figure.subplots(1, 2)
    x = np.arange(len(task_cells))
    width = 0.8 / len(COLUMNS)
    for index, column in enumerate(COLUMNS):
        stats = [cell.mean(column) for cell in task_cells]
        means = [scale * s[0] if s else np.nan for s in stats]
        errors = [scale * s[1] if s and s[1] is not None else 0.0 for s in stats]
        left.bar(
            x + (index - 2) * width,
            means,
            width,
            yerr=errors,
            label=column,
            color="black" if column == DIGITAL else None,
        )
    known = [scale * s[0] for cell in task_cells for s in map(cell.mean, COLUMNS) if s]
    if known:
        low, high = min(known), max(known)
        pad = max(0.1 * (high - low), 1e-3 * max(abs(high), 1.0))
        left.set_ylim(low - 3 * pad, high + 2 * pad)
    left.set(
        title=f"{task}: {task_cells[0].metric} by gradient mode",
        xticks=x,
        xticklabels=[cell.device for cell in task_cells],
        ylabel=task_cells[0].metric + (" (%)" if scale == 100 else ""),
    )
    left.legend(fontsize="small")
    names = ("device", "surrogate", "zo", "combined", "total")
    width = 0.8 / len(names)
    for index, name in enumerate(names):
        values = [cell.gaps[name][0] if cell.gaps.get(name) else np.nan for cell in task_cells]
        right.bar(x + (index - 2) * width, values, width, label=name)
    right.axhline(task_cells[0].target, color="grey", linestyle="--", label="target (combined)")
    right.axhline(0, color="black", linewidth=0.8)
    right.set(
        title=f"{task}: gap split (positive = worse)",
        xticks=x,
        xticklabels=[cell.device for cell in task_cells],
        ylabel="points" if scale == 100 else "% of reference loss",
    )
    right.legend(fontsize="small")
    for axes in (left, right):
        axes.grid(alpha=0.3, axis="y")
    figure.savefig(path, dpi=110)
    return True


def write(out: Path, paths=None, settings: dict[str, str] | None = None) -> list[Cell]:
    """Collect the runs under ``paths`` (default OUT/runs) and write parity.md, parity.csv and the
    per-task PNGs into ``out``."""
    cells = collect(paths or [out / "runs"])
    if not cells:
        return cells
    out.mkdir(parents=True, exist_ok=True)
    (out / "parity.md").write_text(markdown(cells, settings) + "\n", encoding="utf-8")
    write_csv(cells, out / "parity.csv")
    for task in dict.fromkeys(cell.task for cell in cells):
        plot(cells, task, out / f"parity_{task}.png")
    return cells


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="parity_study.py", description=__doc__.split("\n\n")[0])
    parser.add_argument("--tasks", nargs="+", default=list(TASK_OVERRIDES), choices=list(TASK_OVERRIDES))
    parser.add_argument("--devices", nargs="+", default=list(DEVICES))
    parser.add_argument("--seeds", nargs="+", type=int, default=[0])
    parser.add_argument(
        "--modes",
        nargs="+",
        default=list(COLUMNS),
        choices=list(COLUMNS),
        help="which of the five trainings to run (default all)",
    )
    parser.add_argument(
        "--set",
        nargs="+",
        default=[],
        metavar="KEY=VALUE",
        dest="extra",
        help="extra overrides of the hybrid runs (use a separate --out for them)",
    )
    parser.add_argument("--jobs", type=int, default=1, help="trainings run at once")
    parser.add_argument("--out", type=Path, default=Path("outputs/parity"))
    parser.add_argument(
        "--report-only",
        nargs="*",
        metavar="DIR",
        help="only write the report, from the runs under DIR (default OUT/runs)",
    )
    args = parser.parse_args(argv)
    out = args.out.resolve()
    if args.report_only is None:
        if "image_folder" in args.tasks:
            make_image_folder(out / "data" / "image_folder")
        grid = jobs(args.tasks, args.devices, args.seeds, args.modes)
        with ThreadPoolExecutor(max(1, args.jobs)) as pool:
            list(pool.map(lambda job: train(out, *job, tuple(args.extra)), grid))
    settings = (
        None
        if args.report_only
        else {  # the study's own runs: say how they were run
            task: " ".join([*overrides, *args.extra]) or "task defaults" for task, overrides in TASK_OVERRIDES.items()
        }
    )
    cells = write(out, args.report_only or None, settings)
    if not cells:
        print(f"parity: no finished runs under {out / 'runs'}", file=sys.stderr)
        return 2
    print((out / "parity.md").read_text(encoding="utf-8"))
    return 0


# ---------------------------------------------------------------------------- helpers


def _mean_std(values: list[float]) -> tuple[float, float | None] | None:
    values = [v for v in values if v is not None]
    if not values:
        return None
    return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else None


def _format(mean_std, scale: float, spec: str) -> str:
    if not mean_std:
        return "—"
    mean, std = mean_std
    if mean is None or math.isnan(mean):
        return "nan"
    text = format(scale * mean, spec)
    return text if std is None else f"{text} ± {format(scale * std, spec.lstrip('+'))}"


def _csv(value):
    return "" if value is None else value
