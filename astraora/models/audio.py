"""An ECAPA-TDNN-style encoder on log-mels whose embedding Linear is the physical layer.

It takes ``layer_factory(d_in, d_out, name)`` (see docs/CONTRACTS.md) and calls it once, for the
placement ``"embedding.physical"``; the module attribute path is the same name.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable

import torch
from torch import Tensor, nn

LayerFactory = Callable[[int, int, str], nn.Module]


def tdnn(c_in: int, c_out: int, kernel_size: int = 1, dilation: int = 1) -> nn.Sequential:
    """Conv1d (same length) → ReLU → BN: ``(B, c_in, T) → (B, c_out, T)``."""
    padding = dilation * (kernel_size - 1) // 2
    return nn.Sequential(
        nn.Conv1d(c_in, c_out, kernel_size, dilation=dilation, padding=padding), nn.ReLU(), nn.BatchNorm1d(c_out)
    )


class SEResBlock(nn.Module):
    """1×1 TDNN → dilated 3-tap TDNN → 1×1 TDNN → squeeze-excitation, plus the input.

    ``(B, C, T) → (B, C, T)``.
    """

    def __init__(self, channels: int, dilation: int, se_channels: int = 128):
        super().__init__()
        self.body = nn.Sequential(
            tdnn(channels, channels), tdnn(channels, channels, 3, dilation), tdnn(channels, channels)
        )
        self.excite = nn.Sequential(
            nn.AdaptiveAvgPool1d(1),
            nn.Conv1d(channels, se_channels, 1),
            nn.ReLU(),
            nn.Conv1d(se_channels, channels, 1),
            nn.Sigmoid(),
        )

    def forward(self, x: Tensor) -> Tensor:
        h = self.body(x)
        return x + h * self.excite(h)


def weighted_stats(x: Tensor, w: Tensor) -> tuple[Tensor, Tensor]:
    """Mean and standard deviation of ``x (B, C, T)`` over T with weights ``w`` summing to 1: each ``(B, C, 1)``."""
    mean = (w * x).sum(-1, keepdim=True)
    std = ((w * (x - mean) ** 2).sum(-1, keepdim=True)).clamp_min(1e-5).sqrt()
    return mean, std


class AttentiveStatsPool(nn.Module):
    """``(B, C, T) → (B, 2C)``: attention-weighted mean and std over time. The attention sees each
    frame together with the clip's plain mean and std (ECAPA's global context)."""

    def __init__(self, channels: int, attention_channels: int = 128):
        super().__init__()
        self.attention = nn.Sequential(
            tdnn(3 * channels, attention_channels), nn.Tanh(), nn.Conv1d(attention_channels, channels, 1)
        )

    def forward(self, x: Tensor) -> Tensor:
        frames = x.shape[-1]
        mean, std = weighted_stats(x, torch.full_like(x, 1.0 / frames))
        context = torch.cat([x, mean.expand(-1, -1, frames), std.expand(-1, -1, frames)], dim=1)
        mean, std = weighted_stats(x, torch.softmax(self.attention(context), dim=-1))
        return torch.cat([mean, std], dim=1).squeeze(-1)


class EcapaTDNN(nn.Module):
    """ECAPA-TDNN-style classifier on log-mels (the paper's audio model, Res2Net splits left out).

    x ``(B, n_mels, frames)`` → TDNN(n_mels → C, 5 taps) → SE-res blocks with ``dilations`` →
    their outputs concatenated → 1×1 TDNN (3C → 3C) → attentive statistics pooling ``(B, 6C)`` → BN →
    embedding: physical(6C → embedding_dim) → BN → Linear(embedding_dim → classes) → logits
    ``(B, num_classes)``. C is ``channels``; with three blocks the paper's 6144 → 192 is
    ``channels=1024, embedding_dim=192``.
    """

    def __init__(
        self,
        layer_factory: LayerFactory,
        num_classes: int,
        n_mels: int = 80,
        channels: int = 512,
        embedding_dim: int = 192,
        dilations: tuple[int, ...] = (2, 3, 4),
        attention_channels: int = 128,
    ):
        super().__init__()
        aggregated = channels * len(dilations)
        self.stem = tdnn(n_mels, channels, 5)
        self.blocks = nn.ModuleList(SEResBlock(channels, d) for d in dilations)
        self.aggregate = tdnn(aggregated, aggregated)
        self.pool = nn.Sequential(AttentiveStatsPool(aggregated, attention_channels), nn.BatchNorm1d(2 * aggregated))
        self.embedding = nn.Sequential(
            OrderedDict(
                physical=layer_factory(2 * aggregated, embedding_dim, "embedding.physical"),
                norm=nn.BatchNorm1d(embedding_dim),
            )
        )
        self.classifier = nn.Linear(embedding_dim, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        h = self.stem(x)
        outputs = []
        for block in self.blocks:
            h = block(h)
            outputs.append(h)
        return self.classifier(self.embedding(self.pool(self.aggregate(torch.cat(outputs, dim=1)))))
