"""Zeroth-order estimators of the device's vector-Jacobian product."""

from astraora.zo.colored import ColoredEstimator, colored_conflicts
from astraora.zo.estimator import DIRECTIONS, ZOEstimator

ESTIMATOR_DIRECTIONS = (*DIRECTIONS, ColoredEstimator.direction)


def make_estimator(zo_cfg: dict, *, generator) -> ZOEstimator | ColoredEstimator:
    """The estimator the ``zo`` config group names: colored finite differences for
    ``direction: colored``, the random-direction estimator otherwise."""
    if zo_cfg.get("direction") == ColoredEstimator.direction:
        return ColoredEstimator(**{k: v for k, v in zo_cfg.items() if k != "direction"})
    return ZOEstimator(**zo_cfg, generator=generator)


def reuses_readout(zo: ZOEstimator | ColoredEstimator | None) -> bool:
    """Whether the estimator ``zo`` (None: a layer without ZO) takes A(θ) from the ledger's last
    full readout: its layer then keeps that reading, and a readout spares the estimate n queries."""
    return zo is not None and getattr(zo, "reuses_readout", False)


__all__ = [
    "ZOEstimator",
    "ColoredEstimator",
    "DIRECTIONS",
    "ESTIMATOR_DIRECTIONS",
    "colored_conflicts",
    "make_estimator",
    "reuses_readout",
]
