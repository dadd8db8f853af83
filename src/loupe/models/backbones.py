"""Backbones for the thumbnail network h and the patch network f: a pathology foundation model by its registry
name (:mod:`loupe.models.encoders`), any timm model by name, or a tiny CNN.

Images come in as float tensors in [0, 1]; each backbone normalises them with its own mean and std (ImageNet's
for timm models, the publisher's for registry encoders), so pretrained weights see what they were trained on.
:class:`Backbone` itself is defined in :mod:`loupe.models.backbone_base`, below the encoders: this module builds
backbones by name and hands registry names to :mod:`loupe.models.encoders`, which never imports this one.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from torch import Tensor, nn

from loupe.errors import ConfigError
from loupe.models.backbone_base import IMAGENET_MEAN, IMAGENET_STD, Backbone, forward_features
from loupe.models.weights import load_weights_only, mismatch, state_dict_of

__all__ = ["TINY", "Backbone", "TinyCNN", "create_backbone", "forward_features", "is_backbone"]

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


def create_backbone(name: str, pretrained: bool | str | Path = False) -> Backbone:
    """Build a backbone by name (see :func:`_create`), remembering its name and the file its weights came from."""
    from loupe.models.encoders import ENCODERS, packaged_weights

    backbone = _create(name, pretrained)
    backbone.name = name
    if pretrained is True and name in ENCODERS:  # a packaged encoder (any other was refused)
        backbone.weights_file = packaged_weights(name)
    elif not isinstance(pretrained, bool):
        backbone.weights_file = Path(pretrained)
    return backbone


def _create(name: str, pretrained: bool | str | Path = False) -> Backbone:
    """Build a backbone: ``"tiny"``, ``"tiny_s8"``, a registry encoder (``"uni"``, ``"virchow2"``...:
    :data:`loupe.models.encoders.ENCODERS`) or any timm model name (``"inception_v3"``, ``"resnet34"``...).

    ``pretrained`` is False (random init), True (weights from the timm hub name), or the path of a local
    checkpoint file (a state dict for that timm model), which is how weights reach machines without internet.
    Registry encoders take a path (the file their authors publish): loupe never downloads them; ``True`` is
    accepted only by an encoder whose weights come in an installed package (``efficientnet-lite0-imagenet``).
    """
    from loupe.models.encoders import ENCODERS, create_encoder  # timm is imported when needed

    if name in ENCODERS:  # True: a packaged encoder's installed file (any other is refused: never downloaded)
        return create_encoder(name, pretrained)
    path = None if isinstance(pretrained, bool) else Path(pretrained)
    if path is not None and not path.is_file():
        raise ConfigError(f"pretrained checkpoint not found: {path} (give an existing file, true, or false)")
    if name in TINY:
        net = TinyCNN(TINY[name])
        if pretrained is True:
            raise ConfigError(f'the "{name}" backbone has no published weights: set pretrained to false or a path')
        if path is not None:
            state = state_dict_of(load_weights_only(path), path)
            problem = mismatch(net.state_dict(), state)
            if problem:
                raise ConfigError(f'{path} does not hold the "{name}" backbone\'s weights: {problem}')
            net.load_state_dict(state)
        return Backbone(net, net.num_features, (0.5, 0.5, 0.5), (0.25, 0.25, 0.25))

    import timm

    if not timm.is_model(name):
        raise ConfigError(f"unknown backbone {name!r}: use {', '.join(TINY)} or a timm model name (timm.list_models())")
    kwargs: dict = {"num_classes": 0, "global_pool": ""}
    if path is not None:  # timm loads the file itself, adapting it to the head-less model
        kwargs |= {"pretrained": True, "pretrained_cfg_overlay": {"file": str(path)}}
    else:
        kwargs["pretrained"] = bool(pretrained)
    model: nn.Module = timm.create_model(name, **kwargs)
    cfg: dict[str, Any] = dict(getattr(model, "pretrained_cfg", None) or {})
    return Backbone(
        model,
        int(getattr(model, "num_features")),  # noqa: B009  (timm's attribute, not typed on nn.Module)
        tuple(cfg.get("mean", IMAGENET_MEAN)),
        tuple(cfg.get("std", IMAGENET_STD)),
    )


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
