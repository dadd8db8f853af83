"""The architecture registry: a name (``model.architecture``) → how its model is built from a run's settings and
what its slides' grids look like. Adding an architecture is one module (a :class:`SlideClassifier`), one settings
section in :mod:`loupe.config` and one entry here."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from loupe.config import INFERENCE_MODES, Config
from loupe.errors import ConfigError
from loupe.models.interface import InferenceSettings, SlideClassifier


@dataclass(frozen=True)
class ArchitectureEntry:
    """How one architecture is built and read."""

    build: Callable[[Config, int], SlideClassifier]
    """The model of a config, fitted to a number of classes (random or configured pretrained weights)."""
    cell_size: Callable[[Config], int]
    """Side of one grid cell in pixels at its magnification (the patch, or one position of a whole-image model)."""
    thumbnail_size: Callable[[Config], tuple[int, int]]
    """(width, height) of the thumbnails the catalog prepares for it."""
    inference: Callable[[Config], InferenceSettings]
    """Its default inference settings (evaluate, predict, validation)."""
    inference_modes: tuple[str, ...] = ("exhaustive",)
    """The ``--inference`` modes it accepts (the others do not apply: it always reads every patch)."""


#: Thumbnails prepared for architectures that do not look at them (they are cached, cheap and small).
UNUSED_THUMBNAIL = (96, 96)


def _build_joint(cfg: Config, n_classes: int) -> SlideClassifier:
    from loupe.models.attention import AttentionNetwork
    from loupe.models.backbones import create_backbone
    from loupe.models.joint import JointAttentionSampler

    j = cfg.joint
    h = create_backbone(j.thumbnail_backbone, j.thumbnail_pretrained)
    f = create_backbone(cfg.model.patch_backbone, cfg.model.patch_pretrained)
    attention = AttentionNetwork(
        h.map_channels, len(cfg.model.magnifications), j.normalisation, j.balance_magnifications
    )
    return JointAttentionSampler(
        h,
        f,
        attention,
        n_classes,
        k=j.k,
        replace=j.replace,
        uniform_mix=j.uniform_mix,
        train_draws=j.train_draws,
        novelty_epochs=j.novelty_epochs,
        novelty=j.novelty,
        magnification_aware=j.magnification_aware,
        attention_dropout=j.attention_dropout,
        classifier_dropout=cfg.model.classifier_dropout,
        estimator=j.estimator,
        entropy_alpha=j.entropy_alpha,
        inference=_joint_inference(cfg),
        freeze_patch_net=cfg.model.freeze_patch_backbone,
    )


def _joint_inference(cfg: Config) -> InferenceSettings:
    return InferenceSettings(cfg.joint.inference, cfg.joint.inference_samples, cfg.joint.k)


def _build_gated_mil(cfg: Config, n_classes: int) -> SlideClassifier:
    from loupe.models.backbones import create_backbone
    from loupe.models.gated_mil import GatedAttentionMIL

    f = create_backbone(cfg.model.patch_backbone, cfg.model.patch_pretrained)
    g = cfg.gated_mil
    return GatedAttentionMIL(
        f,
        n_classes,
        hidden=g.attention_hidden,
        attention_dropout=g.attention_dropout,
        classifier_dropout=cfg.model.classifier_dropout,
        freeze_patch_net=cfg.model.freeze_patch_backbone,
    )


def _build_streamingclam(cfg: Config, n_classes: int) -> SlideClassifier:
    from loupe.models.streamingclam import build_streamingclam

    return build_streamingclam(cfg.model, cfg.streamingclam, n_classes)


def _streamingclam_cell(cfg: Config) -> int:
    from loupe.models.streamingclam import cell_size

    return cell_size(cfg.model, cfg.streamingclam)


ARCHITECTURES: dict[str, ArchitectureEntry] = {
    "joint": ArchitectureEntry(
        build=_build_joint,
        cell_size=lambda cfg: cfg.joint.patch_size,
        thumbnail_size=lambda cfg: (int(cfg.joint.thumbnail_size[0]), int(cfg.joint.thumbnail_size[1])),
        inference=_joint_inference,
        inference_modes=INFERENCE_MODES,
    ),
    "gated_mil": ArchitectureEntry(
        build=_build_gated_mil,
        cell_size=lambda cfg: cfg.gated_mil.patch_size,
        thumbnail_size=lambda cfg: UNUSED_THUMBNAIL,
        inference=lambda cfg: InferenceSettings("exhaustive", 1, 0),
    ),
    "streamingclam": ArchitectureEntry(
        build=_build_streamingclam,
        cell_size=_streamingclam_cell,
        thumbnail_size=lambda cfg: UNUSED_THUMBNAIL,
        inference=lambda cfg: InferenceSettings("exhaustive", 1, cfg.streamingclam.k),
    ),
}


def architecture(cfg: Config) -> ArchitectureEntry:
    """The registry entry of a config's architecture."""
    try:
        return ARCHITECTURES[cfg.model.architecture]
    except KeyError:
        raise ConfigError(
            f"model.architecture={cfg.model.architecture!r}: expected one of {', '.join(ARCHITECTURES)}"
        ) from None


def build_model(cfg: Config, n_classes: int) -> SlideClassifier:
    """The model ``cfg.model.architecture`` names, fitted to ``n_classes``.

    ``joint``: h and f are two separate networks, as in the paper; A and g are built to fit them (one
    magnification gives the single-magnification baseline). ``gated_mil``: f and a gated-attention head over every
    patch of its one magnification. ``streamingclam``: the streamed trunk and its gated-attention head.
    """
    return architecture(cfg).build(cfg, n_classes)


def resolve_inference(
    cfg: Config, mode: str | None = None, samples: int | None = None, k: int | None = None
) -> InferenceSettings:
    """The inference settings asked for (``--inference``, ``--samples``, ``--k``), defaulting to the run's; a
    setting the architecture does not use is refused."""
    entry = architecture(cfg)
    default = entry.inference(cfg)
    name = cfg.model.architecture
    if mode is not None and mode not in entry.inference_modes:
        raise ConfigError(
            f"--inference {mode}: model.architecture {name} accepts {', '.join(entry.inference_modes)} "
            f"(it reads every patch)"
        )
    if samples is not None and (samples < 1 or name != "joint"):
        raise ConfigError(
            f"--samples {samples}: expected an integer ≥ 1 for the joint model's mean mode"
            if samples < 1
            else f"--samples: not used by model.architecture {name} (nothing is sampled)"
        )
    if k is not None:
        if k < 1:
            raise ConfigError(f"--k {k}: expected an integer ≥ 1 (patches read per sample)")
        if name == "gated_mil":
            raise ConfigError("--k: not used by model.architecture gated_mil (it reads every patch)")
    return InferenceSettings(mode or default.mode, samples or default.samples, k or default.k)
