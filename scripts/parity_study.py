"""The accuracy-parity study's report: the gap to the digital twin split into device, surrogate and ZO.

    python scripts/parity_study.py SWEEP_DIR... [--out OUT]    # default OUT: the first SWEEP_DIR

The runs come from the multiruns of conf/experiment/study_parity*.yaml. Per task and device, each
gap is a paired difference per seed (mean ± sample std over the seeds that have both runs),
positive = worse: accuracy in points, losses in % of the better run's loss (ALGORITHM.md §6):
device = exact − digital, surrogate = exact+sm − exact, ZO = zo+exact − exact, combined = zo+sm − exact
(the method against the device's ceiling; target ≤ 0.5 pt or ≤ 1 %), total = zo+sm − digital.
Writes OUT/parity.md, OUT/parity.csv and OUT/parity_<task>.png; exit code 2 when no run finished.
"""

import argparse
import csv
import statistics
import sys
from pathlib import Path

from matplotlib.figure import Figure

from astraora.report.compare import COMPLETED, find_run_dirs, load_run

DIGITAL, MODES = "digital", ("exact", "exact+sm", "zo+exact", "zo+sm")
COLUMNS = (DIGITAL, *MODES)
GAPS = {
    "device": ("exact", DIGITAL),
    "surrogate": ("exact+sm", "exact"),
    "zo": ("zo+exact", "exact"),
    "combined": ("zo+sm", "exact"),
    "total": ("zo+sm", DIGITAL),
}
DEVICES = ("mzi", "mrr", "slm")  # table order; other devices after them
TARGETS = {"pt": 0.5, "%": 1.0}
NOTE = (
    "Columns digital … zo+sm: test metric, mean ± sample std over seeds (accuracy in %). Gaps are paired per seed: "
    "device = exact vs digital, surrogate = exact+sm vs exact, ZO = zo+exact vs exact, combined = zo+sm vs exact, "
    "total = zo+sm vs digital (= device + combined); accuracy gaps in points, loss gaps in % of the better run's loss. "
    "— = not run."
)


def gap(metric: str, worse: float, better: float) -> float:
    """How much ``worse`` trails ``better``: accuracy in points, a loss in % of ``better``."""
    return 100.0 * (better - worse) if metric.endswith("acc") else 100.0 * (worse - better) / better


def mean_std(values: list[float]) -> tuple[float, float | None] | None:
    return (statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else None) if values else None


def collect(paths) -> list[dict]:
    """One cell per (task, device): {column: {seed: metric}} (the task's digital twin in each device's
    cell, repeated runs averaged) and {gap: (mean, std, seeds)} (None where no seed has both runs)."""
    values, metrics = {}, {}
    for run in map(load_run, find_run_dirs(paths)):  # an unreadable summary.json raises: the sweep is broken
        metric = next((m for m in ("test/acc", "test/loss") if run.summary_metric(m) is not None), None)
        if run.status in (None, COMPLETED) and metric:
            metrics.setdefault(run.task, metric)
            key = (run.task, run.device, DIGITAL if run.is_digital else run.setting("mode"), run.setting("seed"))
            values.setdefault(key, []).append(run.summary_metric(metric))
    cells = []
    order = lambda cell: (cell[0], DEVICES.index(cell[1]) if cell[1] in DEVICES else len(DEVICES), cell[1])  # noqa: E731
    for task, device in sorted({(t, d) for t, d, _, _ in values if d != DIGITAL}, key=order):
        metric, cols = metrics[task], {}
        for (t, d, mode, seed), runs in values.items():
            if t == task and d in (device, DIGITAL) and mode in COLUMNS:
                cols.setdefault(mode, {})[seed] = statistics.fmean(runs)
        gaps = {}
        for name, (worse, better) in GAPS.items():
            a, b = cols.get(worse, {}), cols.get(better, {})
            diffs = [gap(metric, a[s], b[s]) for s in a if s in b]
            gaps[name] = (*mean_std(diffs), len(diffs)) if diffs else None
        own = sorted({s for c in MODES for s in cols.get(c, {})} or set(cols.get(DIGITAL, {})), key=str)
        unit = "pt" if metric.endswith("acc") else "%"
        cells.append(dict(task=task, device=device, metric=metric, unit=unit, seeds=own, values=cols, gaps=gaps))
        cells[-1]["met"] = None if gaps["combined"] is None else gaps["combined"][0] <= TARGETS[unit]
    return cells


def fmt(mean_std, scale: float = 1.0, spec: str = "+.2f") -> str:
    if not mean_std:
        return "—"
    text = format(scale * mean_std[0], spec)
    return text if mean_std[1] is None else f"{text} ± {format(scale * mean_std[1], spec.lstrip('+'))}"


def markdown(cells: list[dict]) -> str:
    """One table per task: each column's test metric (mean ± std over seeds) and the gaps."""
    lines = []
    for task in dict.fromkeys(c["task"] for c in cells):
        rows = [c for c in cells if c["task"] == task]
        unit, scale, spec = rows[0]["unit"], *((100, ".2f") if rows[0]["unit"] == "pt" else (1, ".4f"))
        labels = ("device gap", "surrogate", "ZO", "combined", "total vs digital")
        head = ["device", "seeds", *COLUMNS, *labels, f"combined ≤ {TARGETS[unit]:g} {unit}"]
        lines += [f"### {task} ({rows[0]['metric']}; gaps in {unit}, positive = worse)", ""]
        lines += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
        for c in rows:
            cols = [fmt(mean_std(list(c["values"].get(col, {}).values())), scale, spec) for col in COLUMNS]
            gaps = [fmt(c["gaps"][name] and c["gaps"][name][:2]) for name in GAPS]
            met = "—" if c["met"] is None else "yes" if c["met"] else "**no**"
            lines.append("| " + " | ".join([c["device"], ", ".join(map(str, c["seeds"])), *cols, *gaps, met]) + " |")
        lines.append("")
    return "\n".join([*lines, NOTE])


def write_csv(cells: list[dict], path: Path) -> None:
    """One row per (task, device): column means and stds, gaps in their unit; empty = not run."""
    fields = [
        "task",
        "device",
        "metric",
        "unit",
        "seeds",
        *(f"{c}{s}" for c in (*COLUMNS, *(f"gap_{g}" for g in GAPS)) for s in ("", "_std")),
        "target",
        "meets_target",
    ]
    with path.open("w", newline="", encoding="utf-8") as file:
        writer = csv.DictWriter(file, fieldnames=fields, restval="")
        writer.writeheader()
        for c in cells:
            row = {k: c[k] for k in ("task", "device", "metric", "unit")} | {"seeds": ";".join(map(str, c["seeds"]))}
            row |= {"target": TARGETS[c["unit"]], "meets_target": "" if c["met"] is None else c["met"]}
            stats = [(col, mean_std(list(c["values"].get(col, {}).values()))) for col in COLUMNS]
            for name, pair in stats + [(f"gap_{g}", c["gaps"][g] and c["gaps"][g][:2]) for g in GAPS]:
                mean, std = pair or (None, None)
                row |= {name: "" if mean is None else mean, f"{name}_std": "" if std is None else std}
            writer.writerow(row)


def plot(cells: list[dict], task: str, path: Path) -> None:
    """The gaps per device of one task, as grouped bars, with the combined gap's target."""
    rows = [c for c in cells if c["task"] == task]
    figure = Figure(figsize=(8, 4), layout="constrained")
    axes = figure.subplots()
    for i, name in enumerate(GAPS):
        heights = [c["gaps"][name][0] if c["gaps"][name] else float("nan") for c in rows]
        axes.bar([x + (i - 2) * 0.16 for x in range(len(rows))], heights, 0.16, label=name)
    axes.axhline(TARGETS[rows[0]["unit"]], color="grey", linestyle="--", label="target (combined)")
    axes.set(
        title=f"{task}: gap to digital, split (positive = worse)",
        ylabel=rows[0]["unit"],
        xticks=range(len(rows)),
        xticklabels=[c["device"] for c in rows],
    )
    axes.legend(fontsize="small")
    figure.savefig(path, dpi=110)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("dirs", nargs="+", type=Path)
    parser.add_argument("--out", type=Path)
    args = parser.parse_args(argv)
    cells, out = collect(args.dirs), args.out or args.dirs[0]
    if not cells:
        print(f"parity: no finished runs under {' '.join(map(str, args.dirs))}", file=sys.stderr)
        return 2
    out.mkdir(parents=True, exist_ok=True)
    (out / "parity.md").write_text(markdown(cells) + "\n", encoding="utf-8")
    write_csv(cells, out / "parity.csv")
    for task in dict.fromkeys(c["task"] for c in cells):
        plot(cells, task, out / f"parity_{task}.png")
    print((out / "parity.md").read_text(encoding="utf-8"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
