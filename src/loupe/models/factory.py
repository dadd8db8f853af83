"""Build the model of a config: the joint attention sampler (any number of magnifications) or a baseline."""

from __future__ import annotations

from torch import nn

from loupe.config import ModelConfig
from loupe.errors import ConfigError
from loupe.models.attention import AttentionNetwork
from loupe.models.backbones import create_backbone
from loupe.models.gated_mil import GatedAttentionMIL
from loupe.models.joint import JointAttentionSampler


def build_model(cfg: ModelConfig, n_classes: int) -> nn.Module:
    """The model ``cfg.architecture`` names, fitted to ``n_classes``.

    ``joint``: h and f are two separate networks, as in the paper; A and g are built to fit them (one
    magnification gives the single-magnification baseline). ``gated_mil``: f and a gated-attention head over every
    patch of the one magnification configured.
    """
    if cfg.architecture == "gated_mil":
        if len(cfg.magnifications) != 1:
            raise ConfigError(
                f"model.architecture gated_mil reads all patches of one magnification, got {len(cfg.magnifications)}"
                f" ({', '.join(cfg.magnifications)}): set model.magnifications to a single one, e.g. ['0.5']"
            )
        f = create_backbone(cfg.patch_backbone, cfg.patch_pretrained)
        return GatedAttentionMIL(f, n_classes, classifier_dropout=cfg.classifier_dropout)
    if cfg.architecture == "streamingclam":
        raise ConfigError(
            "model.architecture streamingclam is not built by loupe.models.build_model: use the StreamingCLAM "
            "workflow (its settings are under `streaming`)"
        )
    h = create_backbone(cfg.thumbnail_backbone, cfg.thumbnail_pretrained)
    f = create_backbone(cfg.patch_backbone, cfg.patch_pretrained)
    attention = AttentionNetwork(h.num_features, len(cfg.magnifications), cfg.normalisation, cfg.balance_magnifications)
    return JointAttentionSampler(
        h,
        f,
        attention,
        n_classes,
        k=cfg.k,
        replace=cfg.replace,
        attention_dropout=cfg.attention_dropout,
        classifier_dropout=cfg.classifier_dropout,
    )
