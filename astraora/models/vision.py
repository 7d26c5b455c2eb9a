"""Image backbones whose head holds the physical layer.

Each takes ``layer_factory(d_in, d_out, name)`` (see docs/CONTRACTS.md) and calls it once, for the
placement ``"head.physical"``; the module attribute path is the same name.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable

from torch import Tensor, nn

LayerFactory = Callable[[int, int, str], nn.Module]


def hybrid_head(layer_factory: LayerFactory, d_in: int, width: int, num_classes: int) -> nn.Sequential:
    """physical(d_in → width) → BN → ReLU → Linear(width → classes), as in the paper's CIFAR-10 head."""
    return nn.Sequential(
        OrderedDict(
            physical=layer_factory(d_in, width, "head.physical"),
            norm=nn.BatchNorm1d(width),
            act=nn.ReLU(),
            classifier=nn.Linear(width, num_classes),
        )
    )


class MLP(nn.Module):
    """Flatten → Linear(in_features → H) → BN → ReLU → head, with the head's physical layer H → H.

    x ``(B, *)`` with ``prod(*) = in_features`` → logits ``(B, num_classes)``. ``hidden`` is H, so a
    square H×H device (an MZI mesh of size H for the default task).
    """

    def __init__(self, layer_factory: LayerFactory, num_classes: int, in_features: int, hidden: int = 64):
        super().__init__()
        self.stem = nn.Sequential(nn.Flatten(), nn.Linear(in_features, hidden), nn.BatchNorm1d(hidden), nn.ReLU())
        self.head = hybrid_head(layer_factory, hidden, hidden, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.stem(x))


def conv_group(c_in: int, c_out: int) -> nn.Sequential:
    """Conv3×3 → MaxPool2 → BN → ReLU → Conv3×3 → BN → ReLU.

    ``(B, c_in, H, W) → (B, c_out, H/2, W/2)``.
    """
    return nn.Sequential(
        nn.Conv2d(c_in, c_out, 3, padding=1, bias=False),
        nn.MaxPool2d(2),
        nn.BatchNorm2d(c_out),
        nn.ReLU(),
        nn.Conv2d(c_out, c_out, 3, padding=1, bias=False),
        nn.BatchNorm2d(c_out),
        nn.ReLU(),
    )


class CompactCNN(nn.Module):
    """A compact fast CNN after the paper's CIFAR-10 model (airbench-style conv groups).

    Three conv groups of widths ``128·width``, ``384·width`` and ``feature_dim``, each halving the
    resolution, then a global max-pool to ``(B, feature_dim)`` and the head
    physical(feature_dim → head_width) → BN → ReLU → Linear(head_width → classes).
    ``feature_dim`` and ``head_width`` default to ``512·width`` and ``1024·width`` (the paper's
    512 → 1024 at ``width=1``). The paper's data-dependent whitening stem is left out.
    x ``(B, in_channels, H, W)`` of any size ≥ 8 → logits ``(B, num_classes)``.
    """

    def __init__(
        self,
        layer_factory: LayerFactory,
        num_classes: int,
        in_channels: int = 3,
        width: float = 1.0,
        feature_dim: int | None = None,
        head_width: int | None = None,
    ):
        super().__init__()
        feature_dim = feature_dim or round(512 * width)
        head_width = head_width or round(1024 * width)
        c1, c2 = round(128 * width), round(384 * width)
        self.features = nn.Sequential(
            conv_group(in_channels, c1),
            conv_group(c1, c2),
            conv_group(c2, feature_dim),
            nn.AdaptiveMaxPool2d(1),
            nn.Flatten(),
        )
        self.head = hybrid_head(layer_factory, feature_dim, head_width, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.features(x))
