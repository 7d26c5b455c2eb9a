"""The surrogate and integrator groups' rules (astraora.surrogate.validation): each key refuses its bad
values in one line that names it, the constructors and the config check give the same message for the
same value, and the rules import no torch."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch
from conftest import REPO

from astraora.config import validate
from astraora.errors import ConfigError
from astraora.surrogate import (
    FrozenIntegrator,
    PsiImplicitIntegrator,
    RebuildIntegrator,
    SurrogateHealth,
    make_integrator,
    validate_integrator,
    validate_surrogate,
)
from astraora.surrogate.auto import readout_rank, resolve_rank

# (group, key, bad value, the value on the command line, a fragment of what is allowed)
BAD = [
    ("surrogate", "rank", 0, "0", "'auto' or an integer >= 1"),
    ("surrogate", "rank", "big", "big", "'auto' or an integer >= 1"),
    ("surrogate", "rank", True, "true", "'auto' or an integer >= 1"),
    ("surrogate", "rank", 2.5, "2.5", "'auto' or an integer >= 1"),
    ("surrogate", "readout_rank", "all", "all", "['same', 'full']"),
    ("surrogate", "health_threshold", 0, "0", "a number > 0 (or null: off)"),
    ("surrogate", "health_threshold", "high", "high", "a number > 0 (or null: off)"),
    ("surrogate", "health_growth", -1, "-1", "a number > 0 (or null: off)"),
    ("surrogate", "health_growth", False, "false", "a number > 0 (or null: off)"),
    ("integrator", "name", "magic", "magic", "['psi_implicit', 'exact', 'rebuild', 'frozen', 'auto']"),
    ("integrator", "every", 0, "0", "an integer >= 1"),
    ("integrator", "every", 1.5, "1.5", "an integer >= 1"),
    ("integrator", "every", True, "true", "an integer >= 1"),
    ("integrator", "rebuild_every", -1, "-1", "an integer >= 0 (0: never)"),
    ("integrator", "rebuild_every", "x", "x", "an integer >= 0 (0: never)"),
    ("integrator", "samples", 0, "0", "an integer >= 1"),
    ("integrator", "samples", "many", "many", "an integer >= 1"),
    ("integrator", "sketch", "x", "x", "['gaussian', 'orthogonal']"),
    ("integrator", "reuse_sketch", "maybe", "maybe", "true or false"),
    ("integrator", "reuse_sketch", 2, "2", "true or false"),
]
GOOD = {
    "surrogate": [
        {"rank": "auto", "readout_rank": "same", "health_threshold": None, "health_growth": None},
        {"rank": 1, "readout_rank": "full", "health_threshold": 0.5, "health_growth": 2},
        {"readout_rank": None},
        {},
    ],
    "integrator": [
        {"name": name, "every": 1, "rebuild_every": 0, "samples": 1, "sketch": sketch, "reuse_sketch": reuse}
        for name in ("psi_implicit", "auto")
        for sketch in ("gaussian", "orthogonal")
        for reuse in (True, False)
    ]
    + [
        {"name": "rebuild", "every": 10, "rebuild_every": 3},
        {"name": "frozen", "samples": 0, "sketch": "unused"},  # psi_implicit's keys are not its own
        {"name": "exact"},
        {},
    ],
}
VALIDATE = {"surrogate": validate_surrogate, "integrator": validate_integrator}
IDS = [f"{group}.{key}={value!r}" for group, key, value, _, _ in BAD]


def _message(group: str, key: str, value) -> str:
    options = {"name": "psi_implicit"} if group == "integrator" else {}
    with pytest.raises(ConfigError) as err:
        VALIDATE[group]({**options, key: value})
    return str(err.value)


@pytest.mark.parametrize(("group", "key", "value", "_cli", "allowed"), BAD, ids=IDS)
def test_each_rule_refuses_its_bad_values_naming_the_key(group, key, value, _cli, allowed):
    message = _message(group, key, value)
    assert message.startswith(f"{group}.{key}={value!r} is not allowed; ")
    assert allowed in message and message.endswith(".") and "\n" not in message


@pytest.mark.parametrize("group", ["surrogate", "integrator"])
def test_the_accepted_values_pass(group):
    for options in GOOD[group]:
        VALIDATE[group](options)


def _construct(group: str, key: str, value):
    """The constructor or factory that takes ``group.key``, given ``value``."""
    generator = torch.Generator().manual_seed(0)
    if (group, key) == ("surrogate", "rank"):
        return resolve_rank(value, 8, 8)
    if (group, key) == ("surrogate", "readout_rank"):
        return readout_rank(value, {"name": "rebuild"}, 8, 8, 2)
    if group == "surrogate":
        return SurrogateHealth(**{key.removeprefix("health_"): value})
    if key == "name":
        return make_integrator(value, generator=generator)
    return make_integrator("psi_implicit", generator=generator, **{key: value})


@pytest.mark.parametrize(("group", "key", "value", "_cli", "_allowed"), BAD, ids=IDS)
def test_constructors_give_the_rules_message(group, key, value, _cli, _allowed):
    with pytest.raises(ConfigError) as err:
        _construct(group, key, value)
    assert str(err.value) == _message(group, key, value)


@pytest.mark.parametrize(("key", "value"), [("every", 0), ("rebuild_every", -2), ("every", 2.0)])
def test_every_integrator_class_checks_its_schedule(key, value):
    expected = _message("integrator", key, value)
    for cls in (RebuildIntegrator, FrozenIntegrator):
        with pytest.raises(ConfigError) as err:
            cls(**{key: value})
        assert str(err.value) == expected
    with pytest.raises(ConfigError) as err:
        PsiImplicitIntegrator(generator=torch.Generator(), **{key: value})
    assert str(err.value) == expected


def test_auto_is_resolved_before_an_integrator_is_built():
    validate_integrator({"name": "auto"})
    with pytest.raises(ConfigError, match=r"^integrator\.name='auto' is not allowed here; resolve it per layer"):
        make_integrator("auto", generator=torch.Generator())


@pytest.mark.parametrize(("group", "key", "value", "cli", "_allowed"), BAD, ids=IDS)
def test_config_gives_the_rules_message(make_cfg, group, key, value, cli, _allowed):
    overrides = [f"{group}.{key}={cli}"]
    if group == "integrator" and key != "name":
        overrides.insert(0, "integrator=psi_implicit")
    with pytest.raises(ConfigError) as err:
        validate(make_cfg(*overrides), import_targets=False)
    assert str(err.value) == _message(group, key, value)


def test_the_rules_import_no_torch():
    code = (
        "import sys; import astraora.surrogate.validation; from astraora.surrogate import validate_surrogate; "
        "import astraora.config; assert 'torch' not in sys.modules, sorted(m for m in sys.modules if 'torch' in m)"
    )
    result = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
