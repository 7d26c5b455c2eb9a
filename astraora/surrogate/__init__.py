"""The low-rank surrogate Â = U S Vᵀ of a device, the integrators that keep it current, and its health check.

:mod:`astraora.surrogate.validation` (the surrogate and integrator groups' rules) imports no torch; the
surrogate, the integrators and the health check are imported on first use, so that the command line
can check a config without starting torch."""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

from astraora.surrogate.validation import validate_integrator, validate_surrogate

if TYPE_CHECKING:
    from astraora.surrogate.health import SurrogateHealth, batch_view
    from astraora.surrogate.integrators import (
        ExactIntegrator,
        FrozenIntegrator,
        Integrator,
        PsiImplicitIntegrator,
        RebuildIntegrator,
        make_integrator,
        psi_step,
    )
    from astraora.surrogate.lowrank import LowRankSurrogate

_LAZY = {
    "LowRankSurrogate": "lowrank",
    **dict.fromkeys(
        (
            "Integrator",
            "PsiImplicitIntegrator",
            "ExactIntegrator",
            "RebuildIntegrator",
            "FrozenIntegrator",
            "make_integrator",
            "psi_step",
        ),
        "integrators",
    ),
    **dict.fromkeys(("SurrogateHealth", "batch_view"), "health"),
}


def __getattr__(name: str):
    if name in _LAZY:
        return getattr(importlib.import_module(f"astraora.surrogate.{_LAZY[name]}"), name)
    raise AttributeError(f"module 'astraora.surrogate' has no attribute {name!r}")


__all__ = [
    "LowRankSurrogate",
    "Integrator",
    "PsiImplicitIntegrator",
    "ExactIntegrator",
    "RebuildIntegrator",
    "FrozenIntegrator",
    "make_integrator",
    "psi_step",
    "SurrogateHealth",
    "batch_view",
    "validate_integrator",
    "validate_surrogate",
]
