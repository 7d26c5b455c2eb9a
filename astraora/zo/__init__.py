"""Zeroth-order estimators of the device's vector-Jacobian product."""

from astraora.zo.estimator import DIRECTIONS, ZOEstimator

__all__ = ["ZOEstimator", "DIRECTIONS"]
