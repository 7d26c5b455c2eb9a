"""Every config composes and validates: every device (with the default task), every task (on an SLM
and as the digital baseline) and every option of every other group, composed as ``python train.py
<group>=<option>`` would compose it and checked by :func:`astraora.config.validate` with its
``_target_`` classes imported. No data is loaded, nothing trains; the device and task pairs are chosen
rather than the full product, as validation checks each group's keys on their own. Also the device
families' training settings (conf/physical/), chosen from the device alone."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf, open_dict

from astraora.build import RUN_KEYS, make_device
from astraora.config import compose_entry, validate
from astraora.errors import ConfigError
from astraora.paths import CONFIG_DIR

CONF = Path(CONFIG_DIR)


def options(group: str) -> list[str]:
    """The options ``<group>=<option>`` offers (files directly in the group's folder, not its bases)."""
    return sorted(p.stem for p in (CONF / group).glob("*.yaml"))


DEVICES, TASKS = options("device"), options("task")
SIMULATED = [d for d in DEVICES if d not in ("digital", "remote")]
GROUPS = ("experiment", "zo", "integrator", "surrogate", "trainer", "logger", "launcher", "callbacks", "debug")
GROUP_OPTIONS = [(group, option) for group in (*GROUPS, "hparams_search") for option in options(group)]


@pytest.fixture(scope="module")
def hydra_conf():
    """Hydra initialised on conf/ once for the module."""
    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        yield


def composed(*overrides: str):
    cfg = compose("config", overrides=list(overrides))
    with open_dict(cfg):
        cfg.paths.output_dir = "unused"
    return cfg


def check(cfg) -> None:
    """Validated with the ``_target_`` classes imported, and no mandatory value (``???``) left open."""
    validate(cfg, import_targets=True)
    assert not OmegaConf.missing_keys(cfg), sorted(OmegaConf.missing_keys(cfg))


# --------------------------------------------------------------------------- every option composes
PAIRS = sorted(
    {(device, "digits") for device in DEVICES} | {(device, task) for device in ("slm", "digital") for task in TASKS}
)


@pytest.mark.slow
@pytest.mark.parametrize(("device", "task"), PAIRS)
def test_every_device_and_every_task(hydra_conf, device, task):
    cfg = composed(f"device={device}", f"task={task}")
    check(cfg)
    assert (cfg.device.family, cfg.task.name) == (device, task)


@pytest.mark.slow
@pytest.mark.parametrize(("group", "option"), GROUP_OPTIONS)
def test_every_option_of_every_group(hydra_conf, group, option):
    check(composed(f"{group}={option}"))


@pytest.mark.slow
@pytest.mark.parametrize("experiment", options("experiment"))
def test_every_experiment_on_a_family_with_its_own_settings(hydra_conf, experiment):
    """A preset's device gives way to the command line's, and the SLM's settings (conf/physical/) to
    the preset's."""
    cfg = composed(f"experiment={experiment}", "device=slm")
    check(cfg)
    assert cfg.device.family == "slm"


def test_every_task_is_trained_in_test_tasks():
    from test_tasks import TASKS as TRAINED

    assert sorted(TRAINED) == TASKS


# --------------------------------------------------------------------------- validation
def test_validation_names_the_zo_key(hydra_conf):
    with pytest.raises(ConfigError, match=r"zo\.samples=0"):
        validate(composed("zo.samples=0"), import_targets=False)
    with pytest.raises(ConfigError, match=r"zo\.direction='cauchy'"):
        validate(composed("zo.direction=cauchy"), import_targets=False)
    with pytest.raises(ConfigError, match=r"zo\.orthogonal"):  # an option the estimator no longer has
        validate(composed("+zo.orthogonal=true"), import_targets=False)
    with pytest.raises(ConfigError, match=r"zo\.reuse_readout"):
        validate(composed("device=slm", "zo.direction=gaussian", "+zo.reuse_readout=true"), import_targets=False)
    validate(composed("mode=exact+sm", "zo.samples=0"), import_targets=False)  # no ZO estimator in this mode


def test_validation_of_the_other_groups(hydra_conf):
    for override, key in (
        ("integrator.name=magic", "integrator.name"),
        ("surrogate.rank=0", "surrogate.rank"),
        ("physical_scheduler.name=linear", "physical_scheduler.name"),
        ("physical_optimizer.lr=-1", "physical_optimizer.lr"),
        ("device.driver.max_retries=-1", "device.driver.max_retries"),
        ("task.datamodule.batch_size=0", "task.datamodule.batch_size"),
    ):
        with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
            validate(composed(override), import_targets=False)
    with pytest.raises(ConfigError, match=r"device\._target_"):
        validate(composed("device._target_=astraora.devices.Nothing"), import_targets=True)


@pytest.mark.parametrize("device", ["mzi", "mrr", "remote"])
def test_a_key_the_device_does_not_take_is_named_before_the_run(hydra_conf, device):
    """A misspelt or retired device key (θ's rate is no longer a device key: conf/physical) is refused
    with the key and the device's settings, also where the class passes **kwargs on to its base."""
    with pytest.raises(ConfigError, match=r"device\.theta_lr is not a setting of \w+ \(device=" + device):
        validate(composed(f"device={device}", "+device.theta_lr=3e-2"), import_targets=True)
    validate(composed(f"device={device}"), import_targets=True)


# --------------------------------------------------------------------------- device files
@pytest.mark.slow
@pytest.mark.parametrize("device", DEVICES)
def test_device_entries_describe_devices(hydra_conf, device):
    """A device's entry is what the run composes, and holds its constructor's arguments and the run
    keys only: no training settings (those are conf/physical/'s)."""
    entry = compose_entry("device", device)
    assert entry == composed(f"device={device}").device
    assert not {"theta_lr", "theta_schedule", "zo_direction"} & set(entry)
    if device in SIMULATED:
        built = make_device(entry, d_in=6, d_out=4, seed=0, name="t")
        assert built.query(torch.randn(3, 6)).shape == (3, 4)
        assert set(entry) >= {"family", "_target_", "nonideal", "faults", *RUN_KEYS}


def test_mzi_classical_is_the_mesh_with_another_cell(hydra_conf):
    mzi, classical = compose_entry("device", "mzi"), compose_entry("device", "mzi_classical")
    changed = {key for key in mzi if mzi[key] != classical[key]}
    assert changed == {"family", "_target_"} and set(mzi) == set(classical)


def test_language_model_tasks_share_the_gpt(hydra_conf):
    tasks = [t for t in TASKS if compose_entry("task", t).kind == "language_model"]
    assert tasks == ["pydoc_text", "text_file", "tinyshakespeare", "wikitext2"]
    for task in tasks:
        cfg = composed(f"task={task}")
        assert cfg.task.model._target_ == "astraora.models.gpt.GPT" and cfg.task.optimizer.name == "adamw"
        assert cfg.task.datamodule.block_size == cfg.task.model.block_size
        assert set(cfg.task.generate) == {"max_new_tokens", "temperature", "prompt"}


# --------------------------------------------------------------------------- family training settings
def training(*overrides: str) -> tuple:
    cfg = composed(*overrides)
    return cfg.zo.direction, cfg.physical_optimizer.lr, cfg.physical_scheduler.name


def test_family_training_settings_follow_the_device(hydra_conf):
    assert training("device=slm") == ("colored", 3e-3, "constant")
    assert training("device=mrr") == ("gaussian", 3e-2, "cosine")
    assert training("device=mzi") == ("gaussian", 1e-2, "cosine")
    # slm with random directions: the paper's rate, its own schedule
    assert training("device=slm", "zo.direction=gaussian") == ("gaussian", 1e-2, "constant")
    assert training("device=slm", "zo=rademacher") == ("rademacher", 1e-2, "constant")
    assert training("device=slm", "zo=colored") == ("colored", 3e-3, "constant")
    assert training("device=mrr", "zo=colored") == ("colored", 3e-2, "cosine")
    # the command line and the presets win over a family's settings
    assert training("device=mrr", "physical_optimizer.lr=0.005")[1] == 0.005
    assert training("device=slm", "scheduler.name=constant", "physical_scheduler.name=cosine")[2] == "cosine"
    for preset in ("paper_cifar10", "paper_lm_cpu", "ablation_modes", "query_efficient"):
        assert training("device=slm", f"experiment={preset}")[0] == "gaussian", preset
    assert training("device=slm", "experiment=paper_urbansound8k_cpu") == ("gaussian", 1e-2, "cosine")


@pytest.mark.parametrize("device", [d for d in DEVICES if not (CONF / "physical" / f"{d}.yaml").exists()])
def test_a_device_without_training_settings_gets_the_defaults(hydra_conf, device):
    assert training(f"device={device}") == ("gaussian", 1e-2, "cosine")


def test_a_served_chip_takes_a_familys_settings_by_name(hydra_conf):
    assert training("device=remote", "physical=slm", "zo=colored") == training("device=slm")
    assert training("device=remote", "physical=mrr") == training("device=mrr")


def test_a_lab_device_needs_no_training_file(hydra_conf, tmp_path):
    """A device from the user's own config folder (hydra.searchpath) trains with the defaults."""
    (tmp_path / "device").mkdir()
    (tmp_path / "device" / "attenuator.yaml").write_text(
        "family: attenuator\n_target_: astraora.devices.MatVec\ndriver: {max_retries: 3, timeout_s: null}\n"
    )
    cfg = composed("device=attenuator", f"hydra.searchpath=[file://{tmp_path}]")
    assert cfg.device.family == "attenuator"
    assert (cfg.zo.direction, cfg.physical_optimizer.lr, cfg.physical_scheduler.name) == ("gaussian", 1e-2, "cosine")


def test_every_training_file_names_a_device_and_an_estimator():
    """conf/physical/<device>.yaml and conf/physical/zo/<device>_<zo>.yaml apply only where their names
    match a device (and a zo option): a misspelt one would never be used."""
    for path in (CONF / "physical").glob("*.yaml"):
        assert path.stem in DEVICES, path
    zo_options = options("zo")
    for path in (CONF / "physical" / "zo").glob("*.yaml"):
        assert any(path.stem == f"{d}_{z}" for d in DEVICES for z in zo_options), path


def test_a_device_file_overrides_the_shared_blocks():
    """The shared nonideal/faults/driver blocks come first in a device file's defaults list and its own
    keys after them (``_self_`` last), so a device that sets one of them keeps its own value."""
    for path in sorted((Path(CONFIG_DIR) / "device").glob("*.yaml")):
        defaults = OmegaConf.load(path).get("defaults", [])
        if any("base/simulated" in str(entry) for entry in defaults):
            assert defaults[-1] == "_self_", path.name
