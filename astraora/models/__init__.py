"""Backbones per modality that place the physical layer(s) where configured."""
