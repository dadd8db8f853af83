"""Plain nn.Modules behind one interface (:class:`SlideClassifier`): backbones, the attention network, estimators,
the joint model, gated-attention MIL, the streaming engine and StreamingCLAM, and the architecture registry."""

from loupe.models.attention import AttentionNetwork, attention_dropout, entropy_regulariser, normalise
from loupe.models.backbones import Backbone, TinyCNN, create_backbone
from loupe.models.estimators import (
    exact_expectation,
    expectation_with_replacement,
    expectation_without_replacement,
    sample_cells,
)
from loupe.models.factory import (
    ARCHITECTURES,
    ArchitectureEntry,
    architecture,
    build_model,
    check_config,
    resolve_inference,
)
from loupe.models.interface import (
    EmbeddingStore,
    InferenceSettings,
    PixelSource,
    SlideBatch,
    SlideClassifier,
    SlideOutput,
    WholeImage,
    magnification_totals,
    split_by_magnification,
)
from loupe.models.joint import JointAttentionSampler

__all__ = [
    "ARCHITECTURES",
    "ArchitectureEntry",
    "AttentionNetwork",
    "Backbone",
    "EmbeddingStore",
    "InferenceSettings",
    "JointAttentionSampler",
    "PixelSource",
    "SlideBatch",
    "SlideClassifier",
    "SlideOutput",
    "TinyCNN",
    "WholeImage",
    "architecture",
    "attention_dropout",
    "build_model",
    "check_config",
    "create_backbone",
    "entropy_regulariser",
    "exact_expectation",
    "expectation_with_replacement",
    "expectation_without_replacement",
    "magnification_totals",
    "normalise",
    "resolve_inference",
    "sample_cells",
    "split_by_magnification",
]
