"""The rules of the ``zo`` config group, in one place: :func:`validate_zo` checks a whole group (as
composed, or as handed to an estimator's constructor) and raises :class:`ConfigError` naming the key
as ``zo.<key>``, its value and what is allowed. Absent keys keep the estimators' defaults. No torch:
the command line checks a config with it before anything heavy is imported."""

from __future__ import annotations

import math
from collections.abc import Mapping
from numbers import Integral, Real

from astraora.choices import BETWEEN, COLORED, DIRECTIONS, ESTIMATOR_DIRECTIONS
from astraora.errors import ConfigError

__all__ = [
    "BETWEEN",
    "COLORED",
    "DIRECTIONS",
    "ESTIMATOR_DIRECTIONS",
    "colored_conflicts",
    "phase_resolution",
    "validate_zo",
    "zo_step_problem",
]

# the random-direction estimator's keys; reuse_readout may be present as null (it is colored's)
RANDOM_DIRECTION_KEYS = (
    "samples",
    "chunk_size",
    "reuse_forward",
    "every",
    "between",
    "batch_rank",
    "batch_energy",
)
ZO_KEYS = ("direction", "mu", "two_sided", *RANDOM_DIRECTION_KEYS, "reuse_readout")
# colored: the random-direction keys are accepted and unused, except these, which must keep their off values
COLORED_OFF_VALUES = {"every": 1, "batch_rank": None, "batch_energy": None}


def _refuse(key: str, value, allowed: str) -> None:
    raise ConfigError(f"zo.{key}={value!r} is not allowed; {allowed}.")


def _is_int(value, low: int) -> bool:
    return isinstance(value, Integral) and not isinstance(value, bool) and value >= low


def colored_conflicts(zo: Mapping) -> str | None:
    """The error for the keys of a zo group (``direction`` left out or ``colored``) that colored
    finite differences cannot honour, or None."""
    allowed = {"direction", "mu", "two_sided", "reuse_readout", *RANDOM_DIRECTION_KEYS}
    unknown = sorted(set(zo) - allowed)
    if unknown:  # a key no estimator has (a misspelling, or an option the estimator no longer has)
        key = unknown[0]
        return f"zo.{key}={zo[key]!r} is not allowed; not a key of the zo group; its keys are {list(ZO_KEYS)}."
    active = sorted(k for k, off in COLORED_OFF_VALUES.items() if k in zo and zo[k] != off)
    if not active:
        return None
    names = ", ".join(f"zo.{k}={zo[k]!r}" for k in active)
    return (
        f"{names}: not available with zo.direction=colored, which draws no random directions and measures "
        f"every step; its keys are direction, mu, two_sided and reuse_readout ({', '.join(RANDOM_DIRECTION_KEYS)} "
        f"accepted and unused, zo.every=1, zo.batch_rank and zo.batch_energy null), "
        f"or use zo.direction=gaussian."
    )


def validate_zo(options: Mapping) -> None:
    """Raise :class:`ConfigError` for the first key of the zo group ``options`` that is refused.

    ``direction`` (default gaussian) picks the estimator: ``colored`` accepts the random-direction
    keys unused (see :func:`colored_conflicts`) and checks ``reuse_readout``; the random directions
    check ``samples``, ``chunk_size``, ``reuse_forward``, ``every`` and ``between`` and refuse
    ``reuse_readout`` (other than null) and any key the group does not have."""
    direction = options.get("direction", DIRECTIONS[0])
    if direction not in ESTIMATOR_DIRECTIONS:
        _refuse("direction", direction, f"choose one of {list(ESTIMATOR_DIRECTIONS)}")
    mu = options.get("mu", 1e-4)
    if isinstance(mu, bool) or not isinstance(mu, Real) or not mu > 0:
        _refuse("mu", mu, "give a number > 0")
    if not isinstance(options.get("two_sided", False), bool):
        _refuse("two_sided", options["two_sided"], "choose true or false")
    if direction == COLORED:
        problem = colored_conflicts(options)
        if problem:
            raise ConfigError(problem)
        if not isinstance(options.get("reuse_readout", True), bool):
            _refuse("reuse_readout", options["reuse_readout"], "choose true or false")
        return
    if options.get("reuse_readout") is not None:
        raise ConfigError(
            f"zo.reuse_readout={options['reuse_readout']!r}: only with zo.direction=colored "
            f"(random directions read no matrix out; zo.direction is {direction!r})."
        )
    unknown = sorted(set(options) - set(ZO_KEYS))
    if unknown:
        _refuse(unknown[0], options[unknown[0]], f"not a key of the zo group; its keys are {list(ZO_KEYS)}")
    if not _is_int(options.get("samples", 100), 1):
        _refuse("samples", options["samples"], "give an integer >= 1")
    chunk_size = options.get("chunk_size", "auto")
    if chunk_size != "auto" and not _is_int(chunk_size, 1):
        _refuse("chunk_size", chunk_size, "give 'auto' or an integer >= 1")
    if not isinstance(options.get("reuse_forward", True), bool):
        _refuse("reuse_forward", options["reuse_forward"], "choose true or false")
    if not _is_int(options.get("every", 1), 1):
        _refuse("every", options["every"], "give an integer >= 1 (1: every step)")
    if options.get("between", BETWEEN[0]) not in BETWEEN:
        _refuse("between", options["between"], f"choose one of {list(BETWEEN)}")
    batch_rank = options.get("batch_rank")
    if batch_rank is not None and not _is_int(batch_rank, 1):
        _refuse("batch_rank", batch_rank, "give null (the whole batch) or an integer >= 1")
    energy = options.get("batch_energy")
    if energy is not None and (isinstance(energy, bool) or not isinstance(energy, Real) or not 0 < energy <= 1):
        _refuse("batch_energy", energy, "give null (no cap) or a fraction in (0, 1]")


def phase_resolution(bits: int) -> float:
    """The phase step 2π / 2^bits of a ``bits``-bit phase shifter (radians)."""
    return 2 * math.pi / 2**bits


def zo_step_problem(phase_bits: int, queries: str, mu: float) -> str | None:
    """The one-line reason a ZO step μ cannot work on this device, or None when it can.

    With ``queries=all`` every perturbed setting θ + μu is quantized like any other; a step below
    half the resolution rounds (almost) every entry back to θ and the estimate is noise."""
    if isinstance(phase_bits, bool) or not isinstance(phase_bits, int) or phase_bits < 2 or queries != "all":
        return None  # no quantization (or an invalid bit count, which the device itself refuses)
    half = phase_resolution(phase_bits) / 2
    if mu >= half:
        return None
    return (
        f"zo.mu={mu:g} is below half the phase resolution 2π/2^{phase_bits} = {2 * half:.4g} rad of "
        f"device.nonideal.phase_bits={phase_bits} with device.nonideal.queries=all, so every perturbation "
        f"rounds away; use zo.mu >= {half:.4g} or device.nonideal.queries=forward."
    )
