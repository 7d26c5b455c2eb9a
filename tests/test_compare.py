"""scripts/compare.py and astraora.report.compare on fake run directories built in tmp_path."""

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from astraora.report.compare import (
    compare,
    find_run_dirs,
    load_run,
    main,
    markdown_table,
    mean_and_se,
    paired_by_seed,
    parity_gap,
    read_metrics_csv,
    stale_paired,
)

REPO = Path(__file__).resolve().parents[1]


def write_metrics_csv(path: Path, logged: list[dict]) -> None:
    """As Lightning's CSVLogger writes it: the sorted union of keys as header, one row per logging
    call, empty cells for the metrics that call did not log."""
    header = sorted(set().union(*logged))
    with path.open("w", newline="") as file:
        writer = csv.DictWriter(file, fieldnames=header)
        writer.writeheader()
        writer.writerows(logged)


def classification_log(val_acc: list[float], queries_per_step: int, steps_per_epoch: int = 10) -> list[dict]:
    """Train rows (loss, cumulative queries, surrogate error) and separate val rows, per epoch."""
    logged = []
    for epoch, acc in enumerate(val_acc):
        for step in range(epoch * steps_per_epoch, (epoch + 1) * steps_per_epoch):
            row = {"step": step, "epoch": epoch, "train/loss": 2.0 / (step + 1)}
            if queries_per_step:
                row.update(
                    {
                        "queries/total": (step + 1) * queries_per_step,
                        "queries/per_step": queries_per_step,
                        "surrogate/rel_error": 0.5 / (step + 1),
                        "surrogate/rel_error_best_rank_r": 0.1 / (step + 1),
                    }
                )
            logged.append(row)
        logged.append(
            {"step": (epoch + 1) * steps_per_epoch - 1, "epoch": epoch, "val/acc": acc, "val/loss": 1.0 - acc}
        )
    return logged


def write_run(
    run_dir: Path,
    *,
    task="digits",
    device="mzi",
    seed=0,
    test=None,
    val=(0.5, 0.9, 0.8),
    queries_per_step=100,
    status="completed",
    rank=10,
    samples=100,
    with_config=True,
    mode="zo+sm",
    max_epochs=30,
    **extra,
):
    """A run directory as astraora leaves it: summary.json, metrics.csv and .hydra/config.yaml."""
    run_dir.mkdir(parents=True)
    digital = device == "digital"
    steps = 10 * len(val)
    metric = "ppl" if task == "tinyshakespeare" else "acc"
    summary = {
        "task": task,
        "device": device,
        "mode": "digital" if digital else mode,
        "seed": seed,
        "metrics": {f"val/{metric}": val[-1], f"test/{metric}": test, "val/loss": 0.1},
        "queries": {
            "forward": 0,
            "zo": 0,
            "surrogate": 0,
            "readout": 0,
            "total": 0 if digital else steps * queries_per_step,
        },
        "reprograms": 0,
        "surrogate": None if digital else {"rank": rank, "rel_error": 0.02, "rel_error_best_rank_r": 0.01},
        "steps": steps,
        "epochs": len(val),
        "wall_seconds": 1.0,
        "status": status,
        "run_dir": str(run_dir),
        **extra,
    }
    if with_config:
        summary["config"] = {
            "surrogate": {"rank": rank},
            "zo": {"samples": samples},
            "integrator": {"name": "psi_implicit", "samples": samples},
        }
    (run_dir / "summary.json").write_text(json.dumps(summary))
    if metric == "acc":
        write_metrics_csv(run_dir / "metrics.csv", classification_log(list(val), 0 if digital else queries_per_step))
    else:
        write_metrics_csv(
            run_dir / "metrics.csv",
            [
                {"step": 9, "epoch": 0, "val/loss": 2.0, "val/ppl": val[0]},
                {"step": 9, "epoch": 0, "train/loss": 2.1},
                {"step": 19, "epoch": 1, "val/loss": 1.5, "val/ppl": val[1]},
            ],
        )
    (run_dir / ".hydra").mkdir()
    (run_dir / ".hydra" / "config.yaml").write_text(
        f"device:\n  name: {device}\nsurrogate:\n  rank: {rank}\n"
        f"zo:\n  samples: {samples}\nintegrator:\n  name: psi_implicit\n  samples: ${{zo.samples}}\n"
        f"seed: {seed}\nmode: {mode}\npaths:\n  output_dir: ${{hydra:runtime.output_dir}}\n"
        f"trainer:\n  max_epochs: ${{task.max_epochs}}\n  enable_progress_bar: {seed % 2 == 0}\n"
        f"task:\n  name: {task}\n  max_epochs: {max_epochs}\n  datamodule:\n    seed: ${{seed}}\n"
    )


@pytest.fixture
def runs_root(tmp_path: Path) -> Path:
    """Digits: a digital and two hybrid runs (seed 0); tiny Shakespeare: a digital and a hybrid run."""
    root = tmp_path / "runs"
    write_run(root / "digits_digital", device="digital", test=0.96, val=(0.6, 0.97, 0.95))
    write_run(root / "digits_mzi", device="mzi", test=0.90, val=(0.5, 0.92, 0.91))
    write_run(root / "digits_mrr", device="mrr", test=0.93, val=(0.5, 0.94, 0.93), queries_per_step=250)
    write_run(root / "lm_digital", task="tinyshakespeare", device="digital", test=5.0, val=(7.0, 5.2))
    write_run(root / "lm_mzi", task="tinyshakespeare", device="mzi", test=6.0, val=(8.0, 6.1))
    return root


def load_all(*paths):
    return compare([load_run(path) for path in find_run_dirs(paths)])


def rows_by_device(comparison) -> dict:
    return {row["device"]: row for row in comparison.rows}


def test_read_metrics_csv_keeps_only_logged_cells(tmp_path):
    write_metrics_csv(
        tmp_path / "metrics.csv",
        [
            {"step": 0, "epoch": 0, "train/loss": 1.0},
            {"step": 0, "epoch": 0, "val/acc": 0.5},
            {"step": 1, "epoch": 0, "train/loss": 0.5},
        ],
    )
    history = read_metrics_csv(tmp_path / "metrics.csv")
    assert set(history) == {"train/loss", "val/acc"}
    assert history["train/loss"][0].tolist() == [0, 1] and history["train/loss"][1].tolist() == [1.0, 0.5]
    assert history["val/acc"][1].tolist() == [0.5]


def test_classification_rows_and_gap(runs_root):
    digits = {comparison.task: comparison for comparison in load_all(runs_root)}["digits"]
    assert digits.metric == "val/acc" and digits.test_metric == "test/acc"
    assert [row["device"] for row in digits.rows][0] == "digital"
    rows = rows_by_device(digits)
    assert rows["digital"]["gap"] is None and rows["digital"]["rank"] is None and rows["digital"]["M"] is None
    mzi = rows["mzi"]
    assert mzi["final_val"] == (0.91, None)  # last logged val/acc, not the best
    assert mzi["best_val"] == (0.92, None)
    assert mzi["test"] == (0.90, None)
    assert mzi["gap"][0] == pytest.approx(6.0)  # digital 0.96 − hybrid 0.90 = 6 points: positive = hybrid worse
    assert rows["mrr"]["gap"][0] == pytest.approx(3.0)
    assert mzi["queries_total"] == (3000.0, None) and mzi["queries_per_step"] == (100.0, None)
    assert rows["mrr"]["queries_per_step"] == (250.0, None)
    assert mzi["surrogate_rel_error"] == (0.02, None)
    assert (mzi["rank"], mzi["M"], mzi["M_sm"], mzi["integrator"]) == (10, 100, 100, "psi_implicit")
    table = markdown_table(digits)
    assert "| mzi | zo+sm | psi_implicit | 10 | 100 | 100 | 0 | completed | 0.91 | 0.92 | 0.9 | +6.00 |" in table
    assert "| gap test/acc (pt) ¹ |" in table and "percentage points" in table
    assert "positive = hybrid worse" in table and "budget vs digital" not in table


def test_language_model_gap_sign_and_best(runs_root):
    lm = {comparison.task: comparison for comparison in load_all(runs_root)}["tinyshakespeare"]
    assert lm.metric == "val/ppl"
    mzi = rows_by_device(lm)["mzi"]
    assert mzi["gap"][0] == pytest.approx(20.0)  # (hybrid 6.0 − digital 5.0) / 5.0: in % of the digital ppl
    assert mzi["best_val"] == (6.1, None)  # min over steps
    table = markdown_table(lm)
    assert "hybrid − digital" in table and "| gap test/ppl (%) ¹ |" in table and "| +20.00 |" in table
    assert "% of the digital run's value" in table


def test_multirun_layout_groups_seeds(tmp_path):
    sweep = tmp_path / "multirun" / "2024-05-01" / "12-00-00"
    jobs = [("digital", 0, 0.96), ("digital", 1, 0.94), ("mzi", 0, 0.90), ("mzi", 1, 0.86), ("mzi", 2, 0.80)]
    jobs += [("digital", 2, 0.90)] * 6  # repeated baselines: job numbers past 9 check the natural order
    for job, (device, seed, test) in enumerate(jobs):
        write_run(
            sweep / str(job) / "nested", device=device, seed=seed, test=test, rank=5, samples=10, with_config=False
        )  # settings come from .hydra/config.yaml only
    run_dirs = find_run_dirs([tmp_path / "multirun"])
    assert [path.parent.name for path in run_dirs] == [str(job) for job in range(11)]  # natural order
    (digits,) = compare([load_run(path) for path in run_dirs])
    assert len(digits.rows) == 2
    mzi = rows_by_device(digits)["mzi"]
    assert mzi["seeds"] == [0, 1, 2] and len(mzi["run_dirs"]) == 3
    assert (mzi["rank"], mzi["M"], mzi["M_sm"]) == (5, 10, 10)  # M_sm through ${zo.samples}
    gap, std = mzi["gap"]
    assert gap == pytest.approx((6 + 8 + 10) / 3) and std == pytest.approx(2.0)  # points
    assert "0, 1, 2" in markdown_table(digits) and " ± " in markdown_table(digits)


def test_missing_keys_and_unfinished_runs(tmp_path, capsys):
    bare = tmp_path / "bare"
    bare.mkdir()
    (bare / "summary.json").write_text(json.dumps({"task": "digits", "device": "mzi", "surrogate": None}))
    write_run(tmp_path / "failed", device="slm", test=None, status="failed", with_config=False)
    (tmp_path / "broken").mkdir()
    (tmp_path / "broken" / "summary.json").write_text("{not json")
    assert main([str(tmp_path)]) == 0
    out, err = capsys.readouterr()
    assert "skipped" in err and "broken" in err
    assert "| mzi | — | — | — | — | — | — | — | — | — | — | — | — | — | — |" in out
    assert "| slm | zo+sm | psi_implicit | 10 | 100 | 100 | 0 | failed |" in out
    with open(tmp_path / "comparison.csv", newline="") as file:
        statuses = {row["device"]: row["status"] for row in csv.DictReader(file)}
    assert statuses == {"mzi": "", "slm": "failed"}


def test_metric_option_selects_loss(runs_root, tmp_path, capsys):
    assert main([str(runs_root), "--metric", "loss", "--out", str(tmp_path / "out")]) == 0
    out = capsys.readouterr().out
    assert "## digits (main metric val/loss" in out and "best val/loss" in out


def run_cli(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))}
    return subprocess.run(
        [sys.executable, str(REPO / "scripts" / "compare.py"), *args],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )


@pytest.mark.slow
def test_cli_writes_tables_csv_and_plots(runs_root, tmp_path):
    result = run_cli(str(runs_root), cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert "## digits" in result.stdout and "## tinyshakespeare" in result.stdout
    with open(runs_root / "comparison.csv", newline="") as file:
        rows = list(csv.DictReader(file))
    assert [(row["task"], row["device"]) for row in rows] == [
        ("digits", "digital"),
        ("digits", "mrr"),
        ("digits", "mzi"),
        ("tinyshakespeare", "digital"),
        ("tinyshakespeare", "mzi"),
    ]
    assert float(rows[2]["gap"]) == pytest.approx(6.0) and rows[2]["gap_std"] == "" and rows[2]["gap_unit"] == "pt"
    assert float(rows[4]["gap"]) == pytest.approx(20.0) and rows[4]["gap_unit"] == "%"
    assert all(row["budget_vs_digital"] == "" for row in rows)
    assert (runs_root / "report.html").is_file()
    for name in [
        "digits_metric_vs_step",
        "digits_surrogate_rel_error",
        "digits_metric_vs_queries",
        "tinyshakespeare_metric_vs_step",
    ]:
        assert (runs_root / f"{name}.png").stat().st_size > 0


def test_cli_several_dirs_default_out(runs_root, tmp_path):
    result = run_cli(str(runs_root / "digits_digital"), str(runs_root / "digits_mzi"), cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert (tmp_path / "compare_out" / "comparison.csv").is_file()


def test_cli_without_runs_exits_2(tmp_path):
    result = run_cli(str(tmp_path), cwd=tmp_path)
    assert result.returncode == 2
    assert result.stdout == "" and len(result.stderr.strip().splitlines()) == 1
    assert "no run directories" in result.stderr


def test_runs_with_different_budgets_or_configs_are_not_pooled(tmp_path):
    """Four digits/mzi runs of 30, 4, 4 and 1 epochs: three rows, the two 4-epoch runs (seeds 0, 1)
    pooled, each row naming the key it differs in; the seed and per-run keys do not split rows."""
    for name, epochs, seed, test in [("a", 30, 0, 0.97), ("b", 4, 0, 0.90), ("c", 4, 1, 0.88), ("d", 1, 0, 0.5)]:
        write_run(tmp_path / name, seed=seed, test=test, max_epochs=epochs)
    (digits,) = load_all(tmp_path)
    rows = {row["differs"]: row for row in digits.rows}
    assert set(rows) == {
        "task.max_epochs=30 trainer.max_epochs=30",
        "task.max_epochs=4 trainer.max_epochs=4",
        "task.max_epochs=1 trainer.max_epochs=1",
    }
    four = rows["task.max_epochs=4 trainer.max_epochs=4"]
    assert four["seeds"] == [0, 1] and four["test"] == (pytest.approx(0.89), pytest.approx(0.01414, rel=1e-3))
    assert rows["task.max_epochs=30 trainer.max_epochs=30"]["test"] == (0.97, None)
    table = markdown_table(digits)
    assert "config differs in" in table and "| trainer.max_epochs" not in table


def test_rows_show_only_what_the_mode_uses(tmp_path):
    write_run(tmp_path / "exact", mode="exact", test=0.9)
    write_run(tmp_path / "zo_exact", mode="zo+exact", test=0.9)
    write_run(tmp_path / "exact_sm", mode="exact+sm", test=0.9)
    rows = {row["mode"]: row for row in load_all(tmp_path)[0].rows}
    assert [rows["exact"][k] for k in ("integrator", "rank", "M", "M_sm")] == [None] * 4
    assert [rows["zo+exact"][k] for k in ("integrator", "rank", "M", "M_sm")] == [None, None, 100, None]
    assert [rows["exact+sm"][k] for k in ("integrator", "rank", "M", "M_sm")] == ["psi_implicit", 10, None, 100]


def test_one_seed_and_no_digital_run_say_so(tmp_path):
    from astraora.report.compare import _styles, plot_metric_vs_step

    write_run(tmp_path / "mzi", test=0.9)
    (digits,) = load_all(tmp_path)
    table = markdown_table(digits)
    assert "±" not in table and "sample std" not in table and "no digital run" in table
    figure = plot_metric_vs_step(digits, _styles(digits))
    assert figure.axes[0].get_title() == "digits: val/acc"
    write_run(tmp_path / "digital", device="digital", test=0.95)
    (digits,) = load_all(tmp_path)
    assert plot_metric_vs_step(digits, _styles(digits)).axes[0].get_title() == "digits: val/acc, hybrid vs digital"


def test_surrogate_error_plot_of_short_runs_shows_points_and_distinct_ticks(tmp_path):
    """Runs that logged the surrogate error once or twice, all within a few per cent of each other."""
    from astraora.report.compare import _styles, plot_surrogate_error

    for name, errors in (("one", [0.61]), ("two", [0.62, 0.63])):
        write_run(tmp_path / name, test=0.9, max_epochs=len(errors))
        write_metrics_csv(
            tmp_path / name / "metrics.csv",
            [
                {"step": step, "epoch": 0, "surrogate/rel_error": value, "val/acc": 0.5}
                for step, value in enumerate(errors)
            ],
        )
    (digits,) = load_all(tmp_path)
    figure = plot_surrogate_error(digits, _styles(digits))
    axes = figure.axes[0]
    assert axes.get_yscale() == "linear"
    lines = axes.get_lines()
    assert len(lines) == 2 and all(line.get_marker() not in (None, "", "None") for line in lines)
    assert all(line.get_markevery() == 1 for line in lines)  # one or two points: every one marked
    figure.canvas.draw()
    labels = [label.get_text() for label in axes.get_yticklabels() if label.get_text()]
    assert len(labels) >= 2 and len(set(labels)) == len(labels)


def legend_texts(figure) -> list[str]:
    (legend,) = figure.legends
    return [text.get_text() for text in legend.get_texts()]


def test_labels_name_only_what_applies(tmp_path):
    """Modes that use no integrator, rank or M: the labels of tables' plots never print None."""
    from astraora.report.compare import _styles, render_plots

    write_run(tmp_path / "digital", device="digital", test=0.95)
    write_run(tmp_path / "zo_sm", test=0.9)
    write_run(tmp_path / "exact", mode="exact", test=0.92)
    write_run(tmp_path / "exact_sm", mode="exact+sm", test=0.91, rank=5)
    (digits,) = load_all(tmp_path)
    labels = sorted(style["label"] for style in _styles(digits).values())
    assert labels == ["digital", "mzi mode=exact", "mzi mode=exact+sm rank=5", "mzi mode=zo+sm rank=10"]
    from astraora.report.compare import plot_metric_vs_queries, plot_metric_vs_step, plot_surrogate_error

    for plot in (plot_metric_vs_step, plot_surrogate_error, plot_metric_vs_queries):
        assert not any("None" in text for text in legend_texts(plot(digits, _styles(digits))))
    assert len(render_plots(digits)) == 3


def test_surrogate_plot_tells_seeds_and_best_rank_apart(tmp_path):
    """Two seeds of one setting and a second setting: one legend entry per setting, the best rank-r
    reference labelled, a marker per seed."""
    from astraora.report.compare import _styles, plot_surrogate_error

    write_run(tmp_path / "s0", seed=0, test=0.9)
    write_run(tmp_path / "s1", seed=1, test=0.9)
    write_run(tmp_path / "r5", seed=0, test=0.9, rank=5)
    (digits,) = load_all(tmp_path)
    figure = plot_surrogate_error(digits, _styles(digits))
    texts = legend_texts(figure)
    assert texts == [
        "mzi rank=5",
        "mzi rank=10",
        "surrogate Â (solid)",
        "best rank-r error, SVD of A (dotted)",
        "seed 0",
        "seed 1",
    ]
    lines = figure.axes[0].get_lines()
    assert len(lines) == 6  # 3 runs × (surrogate, best rank r)
    assert {line.get_linestyle() for line in lines} == {"-", ":"}
    colour = next(style["color"] for style in _styles(digits).values() if style["label"] == "mzi rank=10")
    rank10 = [line for line in lines if line.get_color() == colour]
    assert len(rank10) == 4 and len({line.get_marker() for line in rank10}) == 2  # the two seeds differ


def test_queries_plot_marks_settings_and_counts_coinciding_runs(tmp_path):
    from astraora.report.compare import _styles, plot_metric_vs_queries

    for seed in (0, 1, 2):  # same queries and the same final val/acc: three runs on one point
        write_run(tmp_path / f"zo{seed}", seed=seed, test=0.9)
    write_run(tmp_path / "mrr", device="mrr", test=0.9, queries_per_step=50)
    write_run(tmp_path / "digital", device="digital", test=0.95)
    (digits,) = load_all(tmp_path)
    figure = plot_metric_vs_queries(digits, _styles(digits))
    axes = figure.axes[0]
    assert [text.get_text() for text in axes.texts] == ["×3"]
    assert legend_texts(figure) == ["mrr (1 run)", "mzi (3 runs)", "digital (mean of 1 run)"]
    collections = axes.collections
    assert len(collections) == 2 and all(0 < collection.get_alpha() < 1 for collection in collections)
    markers = {tuple(map(tuple, c.get_paths()[0].vertices.round(3))) for c in collections}
    assert len(markers) == 2  # distinct marker shapes per setting


def test_budget_mismatch_is_flagged_or_refused(tmp_path, capsys):
    """A 3-epoch hybrid run against a 30-epoch digital run: flagged (column, footnote, warning) by
    default, left out with --strict-budget; a digital run of the same budget is preferred."""
    write_run(tmp_path / "digital30", device="digital", test=0.97, max_epochs=30)
    write_run(tmp_path / "mzi3", test=0.90, max_epochs=3)
    (digits,) = load_all(tmp_path)
    row = rows_by_device(digits)["mzi"]
    assert row["budget"] == "trainer.max_epochs 3 vs 30" and row["gap"][0] == pytest.approx(7.0)
    table = markdown_table(digits)
    assert "| budget vs digital ² |" in table and "⚠ trainer.max_epochs 3 vs 30" in table
    assert "² ⚠ no digital run of the same seed had the same training budget" in table

    assert main([str(tmp_path), "--out", str(tmp_path / "out")]) == 0
    err = capsys.readouterr().err
    assert "warning: digits: 1 hybrid run(s) have no digital run of the same training budget" in err
    assert "trainer.max_epochs 3 vs 30" in err
    with open(tmp_path / "out" / "comparison.csv", newline="") as file:
        flags = {row["device"]: (row["budget_vs_digital"], row["gap"]) for row in csv.DictReader(file)}
    assert flags["mzi"][0] == "trainer.max_epochs 3 vs 30" and float(flags["mzi"][1]) == pytest.approx(7.0)

    (strict,) = compare([load_run(path) for path in find_run_dirs([tmp_path])], strict_budget=True)
    row = rows_by_device(strict)["mzi"]
    assert row["gap"] is None and row["budget"] == "refused: trainer.max_epochs 3 vs 30"
    assert "the gap is left out (--strict-budget)" in markdown_table(strict)

    write_run(tmp_path / "digital3", device="digital", test=0.93, max_epochs=3)
    rows = load_all(tmp_path)[0].rows
    mzi = next(row for row in rows if row["device"] == "mzi")
    assert mzi["budget"] == "" and mzi["gap"][0] == pytest.approx(3.0)  # against the 3-epoch digital run


def test_budget_without_hydra_config_compares_steps(tmp_path):
    write_run(tmp_path / "digital", device="digital", test=0.97, val=(0.5, 0.9, 0.95, 0.96))
    write_run(tmp_path / "mzi", test=0.90)
    for name in ("digital", "mzi"):
        (tmp_path / name / ".hydra" / "config.yaml").unlink()
    (digits,) = load_all(tmp_path)
    assert rows_by_device(digits)["mzi"]["budget"] == "steps 30 vs 40"


def test_html_report_is_one_self_contained_file(tmp_path, capsys):
    import base64
    import re

    write_run(tmp_path / "runs" / "digital", device="digital", test=0.97, max_epochs=30)
    write_run(tmp_path / "runs" / "mzi", test=0.90, max_epochs=3)
    write_run(tmp_path / "runs" / "lm_digital", task="tinyshakespeare", device="digital", test=5.0, val=(7.0, 5.2))
    write_run(tmp_path / "runs" / "lm_mzi", task="tinyshakespeare", test=6.0, val=(8.0, 6.1))
    out = tmp_path / "out"
    assert main([str(tmp_path / "runs"), "--out", str(out)]) == 0
    capsys.readouterr()
    page = (out / "report.html").read_text(encoding="utf-8")
    assert page.startswith("<!DOCTYPE html>") and page.rstrip().endswith("</html>")
    assert page.count("<table>") == 2 and "<h2>digits (main metric val/acc" in page
    assert "<td>+7.00</td>" in page and "<td>+20.00</td>" in page  # points and % of the digital value
    assert "<th>gap test/acc (pt) ¹</th>" in page and "<th>gap test/ppl (%) ¹</th>" in page
    assert '<div class="warning"><p>⚠ digits: 1 hybrid run(s)' in page and '<tr class="flagged">' in page
    images = re.findall(r'<img alt="([^"]+)" src="data:image/png;base64,([A-Za-z0-9+/=]+)">', page)
    pngs = sorted(path.name for path in out.glob("*.png"))
    assert sorted(name for name, _ in images) == pngs and len(pngs) == 5
    assert all(base64.b64decode(data) == (out / name).read_bytes() for name, data in images)
    # nothing outside the file: every src is a data URI, no links, scripts or style sheets
    assert re.findall(r'(?:src|href)="([^"]*)"', page) == [f"data:image/png;base64,{data}" for _, data in images]
    assert "<link" not in page and "<script" not in page and "url(" not in page


def test_default_output_folders_are_git_ignored(tmp_path):
    """compare.py's default outputs (the run directory under outputs/, ./compare_out) and the README's
    ``--out report/`` stay out of git."""
    import shutil

    if shutil.which("git") is None or not (REPO / ".git").exists():
        pytest.skip("needs the git checkout")
    paths = [
        "compare_out/report.html",
        "outputs/multirun/x/0/report.html",
        "report/comparison.csv",
        "scripts/compare_out/comparison.csv",
    ]
    result = subprocess.run(["git", "check-ignore", "--no-index", *paths], cwd=REPO, capture_output=True, text=True)
    assert result.stdout.split() == paths
    kept = subprocess.run(
        ["git", "check-ignore", "--no-index", "astraora/report/compare.py"], cwd=REPO, capture_output=True, text=True
    )
    assert kept.returncode == 1  # not ignored


def test_study_helpers_pair_by_seed():
    """The studies' paired differences: only seeds both sides have, in ``worse``'s order; mean ± s.e."""
    worse, better = {2: 0.5, 0: 0.9, 1: 0.8}, {0: 1.0, 1: 0.6, 3: 0.0}
    assert paired_by_seed(worse, better) == [pytest.approx(-0.1), pytest.approx(0.2)]
    assert paired_by_seed(worse, better, lambda a, b: parity_gap("test/acc", a, b)) == [
        pytest.approx(10.0),
        pytest.approx(-20.0),
    ]
    assert mean_and_se([1.0, 3.0]) == (2.0, pytest.approx(1.0))
    mean, se = mean_and_se([4.0])
    assert mean == 4.0 and se != se  # one value: no standard error
    assert all(v != v for v in mean_and_se([]))
    records = [
        {"variant": "fresh", "seed": 0, "value": 2.0},
        {"variant": "stale", "seed": 0, "value": 3.0},
        {"variant": "stale", "seed": 1, "value": 9.0},  # no fresh run of seed 1
    ]
    assert stale_paired(records, "stale", 1.0, relative=True)[::2] == (pytest.approx(50.0), 1)
