"""Plain nn.Modules: backbones, the attention network, estimators and the joint model."""

from loupe.models.attention import AttentionNetwork, attention_dropout, entropy_regulariser, normalise
from loupe.models.backbones import Backbone, TinyCNN, create_backbone
from loupe.models.estimators import (
    exact_expectation,
    expectation_with_replacement,
    expectation_without_replacement,
    sample_cells,
)
from loupe.models.factory import build_model
from loupe.models.joint import JointAttentionSampler, JointOutput, attention_maps, magnification_totals

__all__ = [
    "AttentionNetwork",
    "Backbone",
    "JointAttentionSampler",
    "JointOutput",
    "TinyCNN",
    "attention_dropout",
    "attention_maps",
    "build_model",
    "create_backbone",
    "entropy_regulariser",
    "exact_expectation",
    "expectation_with_replacement",
    "expectation_without_replacement",
    "magnification_totals",
    "normalise",
    "sample_cells",
]
