"""The parity study's report (scripts/parity_study.py) on fabricated sweep folders: paired per-seed
gaps in points and in percent of loss, the digital twin shared by every device, failed runs left
out, the report files; and the studies' generated image set (scripts/make_textures.py)."""

from __future__ import annotations

import csv
import importlib.util
import json
import statistics
from pathlib import Path

import pytest
from PIL import Image

from astraora.report.compare import DIGITAL, PARITY_TARGETS, parity_gap

SCRIPTS = Path(__file__).resolve().parents[1] / "scripts"


def load_script(name: str):
    """A module of scripts/ imported by path (scripts/ is not a package)."""
    spec = importlib.util.spec_from_file_location(name, SCRIPTS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


parity = load_script("parity_study")
textures = load_script("make_textures")


def fake_run(
    root: Path,
    task: str,
    device: str,
    mode: str,
    seed: int,
    value: float,
    metric: str = "test/acc",
    status: str = "completed",
) -> Path:
    """A run directory of a multirun with only the summary.json the report reads."""
    directory = root / "runs" / f"task={task},device={device},mode={mode},seed={seed}"
    directory.mkdir(parents=True)
    summary = {
        "task": task,
        "device": device,
        "mode": DIGITAL if device == DIGITAL else mode,
        "seed": seed,
        "metrics": {metric: value},
        "status": status,
        "queries": {"total": 0},
        "steps": 10,
    }
    (directory / "summary.json").write_text(json.dumps(summary))
    return directory


# digits: seed -> column -> test/acc
ACC = {
    0: {DIGITAL: 0.97, "exact": 0.96, "exact+sm": 0.955, "zo+exact": 0.958, "zo+sm": 0.95},
    1: {DIGITAL: 0.98, "exact": 0.98, "exact+sm": 0.975, "zo+exact": 0.97, "zo+sm": 0.96},
}


@pytest.fixture()
def study(tmp_path: Path) -> Path:
    for seed, columns in ACC.items():
        for column, value in columns.items():
            device = DIGITAL if column == DIGITAL else "mzi"
            fake_run(tmp_path, "digits", device, column, seed, value)
    # a second device with one mode only, and a failed run that must not count
    fake_run(tmp_path, "digits", "slm", "zo+sm", 0, 0.90)
    fake_run(tmp_path, "digits", "slm", "exact", 0, 0.10, status="failed")
    # a language model: losses, gaps in percent
    for column, loss in {DIGITAL: 2.0, "exact": 2.1, "exact+sm": 2.1, "zo+exact": 2.121, "zo+sm": 2.142}.items():
        fake_run(tmp_path, "pydoc_text", DIGITAL if column == DIGITAL else "mzi", column, 0, loss, metric="test/loss")
    return tmp_path


def test_gap_units():
    assert parity_gap("test/acc", 0.95, 0.96) == pytest.approx(1.0)  # points
    assert parity_gap("test/loss", 2.2, 2.0) == pytest.approx(10.0)  # percent of the better loss
    assert parity_gap("test/acc", 0.97, 0.96) == pytest.approx(-1.0)  # negative: better


def test_decomposition_paired_over_seeds(study: Path):
    cells = {(c["task"], c["device"]): c for c in parity.collect([study / "runs"])}
    assert list(cells) == [("digits", "mzi"), ("digits", "slm"), ("pydoc_text", "mzi")]
    mzi = cells["digits", "mzi"]
    assert mzi["metric"] == "test/acc" and mzi["unit"] == "pt"
    expected = {  # per seed: (0, 1), in points
        "device": (1.0, 0.0),
        "surrogate": (0.5, 0.5),
        "zo": (0.2, 1.0),
        "combined": (1.0, 2.0),
        "total": (2.0, 2.0),
    }
    for name, per_seed in expected.items():
        mean, std, n = mzi["gaps"][name]
        assert n == 2
        assert mean == pytest.approx(sum(per_seed) / 2)
        assert std == pytest.approx(abs(per_seed[0] - per_seed[1]) / 2**0.5)
    # total = device + combined, seed by seed
    assert mzi["gaps"]["total"][0] == pytest.approx(mzi["gaps"]["device"][0] + mzi["gaps"]["combined"][0])
    assert mzi["met"] is False  # combined 1.5 pt > 0.5 pt
    zo_sm = list(mzi["values"]["zo+sm"].values())
    assert (statistics.fmean(zo_sm), statistics.stdev(zo_sm)) == (
        pytest.approx(0.955),
        pytest.approx(0.00707, abs=1e-4),
    )


def test_shared_digital_twin_and_failed_runs(study: Path):
    cells = {(c["task"], c["device"]): c for c in parity.collect([study / "runs"])}
    slm = cells["digits", "slm"]
    assert slm["values"][DIGITAL] == {0: 0.97, 1: 0.98}  # the task's digital twin, in every device's cell
    assert "exact" not in slm["values"]  # the failed run is left out
    assert slm["gaps"]["total"][:3] == (pytest.approx(7.0), None, 1)
    assert slm["gaps"]["combined"] is None and slm["met"] is None


def test_language_model_gaps_in_percent(study: Path):
    lm = next(c for c in parity.collect([study / "runs"]) if c["task"] == "pydoc_text")
    assert lm["unit"] == "%" and PARITY_TARGETS[lm["unit"]] == 1.0
    assert lm["gaps"]["device"][0] == pytest.approx(5.0)
    assert lm["gaps"]["surrogate"][0] == pytest.approx(0.0)
    assert lm["gaps"]["zo"][0] == pytest.approx(1.0)
    assert lm["gaps"]["combined"][0] == pytest.approx(2.0)
    assert lm["met"] is False


def test_report_files(study: Path):
    out = study / "report"
    assert parity.main([str(study / "runs"), "--out", str(out)]) == 0
    table = (out / "parity.md").read_text()
    assert "### digits (test/acc" in table and "### pydoc_text (test/loss" in table
    mzi_row = next(line for line in table.splitlines() if line.startswith("| mzi | 0, 1 |"))
    assert "97.50 ± 0.71" in mzi_row and "+1.50 ± 0.71" in mzi_row and "**no**" in mzi_row
    rows = list(csv.DictReader((out / "parity.csv").open()))
    assert [(r["task"], r["device"]) for r in rows] == [("digits", "mzi"), ("digits", "slm"), ("pydoc_text", "mzi")]
    assert float(rows[0]["gap_combined"]) == pytest.approx(1.5) and rows[0]["meets_target"] == "False"
    assert rows[1]["exact"] == "" and rows[1]["gap_combined"] == ""
    # the seeds column lists the device's own runs, not its digital twin's (which has seeds 0 and 1)
    assert rows[1]["seeds"] == "0" and any(line.startswith("| slm | 0 |") for line in table.splitlines())
    for task in ("digits", "pydoc_text"):
        assert Image.open(out / f"parity_{task}.png").size[0] > 500


def test_no_runs_exit_2(tmp_path: Path):
    assert parity.main([str(tmp_path), "--out", str(tmp_path / "out")]) == 2


def test_image_folder_is_a_class_tree(tmp_path: Path):
    root = textures.make_textures(tmp_path / "images", per_class=3, size=16)
    folders = sorted(p.name for p in root.iterdir())
    assert folders == ["checker", "hstripes", "rings", "vstripes"]
    image = Image.open(root / "rings" / "0002.png")
    assert image.size == (16, 16) and image.mode == "RGB"
    before = (root / "rings" / "0002.png").stat().st_mtime_ns
    textures.make_textures(tmp_path / "images", per_class=3, size=16)  # kept, not rewritten
    assert (root / "rings" / "0002.png").stat().st_mtime_ns == before


def test_output_bias_option(make_cfg):
    """surrogate.output_bias: a digital bias after the physical layer (y = s · query(x) + b), off by
    default, trained by the digital optimizer like the digital twin's Linear bias."""
    import torch

    from astraora.build import build_model, hybrid_layers
    from astraora.devices import MatVec
    from astraora.hybrid import HybridLayer
    from astraora.lit.module import HybridModule

    layer = HybridLayer(MatVec(4, 3, seed=0, name="d"), mode="exact", rank=2, output_bias=True)
    x = torch.randn(5, 4)
    with torch.no_grad():
        layer.bias.copy_(torch.tensor([1.0, -2.0, 0.5]))
        expected = layer.scale * layer.ledger.oracle_matrix() @ x.T
    torch.testing.assert_close(layer(x), expected.T + layer.bias)
    layer(x).sum().backward()
    torch.testing.assert_close(layer.bias.grad, torch.full((3,), 5.0))

    default = hybrid_layers(build_model(make_cfg("device=matvec"), {"num_classes": 10, "in_features": 64}))
    assert all(layer.bias is None for layer in default.values())
    cfg = make_cfg("device=matvec", "surrogate.output_bias=true")
    model = build_model(cfg, {"num_classes": 10, "in_features": 64})
    (layer,) = hybrid_layers(model).values()
    module = HybridModule(
        model,
        optimizer={"name": "adam", "lr": 1e-3},
        physical_optimizer={"name": "adam", "lr": 1e-2},
        scheduler={"name": "constant"},
    )
    digital_opt, physical_opt = module.configure_optimizers()[0]
    in_group = lambda opt: any(p is layer.bias for g in opt.param_groups for p in g["params"])  # noqa: E731
    assert in_group(digital_opt) and not in_group(physical_opt)
