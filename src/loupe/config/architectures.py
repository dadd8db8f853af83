"""Each architecture's own settings section (``joint``, ``gated_mil``, ``streamingclam``): what only it uses, the
ranges of those values, and what the rest of the settings code asks of an architecture (does it read one
magnification or several, which loupe 0.1 settings were its own). The models layer's registry
(:mod:`loupe.models.factory`) names each section as the settings its model is built from."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar, Literal, get_args

from loupe.config.checks import (
    BACKBONE,
    DROPOUT,
    FRACTION,
    NON_NEGATIVE,
    NON_NEGATIVE_INT,
    POSITIVE,
    POSITIVE_INT,
    PRETRAINED,
    THUMBNAIL,
    Rule,
    int_at_least,
)

InferenceMode = Literal["sample", "mean", "topk", "exhaustive", "adaptive"]
#: How the joint model pools patches at inference: one sample of k, the mean over several samples, the top-k
#: cells, every cell, or rounds of k until the prediction is sure enough (:mod:`loupe.models.adaptive`).
INFERENCE_MODES: tuple[str, ...] = get_args(InferenceMode)

#: Settings that loupe 0.1 kept under ``model`` (and ``train``) and that now live in an architecture's section.
_LEGACY_MODEL_KEYS = (
    "patch_size", "thumbnail_size", "thumbnail_backbone", "thumbnail_pretrained", "k", "replace", "normalisation",
    "balance_magnifications", "attention_dropout", "entropy_alpha", "estimator",
)  # fmt: skip
_LEGACY_TRAIN_KEYS = ("inference", "inference_samples")


@dataclass(frozen=True)
class ArchitectureSettings:
    """The base of every architecture's settings section (a frozen dataclass of its own values).

    Subclasses declare, as class attributes, what the settings code needs to know of them, so that no code outside
    the section names an architecture.
    """

    name: ClassVar[str]
    """The section's name in a config, and ``model.architecture``'s value that selects it."""
    one_magnification: ClassVar[bool] = False
    """Reads one magnification (``model.magnifications`` must have one), instead of any number."""
    RULES: ClassVar[dict[str, Rule]] = {}
    """The range of each value the types alone do not constrain, by setting name."""
    legacy_keys: ClassVar[tuple[str, ...]] = ()
    """Settings loupe 0.1 kept under ``model`` or ``train`` that were this architecture's (moved into its section
    when a 0.1 config is read; 0.1 ignored the others for it)."""
    legacy_section: ClassVar[str | None] = None
    """A loupe 0.1 section merged into this one."""

    def relation_error(self) -> str | None:
        """What is wrong between this section's values (a message naming the settings and the fix), or None."""
        return None


@dataclass(frozen=True)
class JointConfig(ArchitectureSettings):
    """The joint spatial and magnification attention-sampling model (``model.architecture: joint``)."""

    name: ClassVar[str] = "joint"
    legacy_keys: ClassVar[tuple[str, ...]] = (*_LEGACY_MODEL_KEYS, *_LEGACY_TRAIN_KEYS)
    RULES: ClassVar[dict[str, Rule]] = {
        "patch_size": int_at_least(8),
        "thumbnail_size": THUMBNAIL,
        "thumbnail_backbone": BACKBONE,
        "thumbnail_pretrained": PRETRAINED,
        "k": POSITIVE_INT,
        "attention_dropout": DROPOUT,
        "entropy_alpha": NON_NEGATIVE,
        "uniform_mix": FRACTION,
        "train_draws": POSITIVE_INT,
        "novelty_epochs": NON_NEGATIVE_INT,
        "novelty": NON_NEGATIVE,
        "inference_samples": POSITIVE_INT,
        "adaptive_epsilon": POSITIVE,
        "adaptive_budget": POSITIVE_INT,
    }

    patch_size: int = 32
    """Side of a patch (one grid cell) in pixels at its magnification."""
    thumbnail_size: tuple[int, int] = (96, 96)
    """(width, height) of the thumbnail given to h."""
    thumbnail_backbone: str = "tiny"
    thumbnail_pretrained: bool | str = False
    """false, true (the package's installed weights for "efficientnet-lite0-imagenet"; timm hub weights for a timm
    model name) or the path of a local checkpoint."""
    k: int = 5
    """Patches read per sample."""
    replace: bool = False
    """Sample with replacement (i.i.d.) or without (Gumbel-top-k)."""
    uniform_mix: float = 0.5
    """Training draws come from (1 − uniform_mix)·attention + uniform_mix·uniform over the cells, weighted by
    attention/proposal (unbiased): every cell keeps being read while the attention still knows nothing."""
    train_draws: int = 4
    """Independent draws of k cells per slide in a training step, each classified and scored on its own (the loss
    is their mean: the same objective as one draw, with 1/train_draws of its variance). Rare evidence is read
    train_draws times as often, at full weight; one draw (the paper's) is unstable on hard tasks. Costs
    train_draws × k patches per slide and step."""
    novelty: float = 1.0
    """Weight, during the first novelty_epochs epochs, of a pull of the attention towards the drawn cells whose
    patches look least like the rest of the slide: a prior that finds small lesions before the classifier can (it
    shapes the attention only; the estimate of Σ P f stays unbiased)."""
    novelty_epochs: int = 10
    magnification_aware: bool = True
    """A learned linear map per magnification after the patch network (identity at the start): the same pattern
    may mean something else at another scale, and the pooled features keep which magnification they came from."""
    normalisation: Literal["sigmoid", "softmax"] = "sigmoid"
    balance_magnifications: bool = True
    """Start every magnification with the same total attention, whatever its number of cells."""
    attention_dropout: float = 0.0
    entropy_alpha: float = 0.01
    estimator: Literal["sampled", "exhaustive"] = "sampled"
    """sampled: k cells per image; exhaustive: f on every cell and the exact sum (the all-patches baseline)."""
    inference: InferenceMode = "mean"
    """How validation, evaluation and prediction pool patches: one sample of k, the mean over
    inference_samples samples, the top-k cells, every cell, or adaptive (rounds of k new cells until the top
    class's Monte-Carlo standard error is under adaptive_epsilon or adaptive_budget patches are read)."""
    inference_samples: int = 8
    adaptive_epsilon: float = 0.02
    """Adaptive inference stops reading once the top class probability's standard error over the rounds (std over
    rounds / √rounds) is under this (after one more round, which keeps the estimate unbiased)."""
    adaptive_budget: int = 40
    """Most patches adaptive inference reads per slide (whole rounds of k; at least k)."""

    def relation_error(self) -> str | None:
        if self.inference == "adaptive" and self.adaptive_budget < self.k:
            return (
                f"joint.adaptive_budget={self.adaptive_budget}: expected at least joint.k={self.k} (adaptive "
                "inference reads whole rounds of k patches)"
            )
        return None


@dataclass(frozen=True)
class GatedMILConfig(ArchitectureSettings):
    """Gated-attention MIL over every valid patch of one magnification (``model.architecture: gated_mil``)."""

    name: ClassVar[str] = "gated_mil"
    one_magnification: ClassVar[bool] = True
    legacy_keys: ClassVar[tuple[str, ...]] = ("patch_size",)
    RULES: ClassVar[dict[str, Rule]] = {
        "patch_size": int_at_least(8),
        "attention_hidden": POSITIVE_INT,
        "attention_dropout": DROPOUT,
    }

    patch_size: int = 32
    """Side of a patch (one grid cell) in pixels at the magnification."""
    attention_hidden: int = 128
    attention_dropout: float = 0.0


@dataclass(frozen=True)
class StreamingCLAMConfig(ArchitectureSettings):
    """StreamingCLAM (``model.architecture: streamingclam``): the CNN ``model.patch_backbone`` runs over the whole
    image at ``model.magnifications[0]`` tile by tile. One grid cell is one position of the attention head: the
    trunk's stride × ``local_pool`` pixels (32 for a ResNet), derived, not set. ``data.batch_size`` slides are
    streamed one at a time and their gradients accumulated into one optimiser step."""

    name: ClassVar[str] = "streamingclam"
    one_magnification: ClassVar[bool] = True
    legacy_keys: ClassVar[tuple[str, ...]] = ("k",)
    legacy_section: ClassVar[str | None] = "streaming"
    RULES: ClassVar[dict[str, Rule]] = {
        "tile_size": int_at_least(32),
        "local_pool": POSITIVE_INT,
        "attention_hidden": POSITIVE_INT,
        "attention_dropout": DROPOUT,
        "instance_k": POSITIVE_INT,
        "instance_weight": FRACTION,
        "freeze_encoder_epochs": NON_NEGATIVE_INT,
        "k": POSITIVE_INT,
        "max_image_in_memory_mb": NON_NEGATIVE_INT,
        "stem_tile": NON_NEGATIVE_INT,
        "stem_depth": POSITIVE_INT,
    }

    tile_size: int = 2048
    """Side of the input tiles streamed through the trunk; memory grows with it, not with the slide."""
    local_pool: int = 1
    """Max-pool the feature map by this factor before attention (fewer, larger instances)."""
    attention_hidden: int = 128
    attention_dropout: float = 0.25
    instance_loss: bool = False
    """CLAM's instance-clustering loss on the most and least attended positions."""
    instance_k: int = 8
    """Positions per side (most / least attended) in the instance loss."""
    instance_weight: float = 0.3
    """Loss = (1 − w)·bag cross-entropy + w·instance loss (CLAM's 0.7 / 0.3)."""
    freeze_encoder_epochs: int = 0
    """Train only the head for this many epochs (no streamed backward), then the whole network."""
    calibrate_normalisation: bool | None = None
    """Before training, set the trunk's (frozen) normalisation statistics from training images; None: only for a
    randomly initialised trunk (pretrained ones keep theirs)."""
    crop_to_tissue: bool = True
    """Stream only the bounding box of the tissue (with tissue detection on); the rest is glass."""
    max_image_in_memory_mb: int = 2048
    """Largest image (MB of uint8 RGB, after the tissue crop) read whole into host memory; a larger one is read
    from the slide crop by crop as the streamed tiles need it (twice per step: the backward recomputes each tile),
    through a cache of 1 GB of chunks, so host memory stays near that cache, not the image. 0: always read per
    tile (measurements: docs/streamingclam.md)."""
    k: int = 5
    """Most attended positions listed as a slide's key cells in predict's outputs."""
    checkpoint_segments: bool = True
    """Recompute each residual block in a tile's backward (ResNet trunks): less memory per tile, one more forward
    per tile. Off, with large tiles, a step costs least time (docs/streamingclam.md)."""
    fold_normalisation: bool = False
    """Compute with the frozen BatchNorms folded into their convolutions: exact in real arithmetic, less time and
    memory per tile; off by default because in float32 its activations differ from the unfolded ones by rounding,
    which flips a few max-pool choices and so moves single weight gradients more than the unfolded streamed step
    does (docs/streamingclam.md)."""
    stem_tile: int = 512
    """Stream the trunk's first ``stem_depth`` children (a ResNet's stem: a 64-channel map at half resolution, the
    largest activation of a tile) over each tile's crop in sub-tiles of this side: the same result, a fraction of
    a tile's peak memory, a little more time. 0: off."""
    stem_depth: int = 1
    """How many leading children of the ResNet trunk (stem, then its residual blocks in order) are sub-streamed
    with ``stem_tile``: 1 the stem; 4 the stem and layer1 of a ResNet-34 (8 with layer2), less memory again for
    more time (``loupe bench streaming --stem-depth``)."""


#: Every architecture's settings section, by name (the order they are documented in).
SECTIONS: dict[str, type[ArchitectureSettings]] = {
    section.name: section for section in (JointConfig, GatedMILConfig, StreamingCLAMConfig)
}
#: Every architecture's name.
ARCHITECTURES: tuple[str, ...] = tuple(SECTIONS)
#: Every setting loupe 0.1 kept under ``model`` or ``train`` that now lives in a section.
LEGACY_MODEL_KEYS = _LEGACY_MODEL_KEYS
LEGACY_TRAIN_KEYS = _LEGACY_TRAIN_KEYS
