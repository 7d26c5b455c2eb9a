"""The query-efficiency study: the same task trained with the paper's settings and with each
query-saving option (ALGORITHM.md §9), a table of test metric against total hardware queries and
a Pareto plot per task.

    python scripts/query_study.py [--tasks digits synthetic_audio pydoc_text image_folder] [--variants ...]
                                  [--seeds 0 1 2] [--jobs 2] [--out outputs/query_study]

Every run is an ordinary ``python train.py task=X device=mzi <variant overrides> seed=S`` in
``OUT/runs/<task>/<variant>/seed<S>``; a run whose summary.json exists is not run again, so an
interrupted study continues where it stopped. Writes OUT/query_study.md, OUT/query_study.csv and
OUT/query_study.png.
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

ROOT = Path(__file__).resolve().parents[2]

# name → overrides; "paper" is the default configuration (the paper's method)
VARIANTS: dict[str, list[str]] = {
    "paper": [],
    "M50": ["zo.samples=50"],
    "M25": ["zo.samples=25"],
    "orthogonal": ["zo.orthogonal=true"],
    "antithetic": ["zo.antithetic=true"],
    "guided": ["zo.guided_k=4", "zo.guided_weight=0.5"],
    "blocks8": ["zo.blocks=8"],
    "adaptive": ["zo.adaptive_rse=0.99", "zo.min_samples=20"],
    "every2": ["zo.every=2"],
    "every4": ["zo.every=4"],
    "reuse_sketch": ["integrator.reuse_sketch=true"],
    "query_efficient": ["experiment=query_efficient"],
}
# per-task settings of the study (CPU-sized); stated in the table
TASK_OVERRIDES: dict[str, list[str]] = {
    "digits": [],
    "synthetic_audio": [
        "task.datamodule.noise=1.5",
        "task.datamodule.num_classes=8",
        "task.datamodule.clips_per_class=128",
    ],
    "pydoc_text": ["task.max_epochs=1"],
    # a second image task, held out: the generated texture folder of the parity study
    "image_folder": [
        "task.datamodule.image_size=32",
        "task.datamodule.batch_size=32",
        "task.max_epochs=8",
        "task.datamodule.test_fraction=0.2",
        "task.datamodule.num_workers=0",
    ],
}
DEFAULT_TASKS = ["digits", "synthetic_audio", "pydoc_text"]
# the metric compared, and whether higher is better
METRICS = {"classification": ("test/acc", True), "language_model": ("test/loss", False)}
TUNED_ON = "digits"


def run_dir(out: Path, task: str, variant: str, seed: int) -> Path:
    return out / "runs" / task / variant / f"seed{seed}"


def image_root(out: Path) -> Path:
    return out / "data" / "image_folder"


def command(task: str, variant: str, seed: int, directory: Path, device: str = "mzi") -> list[str]:
    data = [f"task.root={image_root(directory.parents[3])}"] if task == "image_folder" else []
    return [
        sys.executable,
        "-m",
        "astraora.train",
        f"task={task}",
        f"device={device}",
        f"seed={seed}",
        *TASK_OVERRIDES.get(task, []),
        *data,
        *VARIANTS[variant],
        f"hydra.run.dir={directory}",
        "logger=csv",
    ]


def train(out: Path, task: str, variant: str, seed: int) -> dict | None:
    """Run one training (unless its summary.json exists) and return its summary (None: failed)."""
    directory = run_dir(out, task, variant, seed)
    summary = directory / "summary.json"
    if not summary.exists():
        directory.mkdir(parents=True, exist_ok=True)
        with open(directory.parent / f"seed{seed}.log", "w") as log:
            subprocess.run(command(task, variant, seed, directory), cwd=ROOT, stdout=log, stderr=subprocess.STDOUT)
        print(f"done {task} {variant} seed {seed}", flush=True)
    return json.loads(summary.read_text()) if summary.exists() else None


def collect(out: Path, seeds: list[int] | None = None) -> list[dict]:
    """One row per (task, variant) with the mean over its finished seeds (those in ``seeds``)."""
    rows = []
    for task_dir in sorted((out / "runs").glob("*")):
        for variant in VARIANTS:
            paths = sorted((task_dir / variant).glob("seed*/summary.json"))
            if seeds is not None:
                paths = [p for p in paths if int(p.parent.name[4:]) in seeds]
            summaries = {int(p.parent.name[4:]): json.loads(p.read_text()) for p in paths}
            summaries = {k: v for k, v in summaries.items() if v.get("status", "completed") == "completed"}
            if not summaries:
                continue
            first = next(iter(summaries.values()))
            kind = "classification" if "test/acc" in first.get("metrics", {}) else "language_model"
            name, higher = METRICS[kind]
            values = {seed: float(s["metrics"][name]) for seed, s in summaries.items() if name in s.get("metrics", {})}
            if not values:
                continue
            queries = {seed: float(summaries[seed]["queries"]["total"]) for seed in values}
            rows.append(
                {
                    "task": task_dir.name,
                    "variant": variant,
                    "metric": name,
                    "higher_is_better": higher,
                    "seeds": len(values),
                    "value": sum(values.values()) / len(values),
                    "std": _std(list(values.values())),
                    "queries": sum(queries.values()) / len(queries),
                    "zo": sum(float(summaries[k]["queries"]["zo"]) for k in values) / len(values),
                    "surrogate": sum(float(summaries[k]["queries"]["surrogate"]) for k in values) / len(values),
                    "per_seed": values,
                    "per_seed_queries": queries,
                }
            )
    for row in rows:
        # paired with the paper's runs of the same seeds
        base = next((b for b in rows if b["task"] == row["task"] and b["variant"] == "paper"), None)
        common = sorted(set(row["per_seed"]) & set(base["per_seed"])) if base else []
        if common:
            paired = [row["per_seed"][k] - base["per_seed"][k] for k in common]
            row["difference"] = sum(paired) / len(paired)
            row["difference_se"] = _std(paired) / math.sqrt(len(paired))
            row["query_ratio"] = sum(row["per_seed_queries"][k] for k in common) / sum(
                base["per_seed_queries"][k] for k in common
            )
        else:
            row["difference"] = row["difference_se"] = row["query_ratio"] = math.nan
    for row in rows:
        row.pop("per_seed"), row.pop("per_seed_queries")
    return rows


def _std(values: list[float]) -> float:
    if len(values) < 2:
        return 0.0
    mean = sum(values) / len(values)
    return math.sqrt(sum((v - mean) ** 2 for v in values) / (len(values) - 1))


def markdown(rows: list[dict]) -> str:
    """The table: per task, each variant's metric (mean ± std over seeds), queries, and the query
    ratio and metric difference to the paper's settings over the same seeds (paired). Accuracy
    differences in points (×100)."""
    lines = []
    for task in dict.fromkeys(r["task"] for r in rows):
        task_rows = [r for r in rows if r["task"] == task]
        metric = task_rows[0]["metric"]
        scale, unit = (100, " pt") if metric.endswith("acc") else (1, "")
        role = "tuned on" if task == TUNED_ON else "held out (not tuned on)"
        lines += [
            f"**{task}** ({role}; `{' '.join(TASK_OVERRIDES.get(task, [])) or 'task defaults'}`, device=mzi)",
            "",
            f"| variant | seeds | {metric} | total queries | query ratio "
            f"| Δ {metric}{unit} vs paper, same seeds (± s.e.) |",
            "|---|---|---|---|---|---|",
        ]
        for r in task_rows:
            value = (
                f"{scale * r['value']:.2f} ± {scale * r['std']:.2f}"
                if scale != 1
                else f"{r['value']:.4f} ± {r['std']:.4f}"
            )
            diff = f"{scale * r['difference']:+.2f}" if scale != 1 else f"{r['difference']:+.4f}"
            if r["seeds"] > 1 and not math.isnan(r.get("difference_se", math.nan)):
                diff += f" ± {scale * r['difference_se']:.2f}" if scale != 1 else f" ± {r['difference_se']:.4f}"
            lines.append(
                f"| {r['variant']} | {r['seeds']} | {value} | {r['queries']:,.0f} | {r['query_ratio']:.3f} | {diff} |"
            )
        lines.append("")
    return "\n".join(lines)


def plot(rows: list[dict], path: Path) -> None:
    """Test metric against total queries, one panel per task, the Pareto front drawn."""
    tasks = list(dict.fromkeys(r["task"] for r in rows))
    fig = Figure(figsize=(5 * len(tasks), 4))
    FigureCanvasAgg(fig)
    for i, task in enumerate(tasks):
        ax = fig.add_subplot(1, len(tasks), i + 1)
        task_rows = sorted((r for r in rows if r["task"] == task), key=lambda r: r["queries"])
        for r in task_rows:
            style = (
                dict(marker="*", s=160, color="tab:red")
                if r["variant"] == "query_efficient"
                else dict(marker="s", s=70, color="black")
                if r["variant"] == "paper"
                else dict(marker="o", s=40, color="tab:blue")
            )
            ax.scatter(r["queries"], r["value"], zorder=3, **style)
            ax.annotate(r["variant"], (r["queries"], r["value"]), fontsize=7, xytext=(3, 3), textcoords="offset points")
        front, best = [], -math.inf
        for r in task_rows:  # fewest queries first: keep each point that beats all cheaper ones
            score = r["value"] if r["higher_is_better"] else -r["value"]
            if score > best:
                front.append(r)
                best = score
        ax.plot([r["queries"] for r in front], [r["value"] for r in front], color="tab:green", lw=1, zorder=2)
        ax.set_xscale("log")
        ax.set_xlabel("total hardware queries")
        ax.set_ylabel(task_rows[0]["metric"])
        ax.set_title(task)
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def write(out: Path, seeds: list[int] | None = None) -> list[dict]:
    rows = collect(out, seeds)
    if not rows:
        return rows
    (out / "query_study.md").write_text(markdown(rows))
    with open(out / "query_study.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    plot(rows, out / "query_study.png")
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tasks", nargs="+", default=DEFAULT_TASKS, choices=list(TASK_OVERRIDES))
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    parser.add_argument(
        "--seeds",
        nargs="+",
        type=int,
        default=None,
        help="seeds to run (default 0 1 2) and, with --report-only, to report (default: all finished)",
    )
    parser.add_argument("--jobs", type=int, default=1, help="trainings run at once")
    parser.add_argument("--out", type=Path, default=Path("outputs/query_study"))
    parser.add_argument("--report-only", action="store_true", help="write the table and plot from finished runs")
    args = parser.parse_args(argv)
    out = args.out.resolve()
    if not args.report_only:
        if "image_folder" in args.tasks:
            from astraora.report.parity import make_image_folder

            make_image_folder(image_root(out))
        jobs = [(t, v, s) for s in (args.seeds or [0, 1, 2]) for t in args.tasks for v in args.variants]
        with ThreadPoolExecutor(max(1, args.jobs)) as pool:
            list(pool.map(lambda job: train(out, *job), jobs))
    rows = write(out, args.seeds if args.report_only else None)
    if not rows:
        print(f"no finished runs under {out}", file=sys.stderr)
        return 2
    print((out / "query_study.md").read_text())
    return 0
