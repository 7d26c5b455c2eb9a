"""The prepared W&B report (astraora.report.dashboard, scripts/wandb_dashboard.py), offline: every key
it plots, groups or filters by is one the project really logs, taken from the code that logs it."""

from __future__ import annotations

import json
import sys
import time
import types
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from conftest import compose_config

from astraora.loggers import make_loggers, wandb_summary
from astraora.report import dashboard
from astraora.report.dashboard import config_keys, dashboard_spec, history_keys, summary_keys, tags
from astraora.rundir import comparison_setting, summarize
from astraora.train import build_module, run

FAST = ["debug=fast", "surrogate.rank=4"]
LM = ["task=pydoc_text", "device=slm", "task.model.n_layer=1", "task.model.n_embd=32", "task.model.block_size=16"]


def logged_keys(overrides: list[str], model_kwargs: dict, batch, out: Path) -> tuple[set[str], set[str]]:
    """(history keys, summary keys) a run of ``overrides`` logs, from the module's own logging code:
    a training and an evaluation pass with ``self.log`` recorded, the step's physical counters, the
    oracle diagnostics (logged by ``log_diagnostics`` on diagnostic steps) and the W&B summary that
    train.py builds from summary.json."""
    cfg = compose_config([*FAST, *overrides], out)
    module = build_module(cfg, SimpleNamespace(char_level=True), model_kwargs)
    history: set[str] = set()
    module.log = lambda name, *args, logger=True, **kwargs: history.add(name) if logger else None
    module.log_dict = lambda values, *args, **kwargs: history.update(values)
    theta_before = [theta.detach().clone() for theta in module.theta_parameters()]
    for stage in ("train", "val", "test"):
        module.loss_and_update_metrics(batch, stage)
        if stage != "train" and hasattr(module, "_log_eval"):
            module._log_eval(stage)
    module._log_physical(theta_before, 0)
    history |= set(module.diagnostics())
    reached = {name: 0.5 for name in history if name.startswith(("val/", "test/"))}
    summary = summarize(cfg, module, None, reached, "completed", time.time(), out)
    return history, set(wandb_summary(summary))


@pytest.fixture(scope="module")
def classification_keys(tmp_path_factory) -> tuple[set[str], set[str]]:
    batch = (torch.randn(8, 64), torch.randint(0, 10, (8,)))
    return logged_keys([], {"num_classes": 10, "in_features": 64}, batch, tmp_path_factory.mktemp("cls"))


@pytest.fixture(scope="module")
def language_model_keys(tmp_path_factory) -> tuple[set[str], set[str]]:
    tokens = torch.randint(0, 50, (2, 16))
    return logged_keys(LM, {"vocab_size": 50}, (tokens, tokens), tmp_path_factory.mktemp("lm"))


def test_every_metric_key_of_the_spec_is_logged(classification_keys, language_model_keys):
    history, summary = classification_keys
    spec = dashboard_spec("astraora")
    assert {"val/acc", "queries/total", "surrogate/rel_error", "surrogate/rel_error_best_rank_r"} <= history_keys(spec)
    assert history_keys(spec) <= history, history_keys(spec) - history
    assert summary_keys(spec) <= summary, summary_keys(spec) - summary
    lm_history, lm_summary = language_model_keys
    for metric in ("val/ppl", "val/loss"):
        spec = dashboard_spec("astraora", metric=metric)
        assert metric in history_keys(spec) and history_keys(spec) <= lm_history, history_keys(spec) - lm_history
        assert summary_keys(spec) <= lm_summary, summary_keys(spec) - lm_summary
    with pytest.raises(ValueError, match="val/bpc"):
        dashboard_spec("astraora", metric="val/bpc")


def test_grouping_keys_and_tags_are_what_runs_log(tmp_path):
    """The spec's config keys are in the ``setting`` config of hybrid, exact and digital runs alike;
    each run set's tags are on the runs it is meant to hold (the W&B logger's own tags)."""
    spec = dashboard_spec("astraora", task="digits")
    assert {
        f"setting.{key}" for key in ("task", "device", "mode", "rank", "M", "integrator", "hybrid", "seed")
    } == config_keys(spec)
    run_tags = {}
    for kind, overrides in (("hybrid", []), ("exact", ["mode=exact"]), ("digital", ["device=digital"])):
        cfg = compose_config([*overrides, "logger=wandb", "logger.wandb.mode=disabled"], tmp_path / kind)
        setting = comparison_setting(cfg)
        assert {key.removeprefix("setting.") for key in config_keys(spec)} <= set(setting)
        (logger,) = [lg for lg in make_loggers(cfg, tmp_path / kind, None) if hasattr(lg, "_wandb_init")]
        run_tags[kind] = set(logger._wandb_init["tags"])
    for section in spec["sections"]:
        hybrid, digital = ({*runset["tags"]} for runset in section["runsets"])
        assert hybrid <= run_tags["hybrid"] and hybrid <= run_tags["exact"] and not hybrid <= run_tags["digital"]
        assert digital <= run_tags["digital"] and not digital <= run_tags["hybrid"]
    assert tags(spec) == {"hybrid", "digital", "task:digits"}


def test_dry_run_prints_the_spec_as_json(capsys):
    assert (
        dashboard.main(["--dry-run", "--project", "P", "--entity", "E", "--task", "pydoc_text", "--metric", "val/ppl"])
        == 0
    )
    printed = json.loads(capsys.readouterr().out)
    assert printed == dashboard_spec("P", "E", "val/ppl", "pydoc_text")
    assert [section["groupby"] for section in printed["sections"]][1] == []  # the per-run section: seeds apart
    kinds = {panel["kind"] for section in printed["sections"] for panel in section["panels"]}
    assert kinds == {"line", "scatter", "bar"}
    axes = {(panel["x"], tuple(panel["y"])) for panel in printed["sections"][0]["panels"] if panel["kind"] == "line"}
    assert ("queries/total", ("val/ppl",)) in axes  # the main metric against queries


def fake_report_api(monkeypatch, saved: list, fail: Exception | None = None) -> None:
    """A stand-in for wandb_workspaces.reports.v2 that records what would be saved."""

    class Element:
        def __init__(self, *args, **kwargs):
            self.args, self.kwargs = args, kwargs

    class Report(Element):
        url = "https://wandb.example/report"

        def save(self):
            if fail is not None:
                raise fail
            saved.append(self)

    module = types.ModuleType("wandb_workspaces.reports.v2")
    for name in ("P", "H2", "Runset", "PanelGrid", "LinePlot", "ScatterPlot", "BarPlot", "SummaryMetric"):
        setattr(module, name, type(name, (Element,), {}))
    module.Report = Report
    for name in ("wandb_workspaces", "wandb_workspaces.reports"):
        monkeypatch.setitem(sys.modules, name, types.ModuleType(name))
    monkeypatch.setitem(sys.modules, "wandb_workspaces.reports.v2", module)


def test_upload_failures_are_one_line(monkeypatch, capsys):
    import wandb

    args = ["--project", "P", "--entity", "E"]
    monkeypatch.setitem(sys.modules, "wandb_workspaces", None)  # not installed
    assert dashboard.main(args) == 1
    out, err = capsys.readouterr()
    assert out == "" and len(err.strip().splitlines()) == 1 and "pip install 'wandb[workspaces]'" in err

    saved: list = []
    fake_report_api(monkeypatch, saved)

    def no_login():
        raise wandb.errors.UsageError("No API key configured.\nUse `wandb login` to log in.")

    monkeypatch.setattr(wandb, "Api", no_login)
    assert dashboard.main(args) == 1
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and "wandb login" in err and "No API key configured" in err

    monkeypatch.setattr(wandb, "Api", lambda: None)
    fake_report_api(monkeypatch, saved, fail=ConnectionError("network unreachable\ntraceback..."))
    assert dashboard.main(args) == 1
    err = capsys.readouterr().err
    assert err.strip() == "wandb_dashboard: upload to W&B failed: ConnectionError: network unreachable"

    fake_report_api(monkeypatch, saved)
    assert dashboard.main(args) == 0
    assert capsys.readouterr().out.strip() == "wandb_dashboard: report saved: https://wandb.example/report"
    (report,) = saved
    assert report.kwargs["project"] == "P" and report.kwargs["entity"] == "E"
    grids = [block for block in report.kwargs["blocks"] if type(block).__name__ == "PanelGrid"]
    assert len(grids) == 2
    runset = grids[0].kwargs["runsets"][0]
    assert runset.kwargs["filters"] == "Tags() in ['hybrid']"
    assert (
        "config.setting.device" in runset.kwargs["groupby"]
        and "config:setting.seed.value" in runset.kwargs["pinned_columns"]
    )


def test_report_builds_with_the_installed_report_api():
    """With wandb-workspaces installed (pip install 'wandb[workspaces]'): the spec becomes a Report whose
    panels and filters the API accepts (building needs no network; saving does)."""
    reports = pytest.importorskip("wandb_workspaces.reports.v2")
    from wandb_workspaces import expr

    spec = dashboard_spec("P", "E", task="digits")
    report = dashboard.build_report(spec, reports)
    grids = [block for block in report.blocks if isinstance(block, reports.PanelGrid)]
    assert report.project == "P" and len(grids) == 2
    filters = expr.filters_tree_to_v2(expr.expr_to_filters(grids[0].runsets[0].filters))["filters"]
    assert [item["value"] for item in filters] == [["hybrid"], ["task:digits"]]
    for panel in grids[0].panels:
        panel._to_model()


@pytest.mark.slow
def test_offline_wandb_runs_carry_every_key_of_the_spec(tmp_path, monkeypatch):
    """Real runs logged to an offline W&B run: the spec's history, summary and config keys and tags."""
    from wandb_offline import read_offline_run

    monkeypatch.setenv("WANDB_MODE", "offline")
    spec = dashboard_spec("astraora", task="digits")
    for kind, overrides in (("hybrid", []), ("digital", ["device=digital"])):
        cfg = compose_config(
            [*FAST, *overrides, "logger=wandb", "callbacks.diagnostics.every_n_steps=1"], tmp_path / kind
        )
        run(cfg)
        (offline,) = (Path(cfg.paths.output_dir) / "wandb").glob("offline-run-*")
        wb = read_offline_run(offline)
        logged = {key for row in wb["history"] for key in row}
        if kind == "hybrid":
            assert history_keys(spec) <= logged, history_keys(spec) - logged
            assert summary_keys(spec) <= set(wb["summary"]), summary_keys(spec) - set(wb["summary"])
        assert {key.removeprefix("setting.") for key in config_keys(spec)} <= set(wb["config"]["setting"])
        runset = next(runset for runset in spec["sections"][0]["runsets"] if runset["name"] == kind)
        assert set(runset["tags"]) <= set(wb["run"].tags)
