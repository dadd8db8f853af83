"""Build the joint model from its settings."""

from __future__ import annotations

from loupe.config import ModelConfig
from loupe.models.attention import AttentionNetwork
from loupe.models.backbones import create_backbone
from loupe.models.joint import JointAttentionSampler


def build_model(cfg: ModelConfig, n_classes: int) -> JointAttentionSampler:
    """h and f are two separate networks, as in the paper; A and g are built to fit them."""
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
