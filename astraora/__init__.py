"""astraora: train hybrid neural networks with black-box physical layers."""

__version__ = "0.1.0"
