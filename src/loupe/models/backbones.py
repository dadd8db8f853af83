"""Backbones for the thumbnail network h and the patch network f: a pathology foundation model by its registry
name (:mod:`loupe.models.encoders`), any timm model by name, or a tiny CNN.

Images come in as float tensors in [0, 1]; each backbone normalises them with its own mean and std (ImageNet's
for timm models, the publisher's for registry encoders), so pretrained weights see what they were trained on.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from loupe.errors import ConfigError

#: The tiny CNNs, by name: stages of (conv, strided conv); "tiny" is /16, "tiny_s8" /8 (finer attention maps).
TINY = {"tiny": (16, 32, 64, 64), "tiny_s8": (16, 32, 64)}


class TinyCNN(nn.Module):
    """A small strided CNN (each stage halves the resolution) for CPU runs, tests and the demo."""

    def __init__(self, widths: tuple[int, ...] = (16, 32, 64, 64)) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        c_in = 3
        for w in widths:
            layers += [
                nn.Conv2d(c_in, w, 3, stride=1, padding=1, bias=False),
                nn.BatchNorm2d(w),
                nn.ReLU(inplace=True),
                nn.Conv2d(w, w, 3, stride=2, padding=1, bias=False),
                nn.BatchNorm2d(w),
                nn.ReLU(inplace=True),
            ]
            c_in = w
        self.body = nn.Sequential(*layers)
        self.num_features = c_in

    def forward_features(self, x: Tensor) -> Tensor:
        return self.body(x)


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
        self.register_buffer("mean", torch.tensor(mean).view(1, -1, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(std).view(1, -1, 1, 1), persistent=False)

    def feature_map(self, x: Tensor) -> Tensor:
        """(B, 3, H, W) in [0, 1] → (B, C, h, w)."""
        return forward_features(self.net, (x - self.mean) / self.std)

    def forward(self, x: Tensor) -> Tensor:
        """(B, 3, H, W) in [0, 1] → (B, C) by global average pooling of the feature map."""
        return self.feature_map(x).mean(dim=(2, 3))


def create_backbone(name: str, pretrained: bool | str | Path = False) -> Backbone:
    """Build a backbone: ``"tiny"``, ``"tiny_s8"``, a registry encoder (``"uni"``, ``"virchow2"``...:
    :data:`loupe.models.encoders.ENCODERS`) or any timm model name (``"inception_v3"``, ``"resnet34"``...).

    ``pretrained`` is False (random init), True (weights from the timm hub name), or the path of a local
    checkpoint file (a state dict for that timm model), which is how weights reach machines without internet.
    Registry encoders only take a path (the file their authors publish): loupe never downloads them.
    """
    from loupe.models.encoders import ENCODERS, create_encoder, no_download_error

    if name in ENCODERS:
        if pretrained is True:
            raise no_download_error(name, ENCODERS[name])
        return create_encoder(name, None if pretrained is False else pretrained)
    if name in TINY:
        net = TinyCNN(TINY[name])
        if pretrained is True:
            raise ConfigError(f'the "{name}" backbone has no published weights: set pretrained to false or a path')
        if pretrained:
            net.load_state_dict(_load_state_dict(Path(pretrained)))
        return Backbone(net, net.num_features, (0.5, 0.5, 0.5), (0.25, 0.25, 0.25))

    import timm

    if not timm.is_model(name):
        raise ConfigError(f"unknown backbone {name!r}: use {', '.join(TINY)} or a timm model name (timm.list_models())")
    kwargs: dict = {"num_classes": 0, "global_pool": ""}
    if isinstance(pretrained, (str, Path)) and not isinstance(pretrained, bool):
        path = Path(pretrained)
        if not path.is_file():
            raise ConfigError(f"pretrained checkpoint not found: {path} (give an existing file, true, or false)")
        kwargs |= {"pretrained": True, "pretrained_cfg_overlay": {"file": str(path)}}
    else:
        kwargs["pretrained"] = bool(pretrained)
    model: nn.Module = timm.create_model(name, **kwargs)
    cfg: dict[str, Any] = dict(getattr(model, "pretrained_cfg", None) or {})
    return Backbone(
        model,
        int(getattr(model, "num_features")),  # noqa: B009  (timm's attribute, not typed on nn.Module)
        tuple(cfg.get("mean", (0.485, 0.456, 0.406))),
        tuple(cfg.get("std", (0.229, 0.224, 0.225))),
    )


def _load_state_dict(path: Path) -> dict[str, Tensor]:
    if not path.is_file():
        raise ConfigError(f"pretrained checkpoint not found: {path}")
    state = torch.load(path, map_location="cpu", weights_only=True)
    return state.get("state_dict", state) if isinstance(state, dict) else state


def forward_features(net: nn.Module, x: Tensor) -> Tensor:
    """``net.forward_features(x)``: the spatial feature map of a timm model (or :class:`TinyCNN`)."""
    out: Tensor = net.forward_features(x)  # type: ignore[operator]  # timm's method, not typed on nn.Module
    return out


def is_backbone(name: str) -> bool:
    """Whether ``name`` is a network :func:`create_backbone` can build: a tiny CNN, a registry encoder or a timm
    model (what ``model.patch_backbone`` and ``joint.thumbnail_backbone`` accept)."""
    if not isinstance(name, str) or not name.strip():
        return False
    from loupe.models.encoders import ENCODERS

    if name in TINY or name in ENCODERS:
        return True
    import timm

    return bool(timm.is_model(name))
