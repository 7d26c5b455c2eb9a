"""The low-rank surrogate Â = U S Vᵀ of a device and the integrators that keep it current."""

from astraora.surrogate.integrators import (
    ExactIntegrator,
    FrozenIntegrator,
    Integrator,
    PsiImplicitIntegrator,
    RebuildIntegrator,
    make_integrator,
)
from astraora.surrogate.lowrank import LowRankSurrogate

__all__ = [
    "LowRankSurrogate",
    "Integrator",
    "PsiImplicitIntegrator",
    "ExactIntegrator",
    "RebuildIntegrator",
    "FrozenIntegrator",
    "make_integrator",
]
