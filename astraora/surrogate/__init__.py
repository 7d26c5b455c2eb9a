"""The low-rank surrogate Â = U S Vᵀ of a device, the integrators that keep it current, and its health check."""

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
]
