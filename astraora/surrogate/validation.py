"""The rules of the ``surrogate`` and ``integrator`` config groups, in one place: :func:`validate_surrogate`
and :func:`validate_integrator` check a whole group (as composed, or as handed to a constructor) and raise
:class:`ConfigError` naming the key as ``surrogate.<key>`` / ``integrator.<key>``, its value and what is
allowed. Absent keys keep the constructors' defaults. No torch: the command line checks a config with
them before anything heavy is imported."""

from __future__ import annotations

from collections.abc import Mapping
from numbers import Integral, Real

from astraora.choices import AUTO, INTEGRATOR_NAMES, READOUT_RANKS, SKETCHES
from astraora.errors import ConfigError

__all__ = ["INTEGRATOR_CHOICES", "PSI_NAMES", "validate_integrator", "validate_surrogate"]

# integrator.name: an integrator, or auto (chosen per layer by its size)
INTEGRATOR_CHOICES = (*INTEGRATOR_NAMES, AUTO)
# the names whose options include psi_implicit's (samples, sketch, reuse_sketch)
PSI_NAMES = ("psi_implicit", AUTO)


def _refuse(group: str, key: str, value, allowed: str) -> None:
    raise ConfigError(f"{group}.{key}={value!r} is not allowed; {allowed}.")


def _is_int(value, low: int) -> bool:
    return isinstance(value, Integral) and not isinstance(value, bool) and value >= low


def _is_positive(value) -> bool:
    return isinstance(value, Real) and not isinstance(value, bool) and value > 0


def validate_surrogate(options: Mapping) -> None:
    """Raise :class:`ConfigError` for the first key of the surrogate group ``options`` that is refused:
    ``rank`` ('auto' or an integer >= 1), ``readout_rank`` (null or one of :data:`READOUT_RANKS`),
    ``health_threshold`` and ``health_growth`` (null: off, or a number > 0). Other keys are not checked."""
    rank = options.get("rank", AUTO)
    if rank != AUTO and not _is_int(rank, 1):
        _refuse("surrogate", "rank", rank, "choose 'auto' or an integer >= 1")
    setting = options.get("readout_rank")
    if setting is not None and setting not in READOUT_RANKS:
        _refuse("surrogate", "readout_rank", setting, f"choose one of {list(READOUT_RANKS)}")
    for key in ("health_threshold", "health_growth"):
        value = options.get(key)
        if value is not None and not _is_positive(value):
            _refuse("surrogate", key, value, "give a number > 0 (or null: off)")


def validate_integrator(options: Mapping) -> None:
    """Raise :class:`ConfigError` for the first key of the integrator group ``options`` that is refused:
    ``name`` (default psi_implicit; one of :data:`INTEGRATOR_CHOICES`), ``every`` (an integer >= 1),
    ``rebuild_every`` (an integer >= 0) and, for psi_implicit and auto, ``samples`` (an integer >= 1),
    ``sketch`` (one of :data:`SKETCHES`) and ``reuse_sketch`` (true or false). Other keys are not checked."""
    name = options.get("name", INTEGRATOR_NAMES[0])
    if name not in INTEGRATOR_CHOICES:
        _refuse("integrator", "name", name, f"choose one of {list(INTEGRATOR_CHOICES)}")
    if not _is_int(options.get("every", 1), 1):
        _refuse("integrator", "every", options["every"], "give an integer >= 1 (1: every θ step)")
    if not _is_int(options.get("rebuild_every", 0), 0):
        _refuse("integrator", "rebuild_every", options["rebuild_every"], "give an integer >= 0 (0: never)")
    if name not in PSI_NAMES:
        return
    if not _is_int(options.get("samples", 100), 1):
        _refuse("integrator", "samples", options["samples"], "give an integer >= 1")
    if options.get("sketch", SKETCHES[0]) not in SKETCHES:
        _refuse("integrator", "sketch", options["sketch"], f"choose one of {list(SKETCHES)}")
    if options.get("reuse_sketch", False) not in (True, False):
        _refuse("integrator", "reuse_sketch", options["reuse_sketch"], "choose true or false")
