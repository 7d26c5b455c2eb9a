"""The names a config may choose from, in one torch-free place: :mod:`astraora.config` checks a config
against them before anything heavy is imported (the command line refuses a bad value in about a second),
and the modules that implement each choice import their names from here."""

from __future__ import annotations

# How a physical layer's gradients are obtained: <θ's gradient>+<the input gradient> (ALGORITHM.md).
MODES = ("zo+sm", "exact+sm", "zo+exact", "exact")

# Random directions of the zeroth-order estimator; colored finite differences draw none.
DIRECTIONS = ("gaussian", "rademacher", "sphere")
COLORED = "colored"
ESTIMATOR_DIRECTIONS = (*DIRECTIONS, COLORED)
# What θ gets on the steps zo.every skips (zo.between): the optimizer's moments carry it on, or the last estimate.
BETWEEN = ("momentum", "last")

# The surrogate's integrators (integrator.name), and "auto": chosen per layer by its size.
INTEGRATOR_NAMES = ("psi_implicit", "exact", "rebuild", "frozen")
AUTO = "auto"
# psi_implicit's random sketch of the θ step (integrator.sketch).
SKETCHES = ("gaussian", "orthogonal")
# The rank of the surrogate a full readout rebuilds (surrogate.readout_rank).
READOUT_RANKS = ("same", "full")
