"""Zeroth-order estimators of the device's vector-Jacobian product.

:mod:`astraora.zo.validation` (the zo group's rules) imports no torch; the estimators and their
equations (:mod:`astraora.zo.estimator`, :mod:`astraora.zo.colored`) are imported on first use, so
that the command line can check a config without starting torch."""

from __future__ import annotations

import importlib
from collections.abc import Mapping
from typing import TYPE_CHECKING

from astraora.zo.validation import BETWEEN, DIRECTIONS, ESTIMATOR_DIRECTIONS, colored_conflicts, validate_zo

if TYPE_CHECKING:
    from astraora.zo.colored import ColoredEstimator, color_masks, colored_derivatives, colored_gradient
    from astraora.zo.estimator import ZOEstimator, zo_coefficients, zo_gradient, zo_phi, zo_probes

_LAZY = {
    **dict.fromkeys(("ZOEstimator", "zo_coefficients", "zo_gradient", "zo_phi", "zo_probes"), "estimator"),
    **dict.fromkeys(("ColoredEstimator", "color_masks", "colored_derivatives", "colored_gradient"), "colored"),
}


def __getattr__(name: str):
    if name in _LAZY:
        return getattr(importlib.import_module(f"astraora.zo.{_LAZY[name]}"), name)
    raise AttributeError(f"module 'astraora.zo' has no attribute {name!r}")


def make_estimator(zo_cfg: Mapping, *, generator) -> ZOEstimator | ColoredEstimator:
    """The estimator the ``zo`` config group names (checked by :func:`validate_zo`): colored finite
    differences for ``direction: colored``, the random-direction estimator otherwise."""
    from astraora.zo.colored import ColoredEstimator
    from astraora.zo.estimator import ZOEstimator

    validate_zo(zo_cfg)
    if zo_cfg.get("direction") == ColoredEstimator.direction:
        return ColoredEstimator(**{k: v for k, v in zo_cfg.items() if k != "direction"})
    return ZOEstimator(**{k: v for k, v in zo_cfg.items() if k != "reuse_readout"}, generator=generator)


def reuses_readout(zo: ZOEstimator | ColoredEstimator | None) -> bool:
    """Whether the estimator ``zo`` (None: a layer without ZO) takes A(θ) from the ledger's last
    full readout: its layer then keeps that reading, and a readout spares the estimate n queries."""
    return zo is not None and getattr(zo, "reuses_readout", False)


__all__ = [
    "ZOEstimator",
    "ColoredEstimator",
    "BETWEEN",
    "DIRECTIONS",
    "ESTIMATOR_DIRECTIONS",
    "color_masks",
    "colored_conflicts",
    "colored_derivatives",
    "colored_gradient",
    "make_estimator",
    "reuses_readout",
    "validate_zo",
    "zo_coefficients",
    "zo_gradient",
    "zo_phi",
    "zo_probes",
]
