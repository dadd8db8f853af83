"""What every backbone is: a network with the input normalisation it was trained with, giving a feature map and a
pooled embedding. Below both :mod:`loupe.models.encoders` (published encoders) and :mod:`loupe.models.backbones`
(which builds any backbone by name), so that neither imports the other's module to get it.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import Tensor, nn

#: ImageNet's per-channel mean and std of images in [0, 1]: the normalisation of timm's ImageNet weights and of
#: most published encoders.
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


class Backbone(nn.Module):
    """A feature extractor with a spatial map (for h) and a pooled embedding (for f)."""

    mean: Tensor
    std: Tensor

    def __init__(self, net: nn.Module, num_features: int, mean: tuple[float, ...], std: tuple[float, ...]) -> None:
        super().__init__()
        self.net = net
        self.num_features = num_features
        #: Channels of :meth:`feature_map` (the thumbnail network's output); equal to ``num_features`` except for
        #: registry encoders whose embedding is not a token (Virchow2's class ‖ mean, CONCH's pooled 512).
        self.map_channels = num_features
        self.name = ""
        """The name it was built by (``create_backbone``): a registry, timm or tiny name."""
        self.weights_file: Path | None = None
        """The file its weights were loaded from (a path setting, or a packaged encoder's installed file); None for
        random or timm-hub weights. A frozen backbone with a file is kept out of checkpoints (recorded by name and
        the file's SHA-256 instead)."""
        self.register_buffer("mean", torch.tensor(mean).view(1, -1, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(std).view(1, -1, 1, 1), persistent=False)

    def feature_map(self, x: Tensor) -> Tensor:
        """(B, 3, H, W) in [0, 1] → (B, C, h, w)."""
        return forward_features(self.net, (x - self.mean) / self.std)

    def forward(self, x: Tensor) -> Tensor:
        """(B, 3, H, W) in [0, 1] → (B, C) by global average pooling of the feature map."""
        return self.feature_map(x).mean(dim=(2, 3))


def forward_features(net: nn.Module, x: Tensor) -> Tensor:
    """``net.forward_features(x)``: the spatial feature map of a timm model (or a tiny CNN)."""
    out: Tensor = net.forward_features(x)  # type: ignore[operator]  # timm's method, not typed on nn.Module
    return out
