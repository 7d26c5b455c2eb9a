"""astraora: train hybrid neural networks with black-box physical layers."""

from omegaconf import OmegaConf

__version__ = "0.1.0"


def _if_colored(direction, colored, otherwise):
    """``${if_colored:${zo.direction},A,B}``: A when θ's gradient comes from colored finite
    differences, else B. A device family's θ rate for its estimator (conf/physical/slm.yaml): a
    coherent gradient moves Adam's steps further than a noisy one (docs/archive/PARITY.md, "Colored finite
    differences"). Registered on import of any astraora module, before a config is composed."""
    return colored if direction == "colored" else otherwise


OmegaConf.register_new_resolver("if_colored", _if_colored, replace=True)

# ASTRAORA_REPRODUCIBLE=1: pin PyTorch's CPU kernels to one instruction-set path. It must happen before
# torch is imported, and every entry point imports this package first (astraora/reproducible.py).
from astraora import reproducible as _reproducible  # noqa: E402 - after the resolver, before anything imports torch

try:
    _reproducible.apply()
except _reproducible.ConfigError:  # a malformed ASTRAORA_REPRODUCIBLE: the command line refuses it in one line
    pass
