"""Early validation of a composed config: one clear line naming the key, before any data loads."""

from __future__ import annotations

import importlib
from collections.abc import Callable
from numbers import Integral, Real
from typing import Any

from omegaconf import DictConfig, ListConfig, OmegaConf

from astraora.choices import MODES
from astraora.errors import ConfigError
from astraora.surrogate.validation import PSI_NAMES, validate_integrator, validate_surrogate
from astraora.zo.validation import validate_zo, zo_step_problem

TASK_KINDS = ("classification", "language_model")
OPTIMIZERS = ("adam", "adamw", "sgd")
SCHEDULERS = ("cosine", "constant")
# Lightning's Trainer(accelerator=...) names and precision values (tests/test_preflight.py checks them
# against the installed Lightning); kept here so that the command line checks them without importing it.
ACCELERATORS = ("auto", "cpu", "gpu", "cuda", "mps", "tpu")
PRECISIONS = (
    "32-true",
    "16-mixed",
    "bf16-mixed",
    "16-true",
    "bf16-true",
    "64-true",
    "transformer-engine",
    "transformer-engine-float16",
    64,
    32,
    16,
    "64",
    "32",
    "16",
    "bf16",
)


def _get(cfg: DictConfig, key: str):
    value = OmegaConf.select(cfg, key, throw_on_missing=False, default="__absent__")
    if value == "__absent__":
        raise ConfigError(f"config key {key} is missing.")
    return value


def _check_int(cfg, key: str, low: int, high: int | None = None) -> None:
    value = _get(cfg, key)
    if isinstance(value, bool) or not isinstance(value, Integral):
        raise ConfigError(f"{key}={value!r} must be an integer.")
    if value < low or (high is not None and value > high):
        bound = f">= {low}" if high is None else f"between {low} and {high}"
        raise ConfigError(f"{key}={value} is not allowed; it must be {bound}.")


def _check_real(cfg, key: str, positive: bool = True, allow_none: bool = False) -> None:
    value = _get(cfg, key)
    if value is None and allow_none:
        return
    if isinstance(value, bool) or not isinstance(value, Real):
        raise ConfigError(f"{key}={value!r} must be a number.")
    if positive and not value > 0:
        raise ConfigError(f"{key}={value} must be > 0.")


def _check_betas(cfg, key: str) -> None:
    """Adam's (β1, β2): absent or null for torch's (0.9, 0.999), else two numbers in [0, 1)."""
    value = OmegaConf.select(cfg, key, default=None)
    if value is None:
        return
    items = list(value) if isinstance(value, (list, tuple, ListConfig)) else None
    if (
        items is None
        or len(items) != 2
        or not all(isinstance(b, Real) and not isinstance(b, bool) and 0 <= b < 1 for b in items)
    ):
        raise ConfigError(f"{key}={value!r} is not allowed; give two numbers in [0, 1), e.g. [0.9, 0.999].")


def _check_choice(cfg, key: str, allowed) -> None:
    value = _get(cfg, key)
    if value not in allowed:
        raise ConfigError(f"{key}={value!r} is not allowed; choose one of {list(allowed)}.")


def _check_target(cfg, key: str) -> None:
    target = _get(cfg, key)
    module, _, name = str(target).rpartition(".")
    try:
        getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError, ValueError):
        raise ConfigError(f"{key}={target!r} does not name an importable class.") from None


def _check_device_keys(cfg) -> None:
    """Every key of ``device`` is a parameter of its class (or one of the run's own keys): a misspelt or
    retired key is named here, before any data loads, instead of failing in the constructor."""
    import inspect

    from astraora.build import RUN_KEYS

    target = _get(cfg, "device._target_")
    module, _, name = str(target).rpartition(".")
    cls = getattr(importlib.import_module(module), name)
    given: set[str] = set()
    for klass in cls.__mro__:  # a subclass passes **kwargs on to its base: collect along the chain
        if "__init__" not in vars(klass):
            continue
        parameters = inspect.signature(klass.__init__).parameters
        given |= {key for key, p in parameters.items() if p.kind not in (p.VAR_KEYWORD, p.VAR_POSITIONAL)}
        if not any(p.kind is p.VAR_KEYWORD for p in parameters.values()):
            break
    else:
        return  # every class in the chain takes any keyword
    given -= {"self", "d_in", "d_out", "seed", "name"}
    unknown = [key for key in _get(cfg, "device") if key not in (*RUN_KEYS, "_target_", *given)]
    if unknown:
        raise ConfigError(
            f"device.{unknown[0]} is not a setting of {name} (device={_get(cfg, 'device.family')}); "
            f"its settings are {', '.join(sorted(given))}."
        )


def _int(low: int, none: bool = False) -> Callable[[Any], bool]:
    return lambda v: (none and v is None) or (isinstance(v, Integral) and not isinstance(v, bool) and v >= low)


def _real(
    low: float, high: float | None = None, *, low_open: bool = False, high_open: bool = True
) -> Callable[[Any], bool]:
    def test(v) -> bool:
        if isinstance(v, bool) or not isinstance(v, Real):
            return False
        above = v > low if low_open else v >= low
        return above and (high is None or (v < high if high_open else v <= high))

    return test


def _devices(v) -> bool:
    """Lightning's ``devices``: a count >= 1, -1 (all), "auto", a list of indices or "0,1"."""
    if isinstance(v, str):
        if v == "auto":
            return True
        parts = [x.strip() for x in v.split(",") if x.strip()]
        return v.strip() == "-1" or (bool(parts) and all(x.isdigit() for x in parts))
    if isinstance(v, (list, tuple, ListConfig)):
        return len(v) > 0 and all(_int(0)(x) for x in v)
    return _int(1)(v) or v == -1 and not isinstance(v, bool)


def _limit(v) -> bool:
    """``limit_*_batches``: null (all), a fraction in [0, 1] or a number of batches >= 0."""
    return v is None or _int(0)(v) or (isinstance(v, float) and 0.0 <= v <= 1.0)


def _epochs(v) -> bool:
    return _int(1)(v) or v == -1 and not isinstance(v, bool)


# Keys a new user edits most, checked where present: (key, test, the values allowed). Lightning and torch
# would otherwise refuse them with a traceback, some only after the run folder is made, or not at all
# (max_epochs=0 trains nothing).
RULES: tuple[tuple[str, Callable[[Any], bool], str], ...] = (
    ("trainer.accelerator", lambda v: v in ACCELERATORS, f"choose one of {list(ACCELERATORS)}"),
    (
        "trainer.precision",
        lambda v: v is None or (v in PRECISIONS and not isinstance(v, bool)),
        f"choose one of {list(PRECISIONS)}",
    ),
    ("trainer.devices", _devices, "give a number of devices >= 1, -1 (all), 'auto', or a list of device indices"),
    ("trainer.num_nodes", _int(1), "give an integer >= 1"),
    ("trainer.max_epochs", _epochs, "give an integer >= 1, or -1 (no limit) with trainer.max_steps >= 1"),
    ("trainer.max_steps", _epochs, "give an integer >= 1, or -1 (no limit: trainer.max_epochs decides)"),
    ("trainer.limit_train_batches", _limit, "give null (all), a fraction in [0, 1] or a number of batches >= 0"),
    ("trainer.limit_val_batches", _limit, "give null (all), a fraction in [0, 1] or a number of batches >= 0"),
    ("trainer.limit_test_batches", _limit, "give null (all), a fraction in [0, 1] or a number of batches >= 0"),
    ("trainer.check_val_every_n_epoch", _int(1, none=True), "give an integer >= 1 (or null: by steps)"),
    ("trainer.log_every_n_steps", _int(1), "give an integer >= 1"),
    ("trainer.num_sanity_val_steps", lambda v: _int(0)(v) or v == -1, "give an integer >= 0, or -1 (all)"),
    ("trainer.deterministic", lambda v: v in (True, False, "warn"), "choose true, false or 'warn'"),
    ("task.datamodule.batch_size", _int(1), "give an integer >= 1"),
    (
        "task.datamodule.num_workers",
        _int(0, none=True),
        "give an integer >= 0 (0: load in the training process; null: by the machine's cores)",
    ),
    ("task.model.hidden", _int(1), "give an integer >= 1"),
    ("task.model.channels", _int(1), "give an integer >= 1"),
    ("task.model.embedding_dim", _int(1), "give an integer >= 1"),
    ("task.model.attention_channels", _int(1), "give an integer >= 1"),
    ("task.model.n_layer", _int(1), "give an integer >= 1"),
    ("task.model.n_head", _int(1), "give an integer >= 1"),
    ("task.model.n_embd", _int(1), "give an integer >= 1"),
    ("task.model.block_size", _int(1), "give an integer >= 1"),
    ("task.model.physical_blocks", _int(0), "give an integer >= 0"),
    ("task.model.feature_dim", _int(1, none=True), "give an integer >= 1 (or null: from task.model.width)"),
    ("task.model.head_width", _int(1, none=True), "give an integer >= 1 (or null: from task.model.width)"),
    ("task.model.width", _real(0, low_open=True), "give a number > 0"),
    ("task.model.dropout", _real(0, 1), "give a number in [0, 1)"),
    ("task.optimizer.weight_decay", _real(0), "give a number >= 0"),
    ("task.optimizer.momentum", _real(0, 1), "give a number in [0, 1)"),
    ("physical_optimizer.weight_decay", _real(0), "give a number >= 0"),
    ("physical_optimizer.momentum", _real(0, 1), "give a number in [0, 1)"),
)


def _check_rules(cfg) -> None:
    """Every :data:`RULES` key present in ``cfg``, in order; the first refused value raises."""
    for key, test, allowed in RULES:
        value = OmegaConf.select(cfg, key, default="__absent__")
        if value != "__absent__" and not test(value):
            raise ConfigError(f"{key}={value!r} is not allowed; {allowed}.")
    steps, epochs = _get(cfg, "trainer.max_epochs"), OmegaConf.select(cfg, "trainer.max_steps", default=-1)
    if epochs == -1 and steps == -1 and OmegaConf.select(cfg, "trainer.max_time", default=None) is None:
        raise ConfigError(
            "trainer.max_epochs=-1 with trainer.max_steps=-1 trains without end; give trainer.max_epochs "
            ">= 1, or trainer.max_steps >= 1."
        )


def compose_entry(group: str, option: str, config_dir: str | None = None) -> DictConfig:
    """One option of a config group as a run composes it (its own defaults list applied, e.g. a
    device's shared blocks from ``conf/device/base/``), without the rest of the run's config: what
    ``conf/<group>/<option>.yaml`` alone gives after ``python train.py <group>=<option>``.
    Interpolations to the rest of the run (``${seed}``) are left unresolved."""
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    if GlobalHydra.instance().is_initialized() and config_dir is None:  # inside a Hydra app: its search path
        return compose(f"{group}/{option}")[group]
    if config_dir is None:
        from astraora.paths import CONFIG_DIR as config_dir
    with initialize_config_dir(config_dir=str(config_dir), version_base="1.3"):
        return compose(f"{group}/{option}")[group]


def validate(cfg: DictConfig, import_targets: bool = True) -> None:
    """Raise :class:`ConfigError` for the first bad value found in ``cfg``. ``import_targets=False``
    leaves out importing the ``_target_`` classes (the command line's quick check before Hydra
    starts; :func:`astraora.train.run` validates again with them)."""
    check_target = _check_target if import_targets else (lambda cfg, key: _get(cfg, key))
    _check_int(cfg, "seed", 0)
    if _get(cfg, "cpu_threads") is not None:
        _check_int(cfg, "cpu_threads", 1)
    _check_choice(cfg, "task.kind", TASK_KINDS)
    check_target(cfg, "task.datamodule._target_")
    check_target(cfg, "task.model._target_")
    _check_choice(cfg, "task.optimizer.name", OPTIMIZERS)
    _check_real(cfg, "task.optimizer.lr")
    _check_betas(cfg, "task.optimizer.betas")
    _check_choice(cfg, "scheduler.name", SCHEDULERS)
    _check_int(cfg, "scheduler.warmup_steps", 0)
    _check_int(cfg, "trainer.max_epochs", -1)
    _check_rules(cfg)
    if _get(cfg, "device.family") == "digital":
        return
    check_target(cfg, "device._target_")
    if import_targets:
        _check_device_keys(cfg)
    _check_choice(cfg, "mode", MODES)
    if OmegaConf.select(cfg, "physical_scheduler") is not None:
        _check_choice(cfg, "physical_scheduler.name", SCHEDULERS)
        _check_int(cfg, "physical_scheduler.warmup_steps", 0)
    _check_choice(cfg, "physical_optimizer.name", OPTIMIZERS)
    _check_real(cfg, "physical_optimizer.lr")
    _check_betas(cfg, "physical_optimizer.betas")
    for key in ("surrogate.rank", "surrogate.health_threshold"):
        _get(cfg, key)  # present (null where off)
    validate_surrogate(OmegaConf.to_container(_get(cfg, "surrogate"), resolve=True))
    _check_int(cfg, "device.driver.max_retries", 0)
    _check_real(cfg, "device.driver.timeout_s", allow_none=True)
    if str(_get(cfg, "mode")).startswith("zo"):
        validate_zo(OmegaConf.to_container(_get(cfg, "zo"), resolve=True))
        problem = zo_step_problem(
            OmegaConf.select(cfg, "device.nonideal.phase_bits", default=0),
            OmegaConf.select(cfg, "device.nonideal.queries", default="all"),
            _get(cfg, "zo.mu"),
        )
        if problem:
            raise ConfigError(problem)
    integrator = OmegaConf.to_container(_get(cfg, "integrator"), resolve=True)
    psi_keys = ("samples", "sketch") if integrator.get("name") in PSI_NAMES else ()
    for key in ("name", "every", "rebuild_every", *psi_keys):
        _get(cfg, f"integrator.{key}")  # present
    validate_integrator(integrator)
