"""astraora installed as a package: its configs travel in the wheel (pyproject.toml maps conf/ to
astraora/conf, :func:`astraora.paths.find_config_dir` finds them there), and a user's own config folders
(``hydra.searchpath``, ``--config-dir``, a primary config's ``hydra.searchpath``, a Hydra SearchPathPlugin)
are what the command line's early checks see, for the training and for ``astraora-device-server``.
In-process; the wheel itself is built and run by scripts/check_wheel.sh (CI)."""

from __future__ import annotations

import shutil
import sys
from pathlib import Path

import pytest
import tomllib
from conftest import REPO

from astraora import cli, paths
from astraora.remote import server

LAB_DEVICE = """\
family: chip
_target_: mylab.devices.Chip
nonideal: {output_noise: 0.0, phase_bits: 0, input_bits: 0, drift_std: 0.0, crosstalk: 0.0}
faults: {raise_prob: 0.0, nonfinite_prob: 0.0, slow_prob: 0.0, slow_seconds: 0.0}
driver: {max_retries: 3, timeout_s: null}
"""


@pytest.fixture
def lab(tmp_path) -> Path:
    """A lab's config folder outside the repository: a device, a task and an experiment of its own."""
    conf = tmp_path / "mylab" / "conf"
    for group in ("device", "task", "experiment"):
        (conf / group).mkdir(parents=True)
    (conf / "device" / "chip.yaml").write_text(LAB_DEVICE)
    (conf / "task" / "lab_digits.yaml").write_text("defaults:\n  - digits\n  - _self_\nname: lab_digits\n")
    (conf / "experiment" / "lab_quick.yaml").write_text(
        "# @package _global_\ndefaults:\n  - override /device: chip\ntrainer:\n  max_steps: 3\n"
    )
    return conf


def refused(capsys, check, *args, **kwargs) -> str:
    """``check(*args)``'s refusal: exit code 2 and one stderr line, returned."""
    with pytest.raises(SystemExit) as exit_info:
        check(*args, **kwargs)
    assert exit_info.value.code == 2
    lines = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), lines
    return lines[0]


def accepted(argv: list[str], config_dir: str = paths.CONFIG_DIR):
    """The config the early checks compose for ``argv`` (they refuse nothing)."""
    cli.check_group_overrides(argv, config_dir)
    sources, overrides = cli.config_sources(argv, config_dir)
    return cli._compose_and_validate(overrides, sources)


# ------------------------------------------------------------------------------------ the wheel's configs
def test_pyproject_ships_every_package_and_every_config():
    """The package list is explicit (astraora.conf is mapped, not found): a subpackage missing from it
    would be missing from the wheel; conf/ holds only what the package-data patterns carry."""
    tool = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"]
    found = {".".join(p.parent.relative_to(REPO).parts) for p in (REPO / "astraora").rglob("__init__.py")}
    assert set(tool["packages"]) == found | {"astraora.conf"}
    assert tool["package-dir"] == {"astraora.conf": "conf"}
    conf = REPO / "conf"
    shipped = {p for pattern in tool["package-data"]["astraora.conf"] for p in conf.glob(pattern)}
    assert shipped == {p for p in conf.rglob("*") if p.is_file() and "__pycache__" not in p.parts}
    assert {"config.yaml", "server.yaml", "device/mzi.yaml"} <= {str(p.relative_to(conf)) for p in shipped}


def test_config_dir_is_found_inside_an_installed_package(tmp_path, capsys):
    """A wheel puts the configs in astraora/conf with nothing beside the package; a clone has conf/ beside
    it. The packaged folder wins over a stray site-packages/conf, and the checks work from it."""
    site = tmp_path / "site-packages"
    shutil.copytree(REPO / "conf", site / "astraora" / "conf")
    (site / "conf").mkdir()  # another distribution's top-level conf/ must not be taken
    (site / "conf" / "config.yaml").write_text("other: 1\n")
    packaged = paths.find_config_dir(site / "astraora")
    assert packaged == str(site / "astraora" / "conf")
    clone = tmp_path / "clone"
    (clone / "astraora").mkdir(parents=True)
    shutil.copytree(REPO / "conf", clone / "conf")
    assert paths.find_config_dir(clone / "astraora") == str(clone / "conf")
    assert paths.find_config_dir(REPO / "astraora") == paths.CONFIG_DIR == server.CONFIG_DIR == str(REPO / "conf")

    assert accepted(["device=mrr", "task=digits"], packaged).device.family == "mrr"
    line = refused(capsys, cli.check_group_overrides, ["device=nope"], packaged)
    assert "device=nope is not allowed; choose one of ['digital', 'matvec'" in line
    (site / "astraora" / "conf" / "device" / "packaged_only.yaml").write_text(LAB_DEVICE)
    assert "'packaged_only'" in refused(capsys, server.check_device_override, ["device=nope"], packaged)


# ---------------------------------------------------------------------------- a user's own config folders
@pytest.mark.parametrize(
    "group, name, misspelt",
    [("device", "chip", "chp"), ("task", "lab_digits", "lab_digit"), ("experiment", "lab_quick", "lab_quik")],
)
def test_early_checks_see_the_users_search_path(lab, capsys, group, name, misspelt):
    """``hydra.searchpath=[file://DIR]`` adds DIR's options to astraora's; a misspelt one is refused in one
    line that lists both."""
    searchpath = f"hydra.searchpath=[file://{lab}]"
    cfg = accepted([searchpath, f"{group}={name}"])
    assert cfg.device.family == "chip" if group != "task" else cfg.task.name == "lab_digits"
    line = refused(capsys, cli.check_group_overrides, [searchpath, f"{group}={misspelt}"])
    assert f"{group}={misspelt} is not allowed; choose one of [" in line and f"'{name}'" in line
    astraoras = {"device": "'mzi'", "task": "'digits'", "experiment": "'paper_cifar10'"}[group]
    assert astraoras in line


def test_config_dir_flag_and_a_primary_configs_search_path(lab, tmp_path, capsys):
    """``--config-dir DIR`` (any of Hydra's spellings) and a primary config of the user's (``-cn``) whose
    ``hydra.searchpath`` names the lab's folder: the same options as Hydra composes from."""
    for flag in (["--config-dir", str(lab)], ["-cd", str(lab)], [f"--config-dir={lab}"]):
        assert accepted([*flag, "device=chip"]).device._target_ == "mylab.devices.Chip"
        line = refused(capsys, cli.check_group_overrides, [*flag, "device=chp"])
        assert "device=chp is not allowed" in line and "'chip'" in line and "'mzi'" in line
    line = refused(capsys, cli.check_group_overrides, ["-m", "-cd", str(lab), "device=choice(chip,mzi,chp)"])
    assert line.startswith("error: device=chp is not allowed")  # each option of a sweep or list is checked
    primary = tmp_path / "primary"
    primary.mkdir()
    (primary / "lab.yaml").write_text(f"defaults:\n  - config\n  - _self_\nhydra:\n  searchpath:\n    - file://{lab}\n")
    assert accepted(["-cd", str(primary), "-cn", "lab", "experiment=lab_quick"]).trainer.max_steps == 3
    assert "'chip'" in refused(capsys, cli.check_group_overrides, ["-cd", str(primary), "-cn", "lab", "device=chp"])
    # without the user's folder the name is astraora's to refuse, as before
    assert "'chip'" not in refused(capsys, cli.check_group_overrides, ["device=chip"])


def test_a_missing_user_folder_is_named_in_one_line(tmp_path, capsys):
    line = refused(capsys, cli.check_group_overrides, [f"hydra.searchpath=[file://{tmp_path}/nope]", "device=chip"])
    assert f"{tmp_path}/nope is not available: no such folder" in line
    line = refused(capsys, cli.check_group_overrides, ["--config-dir", str(tmp_path / "nope"), "device=chip"])
    assert f"--config-dir {tmp_path / 'nope'} is not a folder" in line
    argv = ["--config-path", str(tmp_path), "device=chip"]  # another primary folder: Hydra alone checks it
    assert cli.config_sources(argv) == (None, argv)


@pytest.fixture
def search_path_plugin(lab, tmp_path, monkeypatch):
    """An installed lab package's Hydra SearchPathPlugin (hydra_plugins/<name>/__init__.py, Hydra's own
    mechanism): Hydra's plugin registry is rescanned with it on sys.path, and restored afterwards."""
    from hydra.core.plugins import Plugins
    from hydra.core.singleton import Singleton

    plugin = tmp_path / "site" / "hydra_plugins" / "mylab_configs"
    plugin.mkdir(parents=True)
    (plugin / "__init__.py").write_text(
        "from hydra.core.config_search_path import ConfigSearchPath\n"
        "from hydra.plugins.search_path_plugin import SearchPathPlugin\n\n\n"
        "class MyLabConfigs(SearchPathPlugin):\n"
        "    def manipulate_search_path(self, search_path: ConfigSearchPath) -> None:\n"
        f"        search_path.append(provider='mylab', path='file://{lab}')\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path / "site"))
    before = Singleton._instances.pop(Plugins, None)
    try:
        yield
    finally:
        Singleton._instances.pop(Plugins, None)
        if before is not None:
            Singleton._instances[Plugins] = before
        sys.modules.pop("hydra_plugins.mylab_configs", None)


def test_a_search_path_plugin_adds_the_users_folder(search_path_plugin, capsys):
    assert accepted(["device=chip"]).device.family == "chip"
    assert "'chip'" in refused(capsys, cli.check_group_overrides, ["device=chp"])
    assert "'chip'" in refused(capsys, server.check_device_override, ["device=chp"])


def test_the_servers_device_check_sees_the_users_folders(lab, capsys):
    """``astraora-device-server`` serves the lab's device by the same mechanisms; what it cannot serve
    (digital, remote) stays out of the list."""
    searchpath = f"hydra.searchpath=[file://{lab}]"
    server.check_device_override([searchpath, "device=chip"])
    server.check_device_override(["--config-dir", str(lab), "device=chip"])
    for argv in ([searchpath, "device=chp"], ["-cd", str(lab), "device=chp"]):
        line = refused(capsys, server.check_device_override, argv)
        assert "device=chp is not allowed; choose one of [" in line and "'chip'" in line and "'mzi'" in line
        assert "'digital'" not in line and "'remote'" not in line
    assert "'chip'" not in refused(capsys, server.check_device_override, ["device=chip"])


def test_hydra_composes_what_the_checks_accepted(lab, capsys, monkeypatch):
    """The command line end to end (``astraora-train --cfg job``, in-process: no training): Hydra itself
    composes the lab's device from astraora's CONFIG_DIR plus the user's folder."""
    monkeypatch.setattr(sys, "argv", ["astraora-train", "--cfg", "job", "--config-dir", str(lab), "device=chip"])
    cli.main()
    shown = capsys.readouterr().out
    assert "_target_: mylab.devices.Chip" in shown and "name: digits" in shown
