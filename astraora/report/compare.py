"""Compare hybrid runs with their digital baselines: a markdown table per task, a CSV, plots and a
self-contained HTML report.

Works offline from what every run directory holds (docs/CONTRACTS.md): ``summary.json``,
``metrics.csv`` (Lightning's CSVLogger: a sorted union of keys as header, one row per logging
call, empty cells for metrics not logged in that row) and, when present, ``.hydra/config.yaml``.
Runs share one row only when their whole resolved config is the same but for the seed (and for
keys that do not change what is trained: output paths, logger, resume, thread count, progress bar);
the row then shows mean ± std over them. Rows that look alike but differ elsewhere in their config
(e.g. ``trainer.max_epochs``) name the keys they differ in.

The gap to digital is in the units of docs/results.md's tables: accuracy-like metrics in percentage
points, loss-like ones (loss, perplexity, bits per character) in % of the digital run's value;
positive = the hybrid is worse. It is taken against the digital run of the same task and seed with
the same training budget (epoch, step and batch limits); where only a digital run of another budget
exists the gap is flagged (column "budget vs digital" and a warning), or left out with
``--strict-budget``.

Usage: ``python scripts/compare.py DIR... [--out OUTDIR] [--metric val/acc] [--strict-budget]``.

The studies' reports (scripts/parity_study.py, query_study.py, stale_surrogate_study.py) use the functions at
the end of this module: paired differences by seed, the parity decomposition, query ratios, their tables and plots.
"""

from __future__ import annotations

import argparse
import base64
import csv
import html
import io
import json
import math
import re
import statistics
import sys
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import yaml
from matplotlib import colormaps
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.lines import Line2D
from matplotlib.ticker import NullFormatter
from omegaconf import DictConfig, OmegaConf

SUMMARY = "summary.json"
METRICS = "metrics.csv"
MISSING = "—"
DIGITAL = "digital"
COMPLETED = "completed"
MAIN_METRICS = ("val/acc", "val/ppl", "val/loss")
HIGHER_IS_BETTER = ("acc", "accuracy", "f1")
# The gap's unit (as in docs/results.md's tables): accuracy-like metrics in percentage points, the rest
# (loss, perplexity, bits per character) in % of the digital run's value.
POINTS, PERCENT = "pt", "%"
# What bounds how long a run trains (None = no limit): a gap is only taken between equal budgets.
BUDGET_KEYS = (
    "trainer.max_epochs",
    "trainer.max_steps",
    "trainer.limit_train_batches",
    "trainer.limit_val_batches",
    "trainer.limit_test_batches",
    "trainer.accumulate_grad_batches",
)

# What the plots tell apart; all but the device are hybrid-only (None for digital runs).
SETTING_FIELDS = ("device", "mode", "integrator", "rank", "M", "M_sm")
# What makes two runs one row of the table (the seed aside): a failed run is not averaged in, and
# runs whose configs differ anywhere else (config_id) are not either.
CONFIG_FIELDS = (*SETTING_FIELDS, "status")
GROUP_FIELDS = (*CONFIG_FIELDS, "config_id")
# Config keys that do not change what a run trains: left out when runs are grouped.
UNGROUPED_KEYS = (
    "seed",
    "resume",
    "paths",
    "hydra",
    "logger",
    "cpu_threads",
    "optimized_metric",
    "trainer.enable_progress_bar",
    "trainer.enable_model_summary",
)
# Interpolations into these resolve to per-run values (the seed, the run directory, the clock).
PER_RUN_REFERENCES = re.compile(r"\$\{(seed|paths\.|hydra:|now:)")
# Per-run numbers, averaged over seeds; the value is the format of the mean in the markdown table.
NUMBER_FORMATS = {
    "final_val": ".4g",
    "best_val": ".4g",
    "test": ".4g",
    "gap": "+.2f",
    "queries_total": ",.0f",
    "queries_per_step": ".4g",
    "surrogate_rel_error": ".3g",
}
CSV_COLUMNS = (
    "task",
    "metric",
    "test_metric",
    *CONFIG_FIELDS,
    "differs",
    "seeds",
    "n_runs",
    *(column for name in NUMBER_FORMATS for column in (name, f"{name}_std")),
    "gap_unit",
    "budget_vs_digital",
    "run_dirs",
)
# Markers tell the seeds of one configuration apart in the line plots (colour = configuration);
# in the scatter of metric vs queries they tell configurations apart.
SEED_MARKERS = ("o", "s", "^", "D", "v", "P", "X", "*", "<", ">")
SETTING_MARKERS = ("o", "s", "^", "D", "v", "P", "X", "*", "<", ">", "h", "p")
DIGITAL_SHADES = ("black", "dimgray", "darkgray")


@dataclass
class Run:
    """One run directory: its summary, its Hydra config (or None) and its logged history."""

    path: Path
    summary: dict
    hydra_config: DictConfig | None
    history: dict[str, tuple[np.ndarray, np.ndarray]]  # metric name -> (steps, values)

    def setting(self, key: str, config_key: str | None = None):
        """``key`` (dotted) from summary.json; else ``config_key`` (default ``key``) from the
        summary's ``config`` subset, then from ``.hydra/config.yaml``; None when nowhere."""
        config_key = config_key or key
        for value in (_dig(self.summary, *key.split(".")), _dig(self.summary, "config", *config_key.split("."))):
            if value is not None:
                return _scalar(value)
        if self.hydra_config is None:
            return None
        return _scalar(OmegaConf.select(self.hydra_config, config_key, default=None, throw_on_resolution_failure=False))

    @property
    def task(self) -> str:
        task = self.setting("task", "task.name")
        return MISSING if task is None else str(task)

    @property
    def device(self):
        return self.setting("device", "device.name")

    @property
    def is_digital(self) -> bool:
        return self.device == DIGITAL

    @property
    def status(self):
        return _scalar(self.summary.get("status"))

    def summary_metric(self, name: str) -> float | None:
        """A metric from the summary's ``metrics`` block."""
        return _number(_dig(self.summary, "metrics", name))

    def last(self, name: str) -> float | None:
        """The last logged value of ``name`` in metrics.csv."""
        if name not in self.history:
            return None
        return float(self.history[name][1][-1])

    def best(self, name: str) -> float | None:
        """The best logged value of ``name`` (max for accuracy-like metrics, min otherwise)."""
        if name not in self.history:
            return None
        values = self.history[name][1]
        if np.isnan(values).all():
            return math.nan
        return float(np.nanmax(values) if higher_is_better(name) else np.nanmin(values))

    def grouping_config(self) -> dict:
        """The run's config as flat ``key: value`` pairs (resolved), without the seed and the keys
        of :data:`UNGROUPED_KEYS`; from ``.hydra/config.yaml``, else the summary's config subset."""
        if self.hydra_config is None:
            return {f"config.{key}": value for key, value in _flatten(self.summary.get("config") or {}).items()}
        flat = {}
        for key, raw in _flatten(OmegaConf.to_container(self.hydra_config, resolve=False)).items():
            if _ungrouped(key) or (isinstance(raw, str) and PER_RUN_REFERENCES.search(raw)):
                continue
            flat[key] = (
                _scalar(OmegaConf.select(self.hydra_config, key, default=None, throw_on_resolution_failure=False))
                if isinstance(raw, str) and "${" in raw
                else raw
            )
        return flat

    @property
    def queries_total(self) -> float | None:
        total = _number(_dig(self.summary, "queries", "total"))
        return self.last("queries/total") if total is None else total

    @property
    def surrogate_rel_error(self) -> float | None:
        error = _number(_dig(self.summary, "surrogate", "rel_error"))
        return self.last("surrogate/rel_error") if error is None else error

    def budget(self) -> dict:
        """What bounded the run's training: the Trainer's epoch, step and batch limits of
        :data:`BUDGET_KEYS` from ``.hydra/config.yaml`` (None = no limit); without that file,
        the ``steps`` summary.json says the run took (empty when unknown)."""
        if self.hydra_config is not None:
            return {key: self.setting(key) for key in BUDGET_KEYS}
        steps = _number(self.summary.get("steps"))
        return {} if steps is None else {"steps": int(steps)}


@dataclass
class TaskComparison:
    """All runs of one task: per-run records (with their runs) and the grouped table rows."""

    task: str
    metric: str
    entries: list[tuple[Run, dict]]
    rows: list[dict]
    strict_budget: bool = False

    @property
    def test_metric(self) -> str:
        return test_metric_name(self.metric)

    @property
    def gap_unit(self) -> str:
        return gap_unit(self.metric)

    def budget_warning(self) -> str | None:
        """One line on the hybrid runs whose digital run (same seed) had another training budget;
        None when there are none."""
        flagged = [record for _, record in self.entries if record["budget"]]
        if not flagged:
            return None
        differences = "; ".join(dict.fromkeys(record["budget"].removeprefix("refused: ") for record in flagged))
        action = (
            "their gap is left out (--strict-budget)"
            if self.strict_budget
            else "their gap is taken against it anyway and flagged in 'budget vs digital' "
            "(--strict-budget leaves it out)"
        )
        return (
            f"{self.task}: {len(flagged)} hybrid run(s) have no digital run of the same training budget "
            f"and seed ({differences}): {action}"
        )


# ---------------------------------------------------------------------------- reading runs


def find_run_dirs(paths: Iterable[str | Path]) -> list[Path]:
    """Every directory under ``paths`` (run dirs or multirun dirs, searched recursively) that
    holds a summary.json, without duplicates, in natural order (``2/`` before ``10/``); paths that
    are not directories contribute nothing."""
    found: dict[Path, Path] = {}
    for root in map(Path, paths):
        for summary in root.rglob(SUMMARY) if root.is_dir() else ():
            if summary.is_file():
                found.setdefault(summary.parent.resolve(), summary.parent)
    return sorted(found.values(), key=_natural_key)


def load_run(run_dir: Path) -> Run:
    """Read one run directory; raises OSError or ValueError when summary.json is unusable."""
    summary = json.loads((run_dir / SUMMARY).read_text(encoding="utf-8"))
    if not isinstance(summary, dict):
        raise ValueError(f"{run_dir / SUMMARY} is not a JSON object")
    metrics_csv = _find_metrics_csv(run_dir)
    history = read_metrics_csv(metrics_csv) if metrics_csv else {}
    return Run(run_dir, summary, _load_hydra_config(run_dir), history)


def read_metrics_csv(path: Path) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Each metric of a CSVLogger file as (steps, values) in file order; empty cells are skipped.
    A row without a usable ``step`` uses its row index."""
    points: dict[str, list[tuple[float, float]]] = {}
    with path.open(newline="", encoding="utf-8") as file:
        for index, row in enumerate(csv.DictReader(file)):
            step = _number(row.get("step"))
            for name, cell in row.items():
                value = _number(cell)
                if name in (None, "step", "epoch") or value is None:
                    continue
                points.setdefault(name, []).append((index if step is None else step, value))
    return {name: tuple(np.array(column) for column in zip(*pairs, strict=True)) for name, pairs in points.items()}


def _find_metrics_csv(run_dir: Path) -> Path | None:
    """``run_dir/metrics.csv``; else the last one below it (e.g. ``csv/version_0/``) that does not
    belong to a nested run directory."""
    direct = run_dir / METRICS
    if direct.is_file():
        return direct
    own = [path for path in run_dir.rglob(METRICS) if not _in_nested_run(path, run_dir)]
    return max(own, key=_natural_key) if own else None


def _in_nested_run(path: Path, run_dir: Path) -> bool:
    """Whether a folder between ``run_dir`` (excluded) and ``path`` holds its own summary.json."""
    folder = path.parent.relative_to(run_dir)
    return any((run_dir / part / SUMMARY).is_file() for part in [folder, *folder.parents][:-1])


def _load_hydra_config(run_dir: Path) -> DictConfig | None:
    """``.hydra/config.yaml`` unresolved (values are resolved one by one when looked up)."""
    path = run_dir / ".hydra" / "config.yaml"
    if not path.is_file():
        return None
    try:
        config = OmegaConf.load(path)
    except (OSError, yaml.YAMLError) as error:
        _warn(f"ignoring unreadable {path}: {error}")
        return None
    return config if isinstance(config, DictConfig) else None


# ---------------------------------------------------------------------------- the comparison


def higher_is_better(metric: str) -> bool:
    """Accuracy-like metrics improve upwards; loss and perplexity downwards."""
    return metric.rsplit("/", 1)[-1] in HIGHER_IS_BETTER


def gap_unit(metric: str) -> str:
    """The unit of the gap on ``metric``: percentage points (accuracy-like) or % of the digital value."""
    return POINTS if higher_is_better(metric) else PERCENT


def gap_in_units(metric: str, hybrid: float, digital: float) -> float:
    """How much the hybrid trails the digital run (positive = hybrid worse): 100 × (digital − hybrid)
    points for accuracy-like metrics, 100 × (hybrid − digital) / digital % for loss-like ones."""
    if higher_is_better(metric):
        return 100.0 * (digital - hybrid)
    return 100.0 * (hybrid - digital) / digital if digital else math.nan


def test_metric_name(metric: str) -> str:
    """``val/acc`` -> ``test/acc``."""
    return "test/" + metric.split("/", 1)[-1]


def choose_metric(runs: list[Run], requested: str | None) -> str:
    """``requested`` when any run of the task has it, else the first of val/acc, val/ppl, val/loss
    that any run has (``acc`` is short for ``val/acc``)."""
    if requested and "/" not in requested:
        requested = f"val/{requested}"
    candidates = ([requested] if requested else []) + list(MAIN_METRICS)
    for metric in candidates:
        if any(
            metric in run.history
            or run.summary_metric(metric) is not None
            or run.summary_metric(test_metric_name(metric)) is not None
            for run in runs
        ):
            return metric
    return candidates[0]


def compare(runs: list[Run], metric: str | None = None, strict_budget: bool = False) -> list[TaskComparison]:
    """Group ``runs`` by task and build each task's table rows against its digital runs.
    ``strict_budget``: leave out the gap of a hybrid run whose only digital runs (same seed) had
    another training budget, instead of taking it and flagging it."""
    by_task: dict[str, list[Run]] = {}
    for run in runs:
        by_task.setdefault(run.task, []).append(run)
    comparisons = []
    for task, task_runs in sorted(by_task.items()):
        task_metric = choose_metric(task_runs, metric)
        baseline = digital_baseline(task_runs, test_metric_name(task_metric))
        entries = sorted(
            ((run, run_record(run, task_metric, baseline, strict_budget)) for run in task_runs),
            key=lambda entry: (_config_order(entry[1]), _order(entry[1]["seed"])),
        )
        comparisons.append(
            TaskComparison(task, task_metric, entries, group_rows([r for _, r in entries]), strict_budget)
        )
    return comparisons


def digital_baseline(runs: list[Run], test_metric: str) -> dict[object, list[tuple[Run, float]]]:
    """seed -> the completed digital runs of that seed with their test metric."""
    candidates: dict = {}
    for run in runs:
        value = run.summary_metric(test_metric)
        if run.is_digital and run.status in (None, COMPLETED) and value is not None:
            candidates.setdefault(run.setting("seed"), []).append((run, value))
    return candidates


def budget_difference(run: Run, reference: Run) -> str:
    """How ``run``'s training budget differs from ``reference``'s, as ``key value vs value`` for each
    limit both configs know ('' when equal or not comparable); where one of them has no
    ``.hydra/config.yaml``, the steps both summaries report are compared instead."""
    mine, theirs = run.budget(), reference.budget()
    if not mine.keys() & theirs.keys():
        steps = [_number(side.summary.get("steps")) for side in (run, reference)]
        mine, theirs = ({"steps": int(value)} if value is not None else {} for value in steps)
    return ", ".join(
        f"{key} {_budget_value(mine[key])} vs {_budget_value(theirs[key])}"
        for key in sorted(mine.keys() & theirs.keys())
        if mine[key] != theirs[key]
    )


def baseline_for(run: Run, candidates: list[tuple[Run, float]], strict_budget: bool) -> tuple[float | None, str]:
    """(the digital test metric ``run`` is compared with, the budget flag): the mean over the
    digital runs of the same budget, flag ''; where all differ in budget, the mean over all of
    them and a flag naming the difference, or (None, 'refused: ...') under ``strict_budget``."""
    if not candidates:
        return None, ""
    differences = [budget_difference(run, reference) for reference, _ in candidates]
    same = [value for (_, value), difference in zip(candidates, differences, strict=True) if not difference]
    if same:
        return statistics.fmean(same), ""
    flag = "; ".join(dict.fromkeys(differences))
    if strict_budget:
        return None, f"refused: {flag}"
    return statistics.fmean(value for _, value in candidates), flag


def run_record(run: Run, metric: str, baseline: dict, strict_budget: bool = False) -> dict:
    """One run as a flat record: its configuration fields and its numbers (None = unknown).
    ``gap`` (in :func:`gap_unit`) is positive when the hybrid is worse than the digital run with
    the same seed; ``budget`` flags a digital run of another training budget ('' when equal)."""
    hybrid = not run.is_digital
    seed = run.setting("seed")
    test = run.summary_metric(test_metric_name(metric))
    reference, budget = baseline_for(run, baseline.get(seed, []), strict_budget) if hybrid else (None, "")
    gap = None
    if test is not None and reference is not None:
        gap = gap_in_units(metric, test, reference)
    final = run.last(metric)
    queries = run.queries_total
    steps = _number(run.summary.get("steps"))
    mode = run.setting("mode") if hybrid else None
    # what the mode uses: ZO samples M for zo+…, a surrogate (rank, integrator) for …+sm
    uses_zo, uses_surrogate = str(mode).startswith("zo"), str(mode).endswith("+sm")
    integrator = run.setting("integrator", "integrator.name") if uses_surrogate else None
    config = run.grouping_config()
    return {
        "device": run.device,
        "mode": mode,
        "integrator": integrator,
        "rank": run.setting("surrogate.rank") if uses_surrogate else None,
        "M": run.setting("zo.samples") if uses_zo else None,
        "M_sm": run.setting("integrator.samples") if integrator == "psi_implicit" else None,
        "status": run.status,
        "config": config,
        "config_id": repr(sorted(config.items(), key=lambda item: item[0])),
        "seed": seed,
        "run_dir": str(run.path),
        "final_val": run.summary_metric(metric) if final is None else final,
        "best_val": run.best(metric),
        "test": test,
        "gap": gap,
        "budget": budget,
        "queries_total": queries,
        "queries_per_step": queries / steps if queries is not None and steps else None,
        "surrogate_rel_error": run.surrogate_rel_error,
    }


def group_rows(records: list[dict]) -> list[dict]:
    """One row per configuration, in the order of ``records``: seeds and run dirs listed, numbers
    as (mean, std or None)."""
    groups: dict[tuple, list[dict]] = {}
    for record in records:
        groups.setdefault(tuple(record[name] for name in GROUP_FIELDS), []).append(record)
    rows = []
    for members in groups.values():
        row = {name: members[0][name] for name in (*GROUP_FIELDS, "config")}
        row["seeds"] = sorted((m["seed"] for m in members if m["seed"] is not None), key=_order)
        row["run_dirs"] = [m["run_dir"] for m in members]
        row["budget"] = "; ".join(dict.fromkeys(m["budget"] for m in members if m["budget"]))
        row.update({name: _mean_std([m[name] for m in members]) for name in NUMBER_FORMATS})
        rows.append(row)
    for row in rows:
        row["differs"] = _differences(row, rows)
    return rows


def _differences(row: dict, rows: list[dict]) -> str:
    """``key=value`` for the config keys in which ``row`` differs from the rows that show the same
    device, mode, rank, M, M_sm and status (and would otherwise look like it); '' when none does."""
    alike = [other for other in rows if other is not row and all(other[name] == row[name] for name in CONFIG_FIELDS)]
    if not alike:
        return ""
    keys = sorted(
        {
            key
            for other in alike
            for key in set(row["config"]) | set(other["config"])
            if row["config"].get(key, MISSING) != other["config"].get(key, MISSING)
        }
    )
    return " ".join(f"{key}={row['config'].get(key, MISSING)}" for key in keys)


# ---------------------------------------------------------------------------- output


def table(comparison: TaskComparison) -> tuple[str, list[str], list[list[str]], list[str]]:
    """The task's table as (heading, header, rows of cells, footnotes): what the markdown and the
    HTML report show. Optional columns appear only where a row needs them."""
    metric, test, unit = comparison.metric, comparison.test_metric, comparison.gap_unit
    best = "max" if higher_is_better(metric) else "min"
    differs = any(row["differs"] for row in comparison.rows)
    flagged = any(row["budget"] for row in comparison.rows)
    header = [
        "device",
        "mode",
        "integrator",
        "rank",
        "M",
        "M_sm",
        *(["config differs in"] if differs else []),
        "seed(s)",
        "status",
        f"final {metric}",
        f"best {metric}",
        test,
        f"gap {test} ({unit}) ¹",
        *(["budget vs digital ²"] if flagged else []),
        "queries",
        "queries/step",
        "surrogate rel. error",
    ]
    cells = []
    for row in comparison.rows:
        line = [_cell(row[name]) for name in SETTING_FIELDS]
        line += [row["differs"] or MISSING] if differs else []
        line += [", ".join(map(str, row["seeds"])) or MISSING, _cell(row["status"])]
        for name, spec in NUMBER_FORMATS.items():
            line.append(_format_number(row[name], spec))
            if name == "gap" and flagged:
                line.append(f"⚠ {row['budget']}" if row["budget"] else MISSING)
        cells.append(line)
    notes = [
        f"final = last logged {metric} in metrics.csv (summary.json's value if none was logged); "
        f"best = {best} over logged steps; {test} from summary.json; queries/step = total queries / steps."
    ]
    if any(row["device"] == DIGITAL for row in comparison.rows):
        formula = (
            "100 × (digital − hybrid), in percentage points"
            if unit == POINTS
            else "100 × (hybrid − digital) / digital, in % of the digital run's value"
        )
        notes.append(
            f"¹ gap on {test} = {formula}, against the digital run of the same task, seed and training "
            "budget (mean over the seeds that have one): positive = hybrid worse."
        )
    else:
        notes.append("¹ gap: no digital run of this task to compare with (run it with device=digital).")
    if flagged:
        notes.append(
            "² ⚠ no digital run of the same seed had the same training budget (epoch, step or batch "
            "limits: this run vs digital); "
            + (
                "the gap is left out (--strict-budget)."
                if comparison.strict_budget
                else "the gap is against a digital run that trained differently: rerun the baseline with "
                "the same budget, or pass --strict-budget to leave such gaps out."
            )
        )
    if any(len(row["run_dirs"]) > 1 for row in comparison.rows):
        notes.append("Rows of several runs (same config, different seeds): mean ± sample std over the runs.")
    if differs:
        notes.append("config differs in: the keys in which rows that look alike differ (they are not pooled).")
    notes.append("— = not available or not applicable to the row's mode.")
    heading = f"{comparison.task} (main metric {metric}, {len(comparison.entries)} runs)"
    return heading, header, cells, notes


def markdown_table(comparison: TaskComparison) -> str:
    """The task's table, with a heading and footnotes that say what each number is."""
    heading, header, cells, notes = table(comparison)
    lines = [f"## {heading}", "", "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(line) + " |" for line in cells]
    return "\n".join([*lines, "", *notes])


def write_csv(comparisons: list[TaskComparison], path: Path) -> None:
    """All tables in one CSV: raw numbers, mean and std in separate columns, empty = unknown; the
    gap in ``gap_unit`` (pt or %), ``budget_vs_digital`` the budget flag ('' = same budget)."""
    with path.open("w", newline="", encoding="utf-8") as file:
        writer = csv.DictWriter(file, fieldnames=CSV_COLUMNS)
        writer.writeheader()
        for comparison in comparisons:
            for row in comparison.rows:
                record = {
                    "task": comparison.task,
                    "metric": comparison.metric,
                    "test_metric": comparison.test_metric,
                    "n_runs": len(row["run_dirs"]),
                    "seeds": ";".join(map(str, row["seeds"])),
                    "run_dirs": ";".join(row["run_dirs"]),
                    "differs": row["differs"],
                    "gap_unit": comparison.gap_unit,
                    "budget_vs_digital": row["budget"],
                }
                record.update({name: _csv_value(row[name]) for name in CONFIG_FIELDS})
                for name in NUMBER_FORMATS:
                    mean, std = row[name] or (None, None)
                    record[name], record[f"{name}_std"] = _csv_value(mean), _csv_value(std)
                writer.writerow(record)


def render_plots(comparison: TaskComparison) -> dict[str, bytes]:
    """The task's plots (those it has data for) as PNG bytes, by file name."""
    stem = re.sub(r"[^A-Za-z0-9._-]+", "_", comparison.task)
    plots = {
        f"{stem}_metric_vs_step.png": plot_metric_vs_step,
        f"{stem}_surrogate_rel_error.png": plot_surrogate_error,
        f"{stem}_metric_vs_queries.png": plot_metric_vs_queries,
    }
    styles = _styles(comparison)
    rendered = {}
    for name, plot in plots.items():
        figure = plot(comparison, styles)
        if figure is not None:
            buffer = io.BytesIO()
            figure.savefig(buffer, format="png", dpi=120)
            rendered[name] = buffer.getvalue()
    return rendered


def save_plots(comparison: TaskComparison, out_dir: Path) -> list[Path]:
    """Write the task's PNGs (those it has data for) and return their paths."""
    written = []
    for name, png in render_plots(comparison).items():
        (out_dir / name).write_bytes(png)
        written.append(out_dir / name)
    return written


def plot_metric_vs_step(comparison: TaskComparison, styles: dict) -> Figure | None:
    """The main metric against the step, every hybrid configuration beside the digital run(s);
    colour = configuration, marker = seed."""
    metric = comparison.metric
    curves = [(run, record) for run, record in comparison.entries if metric in run.history]
    if not curves:
        return None
    has_digital = any(record["device"] == DIGITAL for _, record in curves)
    title = f"{comparison.task}: {metric}" + (", hybrid vs digital" if has_digital else "")
    figure, axes = _figure(title, "step", metric)
    seeds = _seed_markers(comparison)
    for run, record in curves:
        steps, values = run.history[metric]
        axes.plot(
            steps,
            values,
            color=styles[_key(record)]["color"],
            marker=seeds[record["seed"]],
            markevery=_mark_every(steps, seeds, record["seed"]),
            markersize=4,
            alpha=0.85,
            linewidth=2.0 if record["device"] == DIGITAL else 1.2,
        )
    _legend(axes, styles, [record for _, record in curves], seeds)
    return figure


def plot_surrogate_error(comparison: TaskComparison, styles: dict) -> Figure | None:
    """Surrogate relative error against the step (solid) and the best rank-r error, the truncated
    SVD of the device's matrix (dotted); colour = configuration, marker = seed. Every point of a
    short run is marked; log y only when the values span a decade."""
    lines = []
    for run, record in comparison.entries:
        for name, linestyle in (("surrogate/rel_error", "-"), ("surrogate/rel_error_best_rank_r", ":")):
            if name in run.history:
                steps, values = run.history[name]
                keep = np.isfinite(values) & (values > 0)
                if keep.any():
                    lines.append((record, steps[keep], values[keep], linestyle))
    if not lines:
        return None
    figure, axes = _figure(f"{comparison.task}: surrogate relative error", "step", "‖Â − A‖_F / ‖A‖_F")
    seeds = _seed_markers(comparison)
    for record, steps, values, linestyle in lines:
        axes.plot(
            steps,
            values,
            linestyle=linestyle,
            color=styles[_key(record)]["color"],
            marker=seeds[record["seed"]],
            markevery=_mark_every(steps, seeds, record["seed"]),
            markersize=4,
            alpha=0.85,
        )
    every = np.concatenate([values for _, _, values, _ in lines])
    if every.max() > 10 * every.min():
        axes.set_yscale("log")
    kinds = [Line2D([], [], color="black", linestyle="-", label="surrogate Â (solid)")]
    if any(linestyle == ":" for *_, linestyle in lines):
        kinds.append(Line2D([], [], color="black", linestyle=":", label="best rank-r error, SVD of A (dotted)"))
    _legend(axes, styles, [record for record, *_ in lines], seeds, kinds)
    return figure


def plot_metric_vs_queries(comparison: TaskComparison, styles: dict) -> Figure | None:
    """Final metric against total queries, one point per hybrid run (log x): marker and colour per
    configuration, half transparent, '×n' where n runs fall on one point; digital runs as
    horizontal lines (their mean)."""
    metric = comparison.metric
    points = [
        record
        for _, record in comparison.entries
        if record["device"] != DIGITAL and record["final_val"] is not None and (record["queries_total"] or 0) > 0
    ]
    if not points:
        return None
    figure, axes = _figure(f"{comparison.task}: final {metric} vs device queries", "total queries", f"final {metric}")
    by_config: dict[tuple, list[dict]] = {}
    for record in points:
        by_config.setdefault(_key(record), []).append(record)
    for key, records in by_config.items():
        style = styles[key]
        axes.scatter(
            [r["queries_total"] for r in records],
            [r["final_val"] for r in records],
            s=55,
            alpha=0.55,
            color=style["color"],
            marker=style["marker"],
            edgecolors="black",
            linewidths=0.6,
            label=f"{style['label']} ({_runs(len(records))})",
        )
    coincide: dict[tuple, int] = {}
    for record in points:
        spot = (float(f"{record['queries_total']:.4g}"), float(f"{record['final_val']:.4g}"))
        coincide[spot] = coincide.get(spot, 0) + 1
    for (x, y), count in coincide.items():
        if count > 1:
            axes.annotate(f"×{count}", (x, y), textcoords="offset points", xytext=(7, 5), fontsize="small")
    digital: dict[tuple, list[float]] = {}
    for _, record in comparison.entries:
        if record["device"] == DIGITAL and record["final_val"] is not None:
            digital.setdefault(_key(record), []).append(record["final_val"])
    for key, values in digital.items():
        axes.axhline(
            statistics.fmean(values),
            color=styles[key]["color"],
            linestyle="--",
            label=f"{styles[key]['label']} (mean of {_runs(len(values))})",
        )
    axes.set_xscale("log")
    _place_legend(figure, *axes.get_legend_handles_labels())
    return figure


def html_report(
    comparisons: list[TaskComparison], images: dict[str, dict[str, bytes]], warnings: list[str], sources: list[str]
) -> str:
    """One self-contained HTML page: every task's table, footnotes and plots (PNG embedded as
    base64 data URIs), the warnings first; no external file, script or style sheet."""

    def cell(tag: str, text: str) -> str:
        return f"<{tag}>{html.escape(text)}</{tag}>"

    parts = [
        "<!DOCTYPE html>",
        '<html lang="en">',
        "<head>",
        '<meta charset="utf-8">',
        "<title>astraora: hybrid runs vs digital baselines</title>",
        f"<style>{_HTML_STYLE}</style>",
        "</head>",
        "<body>",
        "<h1>astraora: hybrid runs vs digital baselines</h1>",
        f"<p>Runs read from {', '.join(f'<code>{html.escape(str(s))}</code>' for s in sources)}.</p>",
    ]
    if warnings:
        parts.append('<div class="warning">' + "".join(cell("p", f"⚠ {line}") for line in warnings) + "</div>")
    for comparison in comparisons:
        heading, header, cells, notes = table(comparison)
        flag_column = header.index("budget vs digital ²") if "budget vs digital ²" in header else None
        parts += [
            "<section>",
            cell("h2", heading),
            "<table>",
            "<thead><tr>" + "".join(cell("th", name) for name in header) + "</tr></thead>",
            "<tbody>",
        ]
        for line in cells:
            flagged = flag_column is not None and line[flag_column] != MISSING
            parts.append(
                ('<tr class="flagged">' if flagged else "<tr>") + "".join(cell("td", text) for text in line) + "</tr>"
            )
        parts += ["</tbody>", "</table>", '<div class="notes">' + "".join(cell("p", note) for note in notes) + "</div>"]
        for name, png in images.get(comparison.task, {}).items():
            data = base64.b64encode(png).decode("ascii")
            parts.append(
                f'<figure><img alt="{html.escape(name)}" src="data:image/png;base64,{data}">'
                f"{cell('figcaption', name)}</figure>"
            )
        parts.append("</section>")
    parts += ["</body>", "</html>"]
    return "\n".join(parts) + "\n"


_HTML_STYLE = (
    "body{font-family:system-ui,sans-serif;margin:2em;max-width:110em;color:#222}"
    "table{border-collapse:collapse;font-size:0.85em;margin:0.5em 0}"
    "th,td{border:1px solid #bbb;padding:0.25em 0.5em;text-align:right;white-space:nowrap}"
    "th{background:#eee}td:nth-child(-n+3){text-align:left}"
    "tr.flagged td{background:#fff3cd}"
    ".warning{border-left:4px solid #d39e00;background:#fff8e1;padding:0.3em 1em}"
    ".notes{font-size:0.85em;color:#444}figure{display:inline-block;margin:0.5em}"
    "img{max-width:100%;border:1px solid #ddd}figcaption{font-size:0.8em;color:#555}"
)


# ---------------------------------------------------------------------------- command line


def main(argv: list[str] | None = None) -> int:
    """Print the tables; write comparison.csv, the plots and report.html; 2 when no run directory
    is found."""
    parser = argparse.ArgumentParser(prog="compare.py", description=__doc__.split("\n\n")[0])
    parser.add_argument("dirs", nargs="+", metavar="DIR", help="run directories or multirun directories")
    parser.add_argument("--out", type=Path, help="output folder (default: DIR if one, else ./compare_out)")
    parser.add_argument(
        "--metric", help="main metric, e.g. val/acc (default: val/acc, val/ppl or val/loss, whichever the task logged)"
    )
    parser.add_argument(
        "--strict-budget",
        action="store_true",
        help="leave out the gap of a hybrid run whose digital run (same seed) had another "
        "training budget (epoch, step or batch limits) instead of flagging it",
    )
    args = parser.parse_args(argv)

    runs = [run for run in map(_load_or_warn, find_run_dirs(args.dirs)) if run is not None]
    if not runs:
        print(f"compare: no run directories (with a {SUMMARY}) found under {' '.join(args.dirs)}", file=sys.stderr)
        return 2
    not_dirs = [path for path in args.dirs if not Path(path).is_dir()]
    if not_dirs:
        _warn(f"not a directory, skipped: {' '.join(not_dirs)}")
    out_dir = args.out or (Path(args.dirs[0]) if len(args.dirs) == 1 else Path("compare_out"))
    out_dir.mkdir(parents=True, exist_ok=True)

    comparisons = compare(runs, args.metric, args.strict_budget)
    images = {}
    for comparison in comparisons:
        print(markdown_table(comparison), end="\n\n")
        images[comparison.task] = render_plots(comparison)
        for name, png in images[comparison.task].items():
            (out_dir / name).write_bytes(png)
    write_csv(comparisons, out_dir / "comparison.csv")
    warnings = [line for line in (comparison.budget_warning() for comparison in comparisons) if line]
    (out_dir / "report.html").write_text(html_report(comparisons, images, warnings, args.dirs), encoding="utf-8")
    for line in warnings:
        _warn(f"warning: {line}")
    plots = sum(map(len, images.values()))
    print(f"wrote comparison.csv, report.html and {plots} plots to {out_dir}")
    return 0


# ---------------------------------------------------------------------------- helpers


def _load_or_warn(run_dir: Path) -> Run | None:
    try:
        return load_run(run_dir)
    except (OSError, ValueError) as error:
        _warn(f"skipped {run_dir}: {error}")
        return None


def _warn(message: str) -> None:
    print(f"compare: {message}", file=sys.stderr)


def _dig(mapping, *keys):
    """``mapping[k1][k2]...``, or None when any level is missing."""
    for key in keys:
        if not isinstance(mapping, dict):
            return None
        mapping = mapping.get(key)
    return mapping


def _flatten(tree, prefix: str = "") -> dict:
    """Nested dicts as ``{"a.b.c": leaf}``; lists are leaves (their string form)."""
    flat = {}
    for key, value in tree.items():
        path = f"{prefix}{key}"
        if isinstance(value, dict) and value:
            flat.update(_flatten(value, path + "."))
        else:
            flat[path] = _scalar(value)
    return flat


def _ungrouped(key: str) -> bool:
    return any(key == name or key.startswith(name + ".") for name in UNGROUPED_KEYS)


def _scalar(value):
    """Config values as hashable scalars (containers become their string form)."""
    return value if value is None or isinstance(value, (str, int, float, bool)) else str(value)


def _number(value) -> float | None:
    """``value`` as a float, or None when it is absent or not a number."""
    try:
        return float(value)
    except (TypeError, ValueError):
        return None


def _mean_std(values: list) -> tuple[float, float | None] | None:
    """(mean, sample std) of the known values, std None for a single one; None when none known.
    NaN is kept, so a diverged seed shows up as nan."""
    known = [value for value in values if value is not None]
    if not known:
        return None
    return statistics.fmean(known), statistics.stdev(known) if len(known) > 1 else None


def _format_number(mean_std: tuple | None, spec: str) -> str:
    if mean_std is None:
        return MISSING
    mean, std = mean_std
    text = format(mean, spec)
    return text if std is None else f"{text} ± {format(std, spec.lstrip('+'))}"


def _cell(value) -> str:
    return MISSING if value is None else str(value)


def _budget_value(value) -> str:
    """A budget limit as its config writes it (None: ``null``, no limit)."""
    return "null" if value is None else str(value)


def _csv_value(value):
    return "" if value is None else value


def _order(value) -> tuple:
    """Sort key for mixed values: numbers by value, then strings, then None."""
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return (0, value, "")
    return (1, 0, str(value)) if value is not None else (2, 0, "")


def _config_order(record: dict) -> tuple:
    """Digital first, then natural order of the configuration fields."""
    return (record["device"] != DIGITAL, *(_order(record[name]) for name in GROUP_FIELDS))


def _natural_key(path: Path) -> list:
    return [(0, int(part), "") if part.isdigit() else (1, 0, part) for part in re.split(r"(\d+)", str(path)) if part]


def _key(record: dict) -> tuple:
    """What a plot tells apart: the setting fields and, for rows that look alike, the rest of the config."""
    return (*(record[name] for name in SETTING_FIELDS), record["config_id"])


def _styles(comparison: TaskComparison) -> dict[tuple, dict]:
    """Configuration -> {label, color, marker}: greys for digital, tab10 for the rest. Labels name the
    device, whichever setting fields vary between the task's hybrid configurations (left out where
    they do not apply, e.g. no rank for ``exact``) and, for configurations that look alike, the
    config keys they differ in."""
    keys = list(dict.fromkeys(_key(record) for _, record in comparison.entries))
    hybrid = [key for key in keys if key[0] != DIGITAL]
    digital = [key for key in keys if key[0] == DIGITAL]
    # a field the mode does not use is None: it tells nothing apart (the mode, which varies then, does)
    varying = [index for index in range(1, len(SETTING_FIELDS)) if len({key[index] for key in hybrid} - {None}) > 1]
    differs = {_key(row): row["differs"] for row in comparison.rows if row["differs"]}
    palette = colormaps["tab10"]
    styles = {}
    for number, key in enumerate(hybrid):
        parts = [str(key[0])] + [f"{SETTING_FIELDS[i]}={key[i]}" for i in varying if key[i] is not None]
        parts += [f"[{differs[key]}]"] if key in differs else []
        styles[key] = {
            "label": " ".join(parts),
            "color": palette(number % palette.N),
            "marker": SETTING_MARKERS[number % len(SETTING_MARKERS)],
        }
    for number, key in enumerate(digital):
        styles[key] = {
            "label": DIGITAL + (f" [{differs[key]}]" if key in differs else ""),
            "color": DIGITAL_SHADES[number % len(DIGITAL_SHADES)],
            "marker": "_",
        }
    return styles


def _seed_markers(comparison: TaskComparison) -> dict:
    """seed -> its marker in the line plots (the task's seeds in order)."""
    seeds = sorted({record["seed"] for _, record in comparison.entries}, key=_order)
    return {seed: SEED_MARKERS[number % len(SEED_MARKERS)] for number, seed in enumerate(seeds)}


def _mark_every(steps: np.ndarray, seeds: dict, seed) -> int | tuple[int, int]:
    """About ten markers per line (enough to tell the seeds apart, few enough to see the line),
    each seed's shifted along the line so that seeds with equal curves still show their markers."""
    every = max(1, len(steps) // 10)
    if every == 1:
        return 1
    return (list(seeds).index(seed) * every // len(seeds), every)


def _runs(count: int) -> str:
    return f"{count} run" + ("" if count == 1 else "s")


def _figure(title: str, xlabel: str, ylabel: str):
    """A figure on the Agg canvas (no pyplot, no global backend change) and its axes."""
    figure = Figure(figsize=(8, 5.5), layout="constrained")
    FigureCanvasAgg(figure)
    axes = figure.subplots()
    axes.set(title=title, xlabel=xlabel, ylabel=ylabel)
    axes.grid(alpha=0.3)
    return figure, axes


def _legend(axes, styles: dict, records: list[dict], seeds: dict, kinds: list[Line2D] = ()) -> None:
    """One entry per configuration (its colour), then ``kinds`` (what a line style means) and,
    where several seeds are drawn, one per seed (its marker)."""
    handles = [
        Line2D([], [], color=styles[key]["color"], label=styles[key]["label"])
        for key in dict.fromkeys(_key(record) for record in records)
    ]
    handles += list(kinds)
    drawn = sorted({record["seed"] for record in records}, key=_order)
    if len(drawn) > 1:
        handles += [
            Line2D([], [], color="grey", marker=seeds[seed], linestyle="None", label=f"seed {_cell(seed)}")
            for seed in drawn
        ]
    _place_legend(axes.figure, handles, [handle.get_label() for handle in handles])


def _place_legend(figure: Figure, handles: list, labels: list[str]) -> None:
    """The legend below the axes, where it hides no line (two columns when the labels are short)."""
    columns = 2 if max(map(len, labels), default=0) <= 40 else 1
    figure.legend(handles, labels, loc="outside lower center", ncols=columns, fontsize="small")


# --- The studies' reports (scripts/parity_study.py, query_study.py, stale_surrogate_study.py) -----------------------

PARITY_MODES = ("exact", "exact+sm", "zo+exact", "zo+sm")
PARITY_COLUMNS = (DIGITAL, *PARITY_MODES)
PARITY_GAPS = {  # gap name: (worse column, better column)
    "device": ("exact", DIGITAL),
    "surrogate": ("exact+sm", "exact"),
    "zo": ("zo+exact", "exact"),
    "combined": ("zo+sm", "exact"),
    "total": ("zo+sm", DIGITAL),
}
PARITY_DEVICES = ("mzi", "mrr", "slm")  # table order; other devices after them
PARITY_TARGETS = {POINTS: 0.5, PERCENT: 1.0}  # the combined gap's target, per unit
PARITY_NOTE = (
    "Columns digital … zo+sm: test metric, mean ± sample std over seeds (accuracy in %). Gaps are paired per seed: "
    "device = exact vs digital, surrogate = exact+sm vs exact, ZO = zo+exact vs exact, combined = zo+sm vs exact, "
    "total = zo+sm vs digital (= device + combined); accuracy gaps in points, loss gaps in % of the better run's loss. "
    "— = not run."
)
QUERY_DEFAULTS = {
    "zo.samples": 100,
    "zo.every": 1,
    "integrator.reuse_sketch": False,
    "zo.batch_rank": None,
    "zo.batch_energy": None,
    "zo.direction": "gaussian",
}
QUERY_NAMES = {"r2": "query_efficient", "": "paper"}
STALE_VARIANTS = ("fresh", "stale", "stale+lost")
STALE_SETTINGS = ("tracked", "full_rank")


def study_metric(run: Run) -> str | None:
    """The run's test metric for a study: ``test/acc``, else ``test/loss``; None when it has neither."""
    return next((m for m in ("test/acc", "test/loss") if run.summary_metric(m) is not None), None)


def paired_by_seed(worse: dict, better: dict, difference=lambda a, b: a - b) -> list[float]:
    """``difference(worse[seed], better[seed])`` for each seed of ``worse`` that ``better`` also has."""
    return [difference(worse[seed], better[seed]) for seed in worse if seed in better]


def mean_and_se(values: list[float]) -> tuple[float, float]:
    """Mean and standard error of the mean (NaN for no value; the error NaN for a single one)."""
    if not values:
        return math.nan, math.nan
    return statistics.fmean(values), statistics.stdev(values) / math.sqrt(len(values)) if len(values) > 1 else math.nan


def parity_gap(metric: str, worse: float, better: float) -> float:
    """How much ``worse`` trails ``better``: accuracy in points, a loss in % of ``better``."""
    return 100.0 * (better - worse) if metric.endswith("acc") else 100.0 * (worse - better) / better


def parity_cells(runs: Iterable[Run]) -> list[dict]:
    """The parity decomposition, one cell per (task, device): ``values`` {column: {seed: metric}} (the task's
    digital twin in each device's cell, repeated runs averaged), ``gaps`` {gap: (mean, std, seeds)} (None where
    no seed has both runs), ``seeds`` (the device's own), ``unit`` and ``met`` (combined gap within its target)."""
    values, metrics = {}, {}
    for run in runs:
        metric = study_metric(run)
        if run.status in (None, COMPLETED) and metric:
            metrics.setdefault(run.task, metric)
            key = (run.task, run.device, DIGITAL if run.is_digital else run.setting("mode"), run.setting("seed"))
            values.setdefault(key, []).append(run.summary_metric(metric))
    known = len(PARITY_DEVICES)
    cells = []
    for task, device in sorted(
        {(t, d) for t, d, _, _ in values if d != DIGITAL},
        key=lambda c: (c[0], PARITY_DEVICES.index(c[1]) if c[1] in PARITY_DEVICES else known, c[1]),
    ):
        metric, cols = metrics[task], {}
        for (t, d, mode, seed), runs_ in values.items():
            if t == task and d in (device, DIGITAL) and mode in PARITY_COLUMNS:
                cols.setdefault(mode, {})[seed] = statistics.fmean(runs_)
        gaps = {}
        for name, (worse, better) in PARITY_GAPS.items():
            diffs = paired_by_seed(
                cols.get(worse, {}), cols.get(better, {}), lambda a, b, metric=metric: parity_gap(metric, a, b)
            )
            gaps[name] = (*_mean_std(diffs), len(diffs)) if diffs else None
        own = sorted({s for c in PARITY_MODES for s in cols.get(c, {})} or set(cols.get(DIGITAL, {})), key=str)
        unit = POINTS if metric.endswith("acc") else PERCENT
        met = None if gaps["combined"] is None else gaps["combined"][0] <= PARITY_TARGETS[unit]
        cells.append(dict(task=task, device=device, metric=metric, unit=unit, seeds=own, values=cols, gaps=gaps))
        cells[-1]["met"] = met
    return cells


def _scaled(mean_std: tuple | None, scale: float) -> tuple | None:
    return mean_std and (scale * mean_std[0], None if mean_std[1] is None else scale * mean_std[1])


def parity_markdown(cells: list[dict]) -> str:
    """One table per task: each column's test metric (mean ± std over seeds), the gaps and the target check."""
    lines = []
    for task in dict.fromkeys(c["task"] for c in cells):
        rows = [c for c in cells if c["task"] == task]
        unit, scale, spec = rows[0]["unit"], *((100, ".2f") if rows[0]["unit"] == POINTS else (1, ".4f"))
        labels = ("device gap", "surrogate", "ZO", "combined", "total vs digital")
        head = ["device", "seeds", *PARITY_COLUMNS, *labels, f"combined ≤ {PARITY_TARGETS[unit]:g} {unit}"]
        lines += [f"### {task} ({rows[0]['metric']}; gaps in {unit}, positive = worse)", ""]
        lines += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
        for c in rows:
            stats = [_mean_std(list(c["values"].get(col, {}).values())) for col in PARITY_COLUMNS]
            cols = [_format_number(_scaled(s, scale), spec) for s in stats]
            gaps = [_format_number(c["gaps"][name] and c["gaps"][name][:2], "+.2f") for name in PARITY_GAPS]
            met = MISSING if c["met"] is None else "yes" if c["met"] else "**no**"
            lines.append("| " + " | ".join([c["device"], ", ".join(map(str, c["seeds"])), *cols, *gaps, met]) + " |")
        lines.append("")
    return "\n".join([*lines, PARITY_NOTE])


def write_parity_csv(cells: list[dict], path: Path) -> None:
    """One row per (task, device): column means and stds, gaps in their unit; empty = not run."""
    stat_names = (*PARITY_COLUMNS, *(f"gap_{g}" for g in PARITY_GAPS))
    fields = ["task", "device", "metric", "unit", "seeds", *(f"{c}{s}" for c in stat_names for s in ("", "_std"))]
    with path.open("w", newline="", encoding="utf-8") as file:
        writer = csv.DictWriter(file, fieldnames=[*fields, "target", "meets_target"], restval="")
        writer.writeheader()
        for c in cells:
            row = {k: c[k] for k in ("task", "device", "metric", "unit")} | {"seeds": ";".join(map(str, c["seeds"]))}
            row |= {"target": PARITY_TARGETS[c["unit"]], "meets_target": "" if c["met"] is None else c["met"]}
            stats = [(col, _mean_std(list(c["values"].get(col, {}).values()))) for col in PARITY_COLUMNS]
            for name, pair in stats + [(f"gap_{g}", c["gaps"][g] and c["gaps"][g][:2]) for g in PARITY_GAPS]:
                mean, std = pair or (None, None)
                row |= {name: "" if mean is None else mean, f"{name}_std": "" if std is None else std}
            writer.writerow(row)


def plot_parity(cells: list[dict], task: str) -> Figure:
    """The gaps per device of one task, as grouped bars, with the combined gap's target."""
    rows = [c for c in cells if c["task"] == task]
    figure = Figure(figsize=(8, 4), layout="constrained")
    axes = figure.subplots()
    for i, name in enumerate(PARITY_GAPS):
        heights = [c["gaps"][name][0] if c["gaps"][name] else float("nan") for c in rows]
        axes.bar([x + (i - 2) * 0.16 for x in range(len(rows))], heights, 0.16, label=name)
    axes.axhline(PARITY_TARGETS[rows[0]["unit"]], color="grey", linestyle="--", label="target (combined)")
    axes.set(
        title=f"{task}: gap to digital, split (positive = worse)",
        ylabel=rows[0]["unit"],
        xticks=range(len(rows)),
        xticklabels=[c["device"] for c in rows],
    )
    axes.legend(fontsize="small")
    return figure


def query_variant(run: Run) -> str:
    """The query study's name of the run's variant, from the settings that differ from the defaults:
    ``paper`` (none), ``M<zo.samples>``, ``every<zo.every>``, ``reuse_sketch``, ``r<zo.batch_rank>``,
    ``e<zo.batch_energy>`` (the sketched batch), or another direction law; r2
    (conf/experiment/query_efficient.yaml) is ``query_efficient``."""
    values = {key: run.setting(key) for key in QUERY_DEFAULTS}
    values = {key: default if values[key] is None else values[key] for key, default in QUERY_DEFAULTS.items()}
    parts = [f"M{values['zo.samples']}", f"every{values['zo.every']}", "reuse_sketch"]
    parts += [f"r{values['zo.batch_rank']}", f"e{values['zo.batch_energy']}"]
    parts.append(str(values["zo.direction"]))
    label = "+".join(
        part for part, key in zip(parts, QUERY_DEFAULTS, strict=True) if values[key] != QUERY_DEFAULTS[key]
    )
    return QUERY_NAMES.get(label, label)


def query_rows(runs: Iterable[Run], seeds=None) -> list[dict]:
    """One row per (task, device, variant) over its finished seeds (those in ``seeds``): the metric's mean and
    std, the mean total queries, and against ``paper`` on the same task and device over the seeds both have: the
    query ratio (sum of queries / sum of paper's) and the paired metric difference with its standard error."""
    by_variant = {}
    for run in runs:
        metric, seed = study_metric(run), run.setting("seed")
        if run.status in (None, COMPLETED) and metric and (seeds is None or seed in seeds):
            entry = (metric, run.summary_metric(metric), run.queries_total)
            by_variant.setdefault((run.task, run.device, query_variant(run)), {})[seed] = entry
    rows = []
    order = lambda it: (it[0][0], it[0][1], it[0][2] != "paper", it[0][2])  # noqa: E731
    for (task, device, name), by_seed in sorted(by_variant.items(), key=order):
        paper = by_variant.get((task, device, "paper"), {})
        common = sorted(set(by_seed) & set(paper))
        diffs = paired_by_seed({s: by_seed[s][1] for s in common}, {s: paper[s][1] for s in common})
        values = [v for _, v, _ in by_seed.values()]
        ratio = sum(by_seed[s][2] for s in common) / sum(paper[s][2] for s in common) if common else math.nan
        rows.append(
            {
                "task": task,
                "device": device,
                "variant": name,
                "metric": next(iter(by_seed.values()))[0],
                "seeds": len(by_seed),
                "value": statistics.fmean(values),
                "std": statistics.stdev(values) if len(values) > 1 else 0.0,
                "queries": statistics.fmean(q for _, _, q in by_seed.values()),
                "query_ratio": ratio,
                "difference": mean_and_se(diffs)[0],
                "difference_se": mean_and_se(diffs)[1],
            }
        )
    return rows


def query_markdown(rows: list[dict]) -> str:
    """Per task and device: each variant's metric, queries, query ratio and paired difference to paper (accuracy
    in points)."""
    lines = []
    for task, device in dict.fromkeys((r["task"], r["device"]) for r in rows):
        mine = [r for r in rows if (r["task"], r["device"]) == (task, device)]
        metric = mine[0]["metric"]
        scale, spec, unit = (100, ".2f", " pt") if metric.endswith("acc") else (1, ".4f", "")
        lines += [
            f"**{task}** (device={device})",
            "",
            f"| variant | seeds | {metric} | total queries | query ratio "
            f"| Δ {metric}{unit} vs paper, same seeds (± s.e.) |",
            "|---|---|---|---|---|---|",
        ]
        for r in mine:
            diff = format(scale * r["difference"], "+" + spec)
            diff += "" if math.isnan(r["difference_se"]) else f" ± {format(scale * r['difference_se'], spec)}"
            value = f"{format(scale * r['value'], spec)} ± {format(scale * r['std'], spec)}"
            cells = [r["variant"], str(r["seeds"]), value, f"{r['queries']:,.0f}", f"{r['query_ratio']:.3f}", diff]
            lines.append("| " + " | ".join(cells) + " |")
        lines.append("")
    return "\n".join(lines)


def pareto_front(points: Iterable[tuple[float, float]], higher_is_better: bool) -> list[tuple[float, float]]:
    """The (queries, metric) points no other point beats on both (fewer or as many queries and a better or
    equal metric, one of them strictly), sorted by queries."""
    sign = 1 if higher_is_better else -1
    front, best = [], -math.inf
    for queries, value in sorted(points, key=lambda p: (p[0], -sign * p[1])):
        if sign * value > best:
            front.append((queries, value))
            best = sign * value
    return front


def write_rows_csv(rows: list[dict], path: Path) -> None:
    """``rows`` (dicts with the same keys) as a CSV with those keys as its header."""
    with path.open("w", newline="", encoding="utf-8") as file:
        writer = csv.DictWriter(file, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)


def plot_queries(rows: list[dict]) -> Figure:
    """Test metric against total queries (log scale), one panel per task and device, the variants labelled and
    their Pareto front drawn (accuracy: higher is better; a loss or perplexity: lower)."""
    panels = list(dict.fromkeys((r["task"], r["device"]) for r in rows))
    columns = min(len(panels), 4)
    grid_rows = -(-len(panels) // columns)
    figure = Figure(figsize=(4.5 * columns, 3.6 * grid_rows), layout="constrained")
    grid = figure.subplots(grid_rows, columns, squeeze=False).flatten()
    for axes in grid[len(panels) :]:
        axes.set_visible(False)
    for axes, (task, device) in zip(grid, panels, strict=False):
        mine = [r for r in rows if (r["task"], r["device"]) == (task, device)]
        for r in mine:
            style = {"paper": ("s", "black"), "query_efficient": ("*", "tab:red")}.get(r["variant"], ("o", "tab:blue"))
            axes.scatter(r["queries"], r["value"], marker=style[0], color=style[1], zorder=3)
            axes.annotate(
                r["variant"], (r["queries"], r["value"]), fontsize=7, xytext=(3, 3), textcoords="offset points"
            )
        front = pareto_front(((r["queries"], r["value"]) for r in mine), mine[0]["metric"].endswith("acc"))
        if front:  # none where every value is NaN (a diverged run)
            axes.step(*zip(*front, strict=True), where="post", color="tab:green", alpha=0.6, label="Pareto front")
        axes.set(xscale="log", xlabel="total hardware queries", ylabel=mine[0]["metric"], title=f"{task} ({device})")
        axes.xaxis.set_minor_formatter(NullFormatter())  # the decades only: minor labels overlap
        axes.legend(fontsize="small")
        axes.grid(alpha=0.3)
    return figure


def stale_records(root: Path) -> list[dict]:
    """The stale-surrogate study's records, one per finished run under ``root`` with a ``stale.json``:
    setting (``full_rank`` for an orthogonal sketch, else ``tracked``), task, device, seed, test metric
    and test loss, merged with the run's stale.json."""
    results = []
    for run in (load_run(path) for path in find_run_dirs([root])):
        if run.status != COMPLETED or not (run.path / "stale.json").is_file():
            continue
        metric = study_metric(run)
        setting = "full_rank" if run.setting("integrator.sketch") == "orthogonal" else "tracked"
        record = {"setting": setting, "task": run.task, "device": run.device, "seed": run.setting("seed")}
        record |= {"metric": metric, "value": run.summary_metric(metric), "test_loss": run.summary_metric("test/loss")}
        results.append(record | json.loads((run.path / "stale.json").read_text()))
    return results


def stale_paired(
    results: list[dict], variant: str, scale: float, key: str = "value", relative: bool = False
) -> tuple[float, float, int]:
    """Mean and standard error of (variant − fresh) × scale (``relative``: in % of fresh) over the
    seeds that have both, and their number."""
    by = {(r["variant"], r["seed"]): r[key] for r in results if r.get(key) is not None}
    fresh = {s: value for (v, s), value in by.items() if v == "fresh"}
    mine = {s: by[(variant, s)] for s in fresh if (variant, s) in by}
    diffs = paired_by_seed(mine, fresh, lambda a, b: (a - b) * (100.0 / b if relative else scale))
    return (*mean_and_se(diffs), len(diffs))


def stale_table(results: list[dict]) -> str:
    """One markdown table: per setting, task and device, the test metric per variant (accuracy in %), the paired
    differences against ``fresh`` (for classification also of the test loss, in % of fresh's: finer than the
    accuracy of a small test set), and per variant the means over the backwards of the surrogate's relative error
    and of the input gradient's cosine to the true one."""
    lines = [
        "| setting | task | device | metric | seeds | fresh | stale | stale+lost | stale − fresh "
        "| stale+lost − fresh | test loss: stale − fresh, stale+lost − fresh (%) | Â error f / s / s+l "
        "| best rank-r | grad cosine f / s / s+l | ‖ΔA‖ per step | lost per run |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    order = {name: i for i, name in enumerate(STALE_SETTINGS)}
    cells = sorted({(r["setting"], r["task"], r["device"]) for r in results}, key=lambda c: (order[c[0]], c[1], c[2]))
    for cell in cells:
        rows = [r for r in results if (r["setting"], r["task"], r["device"]) == cell]
        acc = rows[0]["metric"] == "test/acc"
        scale, fmt, dfmt = (100.0, "{:.2f}", "{:+.2f} ± {:.2f}") if acc else (1.0, "{:.4f}", "{:+.4f} ± {:.4f}")

        def mean(key: str, variant: str | None = None, scale_: float = 1.0, rows: list[dict] = rows) -> float:
            values = [r[key] * scale_ for r in rows if variant is None or r["variant"] == variant]
            return statistics.fmean(values) if values else math.nan

        lost = [r["dropped"] for r in rows if r["variant"] == "stale+lost"]
        seeds = ",".join(map(str, sorted({r["seed"] for r in rows})))
        texts = [
            *cell,
            "acc %" if acc else "loss",
            seeds,
            *(fmt.format(mean("value", v, scale)) for v in STALE_VARIANTS),
        ]
        texts += [dfmt.format(*stale_paired(rows, v, scale)[:2]) for v in STALE_VARIANTS[1:]]
        losses = [stale_paired(rows, v, 1.0, "test_loss", relative=True)[:2] for v in STALE_VARIANTS[1:]]
        texts.append(", ".join("{:+.2f} ± {:.2f}".format(*pair) for pair in losses) if acc else "–")
        texts += [
            " / ".join(f"{mean('rel_error_mean', v):.4f}" for v in STALE_VARIANTS),
            f"{mean('best_rank_error_mean'):.4f}",
            " / ".join(f"{mean('grad_cosine_mean', v):.4f}" for v in STALE_VARIANTS),
            f"{mean('step_move_mean'):.4f}",
            f"{statistics.fmean(lost):.1f}" if lost else "–",
        ]
        lines.append("| " + " | ".join(texts) + " |")
    return "\n".join(lines)
