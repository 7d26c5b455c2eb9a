"""Bad values refused before training in one line: the rules table of astraora.config and the torch-side
preflight of astraora.preflight (trainer settings, memory). In-process: no subprocess here. The command
line's own checks (secrets, launcher, accelerator, multirun jobs, empty sweep folders): tests/test_cli.py."""

from __future__ import annotations

import resource
import time
import typing
from contextlib import contextmanager
from pathlib import Path

import pytest
import torch
from conftest import REPO, compose_config

from astraora import preflight
from astraora.build import build_model
from astraora.config import PRECISIONS, validate
from astraora.errors import ConfigError
from astraora.paths import CONFIG_DIR
from astraora.preflight import LargeTensorsOnMeta, check_accelerator, check_memory, check_trainer, estimate_memory

DIGITS = {"num_classes": 10, "in_features": 64}


# ---------------------------------------------------------------------------------------- the rules
@pytest.mark.parametrize(
    "override, needle",
    [
        ("trainer.precision=bf17", "trainer.precision='bf17' is not allowed; choose one of ['32-true'"),
        ("trainer.accelerator=foo", "trainer.accelerator='foo' is not allowed; choose one of ['auto'"),
        ("trainer.devices=0", "trainer.devices=0 is not allowed"),
        ("trainer.devices=-2", "trainer.devices=-2 is not allowed"),
        ("trainer.max_steps=-5", "trainer.max_steps=-5 is not allowed"),
        ("trainer.max_epochs=0", "trainer.max_epochs=0 is not allowed"),
        ("trainer.max_epochs=-1", "trainer.max_epochs=-1 with trainer.max_steps=-1 trains without end"),
        ("trainer.limit_train_batches=-1", "trainer.limit_train_batches=-1 is not allowed"),
        ("trainer.limit_val_batches=1.5", "trainer.limit_val_batches=1.5 is not allowed"),
        ("trainer.check_val_every_n_epoch=0", "trainer.check_val_every_n_epoch=0 is not allowed"),
        ("trainer.log_every_n_steps=0", "trainer.log_every_n_steps=0 is not allowed"),
        ("task.datamodule.batch_size=0", "task.datamodule.batch_size=0 is not allowed; give an integer >= 1"),
        ("task.datamodule.num_workers=-1", "task.datamodule.num_workers=-1 is not allowed"),
        ("task.model.hidden=-3", "task.model.hidden=-3 is not allowed; give an integer >= 1"),
        ("task.model.hidden=0", "task.model.hidden=0 is not allowed"),
        ("task.optimizer.weight_decay=-1", "task.optimizer.weight_decay=-1 is not allowed"),
        ("task.optimizer.lr=-0.1", "task.optimizer.lr=-0.1 must be > 0"),
        ("seed=1.5", "seed=1.5 must be an integer"),
        ("zo.samples=0", "zo.samples=0 is not allowed"),
        ("surrogate.rank=0", "surrogate.rank=0 is not allowed"),
    ],
)
def test_rules_refuse_common_bad_values(override, needle):
    with pytest.raises(ConfigError) as err:
        validate(compose_config([override]), import_targets=False)
    assert needle in str(err.value) and "\n" not in str(err.value)


@pytest.mark.slow
def test_rules_accept_every_preset():
    from hydra import compose, initialize_config_dir

    presets = [
        [f"{group}={p.stem}"]
        for group in ("trainer", "experiment")
        for p in sorted((REPO / "conf" / group).glob("*.yaml"))
    ]
    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        for overrides in [
            *presets,
            ["trainer.max_epochs=-1", "trainer.max_steps=100"],
            ["trainer.devices=[0,1]"],
            ["trainer.precision=bf16-mixed", "task.datamodule.num_workers=null"],
        ]:
            validate(compose("config", overrides=overrides), import_targets=False)


def test_precisions_are_lightnings():
    from lightning.fabric.connector import _PRECISION_INPUT

    lightning = {value for group in typing.get_args(_PRECISION_INPUT) for value in typing.get_args(group)}
    assert set(PRECISIONS) == lightning


# ---------------------------------------------------------------------------------- trainer preflight
def test_accelerator_must_be_there(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(ConfigError, match=r"trainer.accelerator=gpu: torch sees no CUDA GPU"):
        check_accelerator(compose_config(["trainer=gpu"]))
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: False)
    with pytest.raises(ConfigError, match="trainer.accelerator=mps: torch sees no Apple MPS"):
        check_accelerator(compose_config(["trainer.accelerator=mps"]))
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    with pytest.raises(ConfigError, match=r"trainer.devices=4 is not allowed: torch sees 1 CUDA GPU"):
        check_accelerator(compose_config(["trainer=gpu", "trainer.devices=4"]))


def test_lightning_refusals_become_one_line(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ConfigError) as err:
        check_trainer(compose_config(["+trainer.foo=1"]))
    assert str(err.value).startswith("trainer.foo=1 refused by Lightning: ") and "\n" not in str(err.value)
    check_trainer(compose_config([]))
    assert not list(tmp_path.iterdir())  # the probe writes nothing


# ----------------------------------------------------------------------------------- memory preflight
def test_large_tensors_are_made_on_meta():
    with LargeTensorsOnMeta():
        small, big = torch.zeros(10), torch.randn(1000, 1000)
        index = torch.repeat_interleave(torch.arange(3000), torch.full((3000,), 100))  # 300,000 from small inputs
        mixed = big[:10, :10] + small[:10]
    assert not small.is_meta and big.is_meta and index.is_meta and index.shape == (300000,) and mixed.is_meta


@pytest.mark.parametrize("device", ["mzi", "mrr", "slm", "monarch"])
def test_estimate_counts_the_models_tensors_exactly(device):
    cfg = compose_config([f"device={device}", "task.model.hidden=300"])  # θ of an MZI: 89,700 phases (on meta)
    real = build_model(cfg, DIGITS)
    expected = sum(t.numel() * t.element_size() for t in [*real.parameters(), *real.buffers()])
    estimate = estimate_memory(cfg, DIGITS)
    assert estimate.parts["parameters and buffers"] == expected
    assert estimate.layer == "head.physical" and estimate.layer_shape == (300, 300)


def test_a_model_too_big_is_refused_quickly_without_allocating(monkeypatch):
    monkeypatch.setattr(preflight, "available_memory", lambda where: 16e9)
    before, started = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss, time.monotonic()
    with pytest.raises(ConfigError) as err:
        check_memory(compose_config(["task.model.hidden=20000"]), DIGITS)
    grown_mb = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) / 1024
    assert time.monotonic() - started < 10 and grown_mb < 300, (time.monotonic() - started, grown_mb)
    message = str(err.value)
    assert message.startswith("task.model.hidden=20000 (physical layer head.physical: 20000 -> 20000): the run needs")
    assert "16.0 GB RAM available" in message and "\n" not in message
    check_memory(compose_config(["task.model.hidden=20000", "memory_check=false"]), DIGITS)


def test_the_oracle_diagnostics_graph_is_counted(monkeypatch):
    """The step-0 diagnostics differentiate through the mesh simulator: rows × N² complex numbers."""
    monkeypatch.setattr(preflight, "available_memory", lambda where: 0.5e9)
    with pytest.raises(ConfigError, match=r"simulator autograd of head.physical.*diagnostics.every_n_steps=0"):
        check_memory(compose_config(["task.model.hidden=1024"]), DIGITS)
    check_memory(compose_config(["task.model.hidden=1024", "callbacks.diagnostics.every_n_steps=0"]), DIGITS)


@pytest.mark.parametrize(
    "overrides, kwargs",
    [
        ([], DIGITS),
        (["task=cifar10"], {"num_classes": 10, "in_channels": 3}),
        (["device=digital"], DIGITS),
        (["device=mrr"], DIGITS),
    ],
)
def test_default_configs_pass(overrides, kwargs, monkeypatch):
    monkeypatch.setattr(preflight, "available_memory", lambda where: 8e9)
    check_memory(compose_config(overrides), kwargs)


@contextmanager
def address_space_headroom(gb: float):
    """At most ``gb`` GB more virtual memory in this process: a run that would grow further fails
    with an allocation error here instead of filling the machine's memory."""
    size = next(
        int(line.split()[1]) * 1024
        for line in Path("/proc/self/status").read_text().splitlines()
        if line.startswith("VmSize:")
    )
    soft, hard = resource.getrlimit(resource.RLIMIT_AS)
    resource.setrlimit(resource.RLIMIT_AS, (size + int(gb * 1e9), hard))
    try:
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_AS, (soft, hard))


@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="needs /proc to bound the test's memory")
def test_run_refuses_a_model_too_big_before_building_it(make_cfg, monkeypatch):
    """astraora.train.run calls check_memory once the data is set up, before it builds the model."""
    from astraora.train import run

    monkeypatch.setattr(preflight, "available_memory", lambda where: 16e9)
    cfg = make_cfg("task.model.hidden=20000")
    with address_space_headroom(3), pytest.raises(ConfigError, match="task.model.hidden=20000"):
        run(cfg)
    assert not Path(cfg.paths.output_dir).exists()


def test_the_memory_check_draws_nothing_from_the_global_generators():
    """Building the model for the estimate draws initial weights; the run's own build must draw the
    same ones as without the check (a served device's run would otherwise differ from in-process)."""
    import random

    import numpy as np

    torch.manual_seed(0)
    np.random.seed(0)
    random.seed(0)
    check_memory(compose_config(["task.model.hidden=32"]), DIGITS)
    after = (torch.rand(3), np.random.rand(3), random.random())
    torch.manual_seed(0)
    np.random.seed(0)
    random.seed(0)
    assert torch.equal(after[0], torch.rand(3)) and np.array_equal(after[1], np.random.rand(3))
    assert after[2] == random.random()
