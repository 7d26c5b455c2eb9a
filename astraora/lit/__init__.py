"""LightningModules: manual optimisation of digital and physical parameters, metric logging."""

from astraora.lit.module import ClassificationModule, HybridModule, LanguageModelModule

__all__ = ["HybridModule", "ClassificationModule", "LanguageModelModule"]
