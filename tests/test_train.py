"""One run (astraora.train.run): every config composes and builds, a few batches of real training per
mode, the run's outputs, and the refusals that leave no run folder behind."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest
from conftest import compose_config, single_class
from fixtures_vision_audio import write_image_tree

from astraora.build import build_model, hybrid_layers
from astraora.config import validate
from astraora.errors import AstraoraError, ConfigError
from astraora.hybrid import HybridLayer
from astraora.paths import CONFIG_DIR
from astraora.train import run

DEVICES = sorted(
    p.stem for p in (Path(CONFIG_DIR) / "device").glob("*.yaml") if p.stem != "remote"
)  # needs a server: test_remote.py
TASKS = sorted(p.stem for p in (Path(CONFIG_DIR) / "task").glob("*.yaml"))
SUMMARY_KEYS = {
    "task",
    "device",
    "mode",
    "seed",
    "metrics",
    "queries",
    "reprograms",
    "surrogate",
    "steps",
    "epochs",
    "wall_seconds",
}
FAST = ["debug=fast", "callbacks.diagnostics.every_n_steps=1"]

# what only the data knows, for building each task's backbone without its dataset
MODEL_KWARGS = {
    "digits": {"num_classes": 10, "in_features": 64},
    "mnist": {"num_classes": 10, "in_channels": 1},
    "cifar10": {"num_classes": 10, "in_channels": 3},
    "image_folder": {"num_classes": 3, "in_channels": 3},
    "speechcommands": {"num_classes": 35},
    "urbansound8k": {"num_classes": 10},
    "audio_folder": {"num_classes": 3},
    "synthetic_audio": {"num_classes": 4},
}


@pytest.mark.slow
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("task", TASKS)
def test_every_device_task_config_composes_and_builds(task, device):
    cfg = compose_config(
        [f"task={task}", f"device={device}", "surrogate.rank=2", "task.model.physical_blocks=1"]
        if task in ("tinyshakespeare", "wikitext2", "text_file", "pydoc_text")
        else [f"task={task}", f"device={device}", "surrogate.rank=2"]
    )
    validate(cfg)
    if device in ("mzi", "mzi_classical", "monarch") and task in (
        "cifar10",
        "urbansound8k",
        "speechcommands",
        "tinyshakespeare",
        "wikitext2",
    ):
        return  # large meshes: composition and validation are what this test covers for them
    model = build_model(cfg, MODEL_KWARGS.get(task, {"vocab_size": 50}))
    layers = hybrid_layers(model)
    if device == "digital":
        assert not layers
    else:
        assert layers and all(isinstance(layer, HybridLayer) for layer in layers.values())


def read_metrics(run_dir: Path) -> tuple[list[str], list[dict]]:
    with open(run_dir / "metrics.csv", newline="") as f:
        reader = csv.DictReader(f)
        return reader.fieldnames, list(reader)


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["zo+sm", "exact+sm", "zo+exact", "exact"])
def test_few_batch_training_per_mode(make_cfg, mode):
    cfg = make_cfg(*FAST, f"mode={mode}")
    summary = run(cfg)
    out = Path(cfg.paths.output_dir)
    assert summary["status"] == "completed" and summary["mode"] == mode
    assert json.loads((out / "summary.json").read_text()) == summary
    assert SUMMARY_KEYS <= set(summary)
    assert {"val/acc", "test/acc", "val/loss"} <= set(summary["metrics"])
    assert summary["queries"]["total"] == sum(summary["queries"][p] for p in ("forward", "zo", "surrogate", "readout"))
    assert summary["steps"] == 3 and summary["epochs"] == 1
    header, rows = read_metrics(out)
    expected = {
        "train/loss",
        "val/loss",
        "val/acc",
        "queries/total",
        "queries/per_step",
        "queries/zo",
        "device/theta_delta",
    }
    if mode.endswith("+sm"):
        expected |= {
            "surrogate/rel_error",
            "surrogate/rel_error_best_rank_r",
            "surrogate/grad_cosine",
            "surrogate/residual",
        }
        assert summary["surrogate"]["rel_error"] is not None
    if mode.startswith("zo"):
        expected |= {"zo/grad_cosine"}
        assert summary["queries"]["zo"] > 0
    else:
        assert summary["queries"]["zo"] == 0
    assert expected <= set(header)
    assert (out / "checkpoints" / "last.ckpt").is_file()


def test_digital_baseline_swaps_in_a_linear(make_cfg):
    summary = run(make_cfg(*FAST, "device=digital"))
    assert summary["device"] == "digital" and summary["queries"]["total"] == 0 and summary["surrogate"] is None


@pytest.mark.parametrize("kind", ["image", "audio"])
def test_one_class_folder_is_one_line(make_cfg, tmp_path, kind):
    root = single_class(tmp_path / kind, kind)
    task = "image_folder" if kind == "image" else "audio_folder"
    cfg = make_cfg("debug=fast", f"task={task}", f"task.root={root}", "task.datamodule.num_workers=0")
    with pytest.raises(AstraoraError, match="has 1 class folder.*at least 2"):
        run(cfg)
    assert not Path(cfg.paths.output_dir).exists()


def test_empty_class_folder_and_empty_split_are_one_line(make_cfg, tmp_path):
    root = tmp_path / "images"
    write_image_tree(root)
    (root / "empty_class").mkdir()
    cfg = make_cfg("debug=fast", "task=image_folder", f"task.root={root}", "task.datamodule.num_workers=0")
    with pytest.raises(AstraoraError, match="empty_class has no readable files"):
        run(cfg)
    (root / "empty_class").rmdir()
    cfg = make_cfg(
        "debug=fast",
        "task=image_folder",
        f"task.root={root}",
        "task.datamodule.num_workers=0",
        "task.datamodule.val_fraction=0.01",
    )
    with pytest.raises(AstraoraError, match=r"the val split .* is empty.*val_fraction"):
        run(cfg)
    assert not Path(cfg.paths.output_dir).exists()


def test_language_model_run_writes_perplexity_and_sample(make_cfg):
    cfg = make_cfg(
        *FAST,
        "task=pydoc_text",
        "device=slm",
        "task.model.n_layer=1",
        "task.model.n_embd=32",
        "task.model.block_size=16",
        "task.generate.max_new_tokens=20",
    )
    summary = run(cfg)
    assert {"val/loss", "val/ppl", "val/bpc", "test/ppl"} <= set(summary["metrics"])
    assert (Path(cfg.paths.output_dir) / "samples.txt").read_text().strip()


def test_bad_values_fail_in_validation(make_cfg):
    for override, key in [
        ("zo.samples=0", "zo.samples"),
        ("mode=magic", "mode"),
        ("surrogate.rank=abc", "surrogate.rank"),
        ("integrator.every=0", "integrator.every"),
        ("zo.direction=cauchy", "zo.direction"),
        ("zo.samples=abc", "zo.samples"),
        ("mode=exact+zo", "mode"),
        ("integrator.sketch=sparse", "integrator.sketch"),
    ]:
        with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
            validate(make_cfg(override))
    with pytest.raises(ConfigError, match=r"surrogate\.rank=65"):
        run(make_cfg(*FAST, "surrogate.rank=65"))


@pytest.mark.slow
def test_experiment_presets_compose_and_validate():
    for preset in sorted(p.stem for p in (Path(CONFIG_DIR) / "experiment").glob("*.yaml")):
        validate(compose_config([f"experiment={preset}"]))


@pytest.mark.slow
def test_physical_scheduler_follows_scheduler_unless_set():
    """θ's schedule is the digital one by default (`physical_scheduler` interpolates `scheduler`);
    `physical_scheduler.name=constant` keeps θ's rate while the digital rate decays; a bad name is
    refused before training, naming the key."""
    from astraora.build import instantiate
    from astraora.train import build_module

    def factors(*overrides):
        cfg = compose_config(["task.model.hidden=8", *overrides])
        validate(cfg, import_targets=False)
        dm = instantiate(cfg.task.datamodule)
        dm.setup("fit")
        _, (digital, theta) = build_module(cfg, dm).configure_optimizers()
        # without a trainer the schedule spans one step: cosine ends at 0, constant stays at 1
        return digital.lr_lambdas[0](1), theta.lr_lambdas[0](1)

    assert factors() == (pytest.approx(0.0), pytest.approx(0.0))
    assert factors("scheduler.name=constant") == (1.0, 1.0)
    assert factors("physical_scheduler.name=constant") == (pytest.approx(0.0), 1.0)
    # a family's own default (conf/physical/slm.yaml: a constant θ schedule), and the paper presets' cosine for θ
    assert factors("device=slm") == (pytest.approx(0.0), 1.0)
    assert factors("device=slm", "physical_scheduler.name=cosine") == (pytest.approx(0.0), pytest.approx(0.0))
    assert factors("device=slm", "experiment=ablation_modes", "surrogate.rank=4") == (
        pytest.approx(0.0),
        pytest.approx(0.0),
    )
    assert factors("device=mrr") == (pytest.approx(0.0), pytest.approx(0.0))
    with pytest.raises(ConfigError, match="physical_scheduler.name"):
        validate(compose_config(["physical_scheduler.name=linear"]), import_targets=False)


def test_wide_physical_layer_on_cpu_warns(make_cfg, caplog):
    import logging

    caplog.set_level(logging.WARNING, logger="astraora")
    run(
        make_cfg(
            "debug=fast", "device=slm", "task.model.hidden=520", "surrogate.rank=4", "trainer.limit_train_batches=1"
        )
    )
    warnings = [r.getMessage() for r in caplog.records if "on a CPU: expect minutes per step" in r.getMessage()]
    assert warnings == [
        "physical layer head.physical is 520 -> 520 (SLM) on a CPU: expect minutes per step; "
        "docs/guide/quickstart.md lists CPU-sized settings, scripts/time_epoch.py estimates this one"
    ]
