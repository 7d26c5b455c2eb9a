"""A prepared W&B report: hybrid runs beside their digital baselines, grouped by setting.

Runs logged with ``logger=wandb`` carry what this report needs (docs/guide/tracking.md): the
tags ``hybrid``/``digital``, ``task:<t>``, ``device:<d>``, ``mode:<m>``; the config ``setting`` =
{task, device, mode, rank, M, integrator, hybrid, seed} (astraora.rundir.comparison_setting); every
history row carries the cumulative ``queries/total``; the summary holds summary.json's numbers.

:func:`dashboard_spec` returns the report as plain data (sections, their run sets and grouping,
panels and the metric keys they plot), so that it can be printed, checked offline and kept in
this project whatever W&B's client offers. :func:`upload` turns it into a W&B report with the
``wandb-workspaces`` package (``pip install "wandb[workspaces]"``), which needs a network and a
login; every failure there is one line (:class:`DashboardError`).

Usage: ``python scripts/wandb_dashboard.py --project P [--entity E] [--task T] [--metric M] [--dry-run]``.
"""

from __future__ import annotations

from astraora.report.compare import MAIN_METRICS, test_metric_name

# The keys of the logged ``setting`` config that runs are grouped by (the seed pooled), and all of
# them (the seed too) as columns of the runs tables.
GROUP_BY = ("task", "device", "mode", "rank", "M", "integrator", "hybrid")
COLUMNS = (*GROUP_BY, "seed")
# The run sets of every section, by tag: the hybrid runs and their digital baselines.
RUNSETS = (("hybrid", "hybrid"), ("digital", "digital"))
STEP = "Step"  # W&B's own x axis (the logged step), not a metric key
QUERIES = "queries/total"
SURROGATE = ("surrogate/rel_error", "surrogate/rel_error_best_rank_r")
SUMMARY_COLUMNS = (
    "queries/total",
    "surrogate/rel_error",
    "surrogate/rel_error_best_rank_r",
    "steps",
    "epochs",
    "status",
)


class DashboardError(Exception):
    """Why the report could not be uploaded, in one line."""


def dashboard_spec(project: str, entity: str | None = None, metric: str = "val/acc", task: str | None = None) -> dict:
    """The report as plain data.

    Args:
        project, entity: the W&B project (and entity; None: the login's default) the runs are in.
        metric: the task's main validation metric (``val/acc``; ``val/ppl`` or ``val/loss`` for
            language models); the test metric of the same name is compared at the end of runs.
        task: only the runs of this task (their ``task:<t>`` tag); None: every task, grouped apart
            by ``setting.task``.

    Returns:
        ``{"title", "description", "project", "entity", "metric", "test_metric", "task", "sections"}``;
        each section ``{"name", "text", "groupby", "runsets", "columns", "panels"}``: ``groupby``
        and ``columns`` are config keys (``setting.<key>``) and summary keys (``summary:<key>``),
        each run set ``{"name", "tags"}`` (runs that carry all these tags), each panel
        ``{"kind": "line", "title", "x", "y", "log_x", "log_y"}`` (history keys; ``x`` may be
        ``Step``), ``{"kind": "scatter", "title", "x", "y", "log_x"}`` or ``{"kind": "bar",
        "title", "metrics"}`` (summary keys).
    """
    if metric not in MAIN_METRICS:
        raise ValueError(f"metric={metric} is not a main metric astraora logs; allowed: {', '.join(MAIN_METRICS)}")
    test = test_metric_name(metric)
    scope = [f"task:{task}"] if task else []
    runsets = [{"name": name, "tags": [tag, *scope]} for name, tag in RUNSETS]
    columns = [f"setting.{key}" for key in COLUMNS] + [f"summary:{key}" for key in (test, *SUMMARY_COLUMNS)]
    lower = "higher" if metric.endswith("acc") else "lower"
    pooled = {
        "name": "Hybrid vs digital by setting",
        "text": (
            f"Runs of one setting (setting.{', setting.'.join(GROUP_BY)}) pooled over seeds: mean and "
            f"standard deviation. {metric} and {test}: {lower} is better. Digital runs make no device "
            "queries: they are absent from the panels against queries (log axis); compare with their "
            "level in the by-step and bar panels."
        ),
        "groupby": [f"setting.{key}" for key in GROUP_BY],
        "runsets": runsets,
        "columns": columns,
        "panels": [
            _line(f"{metric} by step", STEP, [metric]),
            _line(f"{metric} vs total device queries", QUERIES, [metric], log_x=True),
            _bar(f"{test} at the end of the run", [test]),
            _line("total device queries by step", STEP, [QUERIES], log_y=True),
            _line("surrogate relative error ‖Â − A‖/‖A‖ and the best rank-r error", STEP, list(SURROGATE), log_y=True),
            _scatter(f"{test} vs total device queries, one point per run", QUERIES, test, log_x=True),
        ],
    }
    per_run = {
        "name": "Every run (seeds apart)",
        "text": "The same curves one run at a time; the runs tables list each run's setting and seed.",
        "groupby": [],
        "runsets": runsets,
        "columns": columns,
        "panels": [
            _line(f"{metric} by step", STEP, [metric]),
            _line(f"{metric} vs total device queries", QUERIES, [metric], log_x=True),
            _line("surrogate relative error and the best rank-r error", STEP, list(SURROGATE), log_y=True),
        ],
    }
    title = "astraora: hybrid vs digital" + (f" ({task})" if task else "")
    return {
        "title": title,
        "description": "Hybrid runs beside their digital baselines, grouped by the logged setting.",
        "project": project,
        "entity": entity,
        "metric": metric,
        "test_metric": test,
        "task": task,
        "sections": [pooled, per_run],
    }


def history_keys(spec: dict) -> set[str]:
    """The logged (history) metric keys the spec's line panels plot."""
    keys = set()
    for panel in _panels(spec, "line"):
        keys.update(panel["y"])
        keys.update({panel["x"]} - {STEP})
    return keys


def summary_keys(spec: dict) -> set[str]:
    """The run-summary keys the spec's scatter and bar panels and its runs tables show."""
    keys = set()
    for panel in _panels(spec, "scatter"):
        keys.update((panel["x"], panel["y"]))
    for panel in _panels(spec, "bar"):
        keys.update(panel["metrics"])
    for section in spec["sections"]:
        keys.update(column.removeprefix("summary:") for column in section["columns"] if column.startswith("summary:"))
    return keys


def config_keys(spec: dict) -> set[str]:
    """The config keys the spec groups by and lists (dotted, e.g. ``setting.device``)."""
    keys = set()
    for section in spec["sections"]:
        keys.update(section["groupby"])
        keys.update(column for column in section["columns"] if not column.startswith("summary:"))
    return keys


def tags(spec: dict) -> set[str]:
    """The tags the spec's run sets select by."""
    return {tag for section in spec["sections"] for runset in section["runsets"] for tag in runset["tags"]}


def build_report(spec: dict, reports):
    """The spec as a ``wandb_workspaces.reports.v2`` Report (``reports`` is that module), not saved."""
    entity = spec["entity"] or ""
    blocks = [reports.P(spec["description"])]
    for section in spec["sections"]:
        runsets = [
            reports.Runset(
                entity=entity,
                project=spec["project"],
                name=runset["name"],
                filters=" and ".join(f"Tags() in [{tag!r}]" for tag in runset["tags"]),
                groupby=[f"config.{key}" for key in section["groupby"]],
                pinned_columns=[_column(key) for key in section["columns"]],
            )
            for runset in section["runsets"]
        ]
        blocks += [
            reports.H2(section["name"]),
            reports.P(section["text"]),
            reports.PanelGrid(
                runsets=runsets,
                panels=[_panel(panel, reports, bool(section["groupby"])) for panel in section["panels"]],
            ),
        ]
    options = {"entity": spec["entity"]} if spec["entity"] else {}
    return reports.Report(
        project=spec["project"],
        title=spec["title"],
        description=spec["description"],
        blocks=blocks,
        width="fluid",
        **options,
    )


def upload(spec: dict) -> str:
    """Save the spec as a W&B report and return its URL; :class:`DashboardError` (one line) when the
    report API is not installed, there is no login or the upload fails."""
    try:
        import wandb_workspaces.reports.v2 as reports
    except ImportError:
        raise DashboardError(
            "the W&B report API is not installed: pip install 'wandb[workspaces]' "
            "(or --dry-run to print the report without uploading it)"
        ) from None
    try:
        import wandb

        wandb.Api()  # the login: raises when there is none
    except Exception as error:  # noqa: BLE001 - W&B raises several kinds; each becomes one line
        raise DashboardError(
            f"W&B login failed ({_one_line(error)}): run `wandb login` or set WANDB_API_KEY, and check the network"
        ) from None
    try:
        report = build_report(spec, reports)
        report.save()
    except Exception as error:  # noqa: BLE001 - network, permissions, a missing project...
        raise DashboardError(f"upload to W&B failed: {_one_line(error)}") from None
    return str(report.url)


# ---------------------------------------------------------------------------- helpers


def _line(title: str, x: str, y: list[str], log_x: bool = False, log_y: bool = False) -> dict:
    return {"kind": "line", "title": title, "x": x, "y": y, "log_x": log_x, "log_y": log_y}


def _scatter(title: str, x: str, y: str, log_x: bool = False) -> dict:
    return {"kind": "scatter", "title": title, "x": x, "y": y, "log_x": log_x}


def _bar(title: str, metrics: list[str]) -> dict:
    return {"kind": "bar", "title": title, "metrics": metrics}


def _panels(spec: dict, kind: str) -> list[dict]:
    return [panel for section in spec["sections"] for panel in section["panels"] if panel["kind"] == kind]


def _column(key: str) -> str:
    """A runs-table column as W&B addresses it: ``summary:<key>`` or ``config:<key>.value``."""
    return key if key.startswith("summary:") else f"config:{key}.value"


def _panel(panel: dict, reports, grouped: bool):
    """One panel of the spec as a report panel (grouped runs: mean with a standard-deviation band)."""
    if panel["kind"] == "line":
        group = {"groupby_aggfunc": "mean", "groupby_rangefunc": "stddev"} if grouped else {}
        return reports.LinePlot(
            title=panel["title"], x=panel["x"], y=list(panel["y"]), log_x=panel["log_x"], log_y=panel["log_y"], **group
        )
    if panel["kind"] == "scatter":
        return reports.ScatterPlot(
            title=panel["title"],
            x=reports.SummaryMetric(panel["x"]),
            y=reports.SummaryMetric(panel["y"]),
            log_x=panel["log_x"],
        )
    return reports.BarPlot(
        title=panel["title"],
        metrics=[reports.SummaryMetric(key) for key in panel["metrics"]],
        groupby_aggfunc="mean",
        groupby_rangefunc="stddev",
    )


def _one_line(error: BaseException) -> str:
    text = str(error).strip().splitlines()
    return f"{type(error).__name__}: {text[0] if text else ''}".rstrip(": ")


def main(argv: list[str] | None = None) -> int:
    """Upload the report (0; 1 with one line on stderr when that fails), or print it (--dry-run)."""
    import argparse
    import json
    import sys

    parser = argparse.ArgumentParser(prog="wandb_dashboard.py", description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--project", default="astraora", help="W&B project of the runs (logger.wandb.project; default astraora)"
    )
    parser.add_argument("--entity", help="W&B entity (user or team; default: the login's)")
    parser.add_argument("--task", help="only this task's runs (default: every task, grouped apart)")
    parser.add_argument(
        "--metric",
        default="val/acc",
        choices=MAIN_METRICS,
        help="the task's main metric (default val/acc; val/ppl or val/loss for language models)",
    )
    parser.add_argument("--dry-run", action="store_true", help="print the report as JSON; upload nothing")
    args = parser.parse_args(argv)
    spec = dashboard_spec(args.project, args.entity, args.metric, args.task)
    if args.dry_run:
        print(json.dumps(spec, indent=2, ensure_ascii=False))
        return 0
    try:
        url = upload(spec)
    except DashboardError as error:
        print(f"wandb_dashboard: {error}", file=sys.stderr)
        return 1
    print(f"wandb_dashboard: report saved: {url}")
    return 0
