"""The query-efficiency study's report: test metric against total hardware queries, per variant.

    python scripts/query_study.py SWEEP_DIR... [--out OUT] [--seeds 0 1 2]    # default OUT: the first SWEEP_DIR

The runs come from the multiruns of conf/experiment/study_query*.yaml. A run's variant is named
from its settings: paper (the defaults), M<zo.samples>, every<zo.every>, reuse_sketch, and
query_efficient for M50 + every2 (conf/experiment/query_efficient.yaml). Per task, each variant's
test metric (mean ± std over seeds), mean total queries, and against paper over the same seeds:
the query ratio (sum of queries / sum of paper's) and the paired metric difference (± s.e.).
Writes OUT/query_study.md, OUT/query_study.csv and OUT/query_study.png; exit code 2 when no run finished.
"""

import argparse
import csv
import math
import statistics
import sys
from pathlib import Path

from matplotlib.figure import Figure

from astraora.report.compare import COMPLETED, find_run_dirs, load_run

DEFAULTS = {"zo.samples": 100, "zo.every": 1, "integrator.reuse_sketch": False}
NAMES = {"M50+every2": "query_efficient", "": "paper"}


def variant(run) -> str:
    """The variant's name from the settings that differ from the defaults."""
    values = {key: run.setting(key) for key in DEFAULTS}
    parts = [f"M{values['zo.samples']}", f"every{values['zo.every']}", "reuse_sketch"]
    label = "+".join(part for part, key in zip(parts, DEFAULTS, strict=True) if values[key] != DEFAULTS[key])
    return NAMES.get(label, label)


def collect(paths, seeds=None) -> list[dict]:
    """One row per (task, variant): the metric and queries over its finished seeds (those in ``seeds``)."""
    runs = {}
    for run in map(load_run, find_run_dirs(paths)):
        metric = next((m for m in ("test/acc", "test/loss") if run.summary_metric(m) is not None), None)
        seed = run.setting("seed")
        if run.status in (None, COMPLETED) and metric and (seeds is None or seed in seeds):
            runs.setdefault((run.task, variant(run)), {})[seed] = (
                metric,
                run.summary_metric(metric),
                run.queries_total,
            )
    rows = []
    for (task, name), by_seed in sorted(runs.items(), key=lambda item: (item[0][0], item[0][1] != "paper", item[0][1])):
        paper = runs.get((task, "paper"), {})
        common = sorted(set(by_seed) & set(paper))
        diffs = [by_seed[s][1] - paper[s][1] for s in common]
        values = [v for _, v, _ in by_seed.values()]
        ratio = sum(by_seed[s][2] for s in common) / sum(paper[s][2] for s in common) if common else math.nan
        rows.append(
            {
                "task": task,
                "variant": name,
                "metric": next(iter(by_seed.values()))[0],
                "seeds": len(by_seed),
                "value": statistics.fmean(values),
                "std": statistics.stdev(values) if len(values) > 1 else 0.0,
                "queries": statistics.fmean(q for _, _, q in by_seed.values()),
                "query_ratio": ratio,
                "difference": statistics.fmean(diffs) if diffs else math.nan,
                "difference_se": statistics.stdev(diffs) / math.sqrt(len(diffs)) if len(diffs) > 1 else math.nan,
            }
        )
    return rows


def markdown(rows: list[dict]) -> str:
    """Per task: each variant's metric, queries, query ratio and paired difference to paper (accuracy in points)."""
    lines = []
    for task in dict.fromkeys(r["task"] for r in rows):
        metric = next(r["metric"] for r in rows if r["task"] == task)
        scale, spec, unit = (100, ".2f", " pt") if metric.endswith("acc") else (1, ".4f", "")
        lines += [
            f"**{task}** (device=mzi)",
            "",
            f"| variant | seeds | {metric} | total queries | query ratio "
            f"| Δ {metric}{unit} vs paper, same seeds (± s.e.) |",
            "|---|---|---|---|---|---|",
        ]
        for r in (r for r in rows if r["task"] == task):
            diff = format(scale * r["difference"], "+" + spec)
            diff += "" if math.isnan(r["difference_se"]) else f" ± {format(scale * r['difference_se'], spec)}"
            value = f"{format(scale * r['value'], spec)} ± {format(scale * r['std'], spec)}"
            cells = [r["variant"], str(r["seeds"]), value, f"{r['queries']:,.0f}", f"{r['query_ratio']:.3f}", diff]
            lines.append("| " + " | ".join(cells) + " |")
        lines.append("")
    return "\n".join(lines)


def plot(rows: list[dict], path: Path) -> None:
    """Test metric against total queries, one panel per task (log scale), the variants labelled."""
    tasks = list(dict.fromkeys(r["task"] for r in rows))
    figure = Figure(figsize=(5 * len(tasks), 4), layout="constrained")
    for axes, task in zip(figure.subplots(1, len(tasks), squeeze=False)[0], tasks, strict=True):
        for r in (r for r in rows if r["task"] == task):
            style = {"paper": ("s", "black"), "query_efficient": ("*", "tab:red")}.get(r["variant"], ("o", "tab:blue"))
            axes.scatter(r["queries"], r["value"], marker=style[0], color=style[1], zorder=3)
            axes.annotate(
                r["variant"], (r["queries"], r["value"]), fontsize=7, xytext=(3, 3), textcoords="offset points"
            )
        axes.set(xscale="log", xlabel="total hardware queries", ylabel=r["metric"], title=task)
        axes.grid(alpha=0.3)
    figure.savefig(path, dpi=120)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("dirs", nargs="+", type=Path)
    parser.add_argument("--out", type=Path)
    parser.add_argument("--seeds", nargs="+", type=int, help="report these seeds only (default: all finished)")
    args = parser.parse_args(argv)
    rows, out = collect(args.dirs, args.seeds), args.out or args.dirs[0]
    if not rows:
        print(f"query_study: no finished runs under {' '.join(map(str, args.dirs))}", file=sys.stderr)
        return 2
    out.mkdir(parents=True, exist_ok=True)
    (out / "query_study.md").write_text(markdown(rows), encoding="utf-8")
    with (out / "query_study.csv").open("w", newline="", encoding="utf-8") as file:
        writer = csv.DictWriter(file, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    plot(rows, out / "query_study.png")
    print(markdown(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
