"""The architecture registry: a name (``model.architecture``) → its settings section, how its model is built from
them, what its slides' grids look like and what it reads. Everything outside an architecture's own module asks its
entry here, never its name.

Adding an architecture is one module (a :class:`SlideClassifier` with ``from_settings``), its settings section
(:mod:`loupe.config.architectures`, a field of :class:`~loupe.config.Config`) and one entry in
:data:`ARCHITECTURES`.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass, replace
from typing import Any

from loupe.config import (
    INFERENCE_MODES,
    SECTIONS,
    ArchitectureSettings,
    Config,
    GatedMILConfig,
    JointConfig,
    StreamingCLAMConfig,
)
from loupe.errors import ConfigError
from loupe.models.gated_mil import GatedAttentionMIL
from loupe.models.interface import InferenceSettings, SlideClassifier
from loupe.models.joint import JointAttentionSampler, inference_settings
from loupe.models.streamingclam import StreamingCLAM, cell_size

#: A network a model builds from the settings: (setting prefix, e.g. "model.patch", backbone name, pretrained).
Network = tuple[str, str, bool | str]


@dataclass(frozen=True)
class WholeImageReading:
    """How a whole-image architecture's images are read (see :class:`loupe.data.pixels.SlidePixels`)."""

    crop_to_tissue: bool
    """Only the bounding box of the tissue (when tissue detection is on)."""
    max_image_mb: int
    """Largest image held whole in host memory; larger ones are read region by region."""


def _patch_network(cfg: Config) -> list[Network]:
    return [("model.patch", cfg.model.patch_backbone, cfg.model.patch_pretrained)]


def _unchanged(cfg: Config, state_dict: Mapping[str, Any]) -> Config:
    return cfg


#: Thumbnails prepared for architectures that do not look at them (they are cached, cheap and small).
UNUSED_THUMBNAIL = (96, 96)


@dataclass(frozen=True)
class ArchitectureEntry:
    """What the rest of loupe asks of one architecture."""

    settings: type[ArchitectureSettings]
    """Its settings section (the ``model.architecture`` value is the section's ``name``)."""
    build: Callable[[Config, int], SlideClassifier]
    """The model of a config, fitted to a number of classes (random or configured pretrained weights)."""
    cell_size: Callable[[Config], int]
    """Side of one grid cell in pixels at its magnification (the patch, or one position of a whole-image model)."""
    inference: Callable[[Config], InferenceSettings]
    """Its default inference settings (evaluate, predict, validation)."""
    thumbnail_size: Callable[[Config], tuple[int, int]] = lambda cfg: UNUSED_THUMBNAIL
    """(width, height) of the thumbnails the catalog prepares for it."""
    inference_modes: tuple[str, ...] = ("exhaustive",)
    """The ``--inference`` modes it accepts (only ``exhaustive``: it always reads every patch)."""
    samples: bool = False
    """Averages several samples at inference (``--samples`` applies)."""
    k: bool = False
    """Has a number of cells read or reported (``--k`` applies)."""
    networks: Callable[[Config], list[Network]] = _patch_network
    """The networks it builds from the settings, each with the settings that name it and its weights."""
    streams_trunk: bool = False
    """Streams a convolutional trunk over the whole image (so takes no vision transformer)."""
    whole_image: Callable[[Config], WholeImageReading] | None = None
    """How its whole images are read, when it reads whole images (instead of patches)."""
    migrate_checkpoint: Callable[[Config, Mapping[str, Any]], Config] = _unchanged
    """The settings an older checkpoint of it was trained with, from its weights (e.g. a part added since)."""

    @property
    def name(self) -> str:
        return self.settings.name

    @property
    def reads_one_magnification(self) -> bool:
        return self.settings.one_magnification


def _joint_without_maps(cfg: Config, state_dict: Mapping[str, Any]) -> Config:
    """A joint model trained before per-magnification maps existed (earlier loupe runs) loads without them."""
    if cfg.joint.magnification_aware and not any(k.startswith("magnification_maps.") for k in state_dict):
        return replace(cfg, joint=replace(cfg.joint, magnification_aware=False))
    return cfg


ARCHITECTURES: dict[str, ArchitectureEntry] = {
    entry.name: entry
    for entry in (
        ArchitectureEntry(
            settings=JointConfig,
            build=lambda cfg, n: JointAttentionSampler.from_settings(cfg.model, cfg.joint, n),
            cell_size=lambda cfg: cfg.joint.patch_size,
            inference=lambda cfg: inference_settings(cfg.joint),
            thumbnail_size=lambda cfg: (int(cfg.joint.thumbnail_size[0]), int(cfg.joint.thumbnail_size[1])),
            inference_modes=INFERENCE_MODES,
            samples=True,
            k=True,
            networks=lambda cfg: [
                *_patch_network(cfg),
                ("joint.thumbnail", cfg.joint.thumbnail_backbone, cfg.joint.thumbnail_pretrained),
            ],
            migrate_checkpoint=_joint_without_maps,
        ),
        ArchitectureEntry(
            settings=GatedMILConfig,
            build=lambda cfg, n: GatedAttentionMIL.from_settings(cfg.model, cfg.gated_mil, n),
            cell_size=lambda cfg: cfg.gated_mil.patch_size,
            inference=lambda cfg: InferenceSettings("exhaustive", 1, 0),
        ),
        ArchitectureEntry(
            settings=StreamingCLAMConfig,
            build=lambda cfg, n: StreamingCLAM.from_settings(cfg.model, cfg.streamingclam, n),
            cell_size=lambda cfg: cell_size(cfg.model, cfg.streamingclam),
            inference=lambda cfg: InferenceSettings("exhaustive", 1, cfg.streamingclam.k),
            k=True,
            streams_trunk=True,
            whole_image=lambda cfg: WholeImageReading(
                cfg.streamingclam.crop_to_tissue, cfg.streamingclam.max_image_in_memory_mb
            ),
        ),
    )
}
if set(ARCHITECTURES) != set(SECTIONS):  # a section without an entry, or an entry without a section
    raise ImportError(f"architectures {sorted(ARCHITECTURES)} and settings sections {sorted(SECTIONS)} differ")


def architecture(cfg: Config) -> ArchitectureEntry:
    """The registry entry of a config's architecture."""
    try:
        return ARCHITECTURES[cfg.model.architecture]
    except KeyError:
        raise ConfigError(
            f"model.architecture={cfg.model.architecture!r}: expected one of {', '.join(ARCHITECTURES)}"
        ) from None


def check_config(cfg: Config) -> Config:
    """What only the models layer can check of a valid config, before anything is built or any slide opened: every
    network it names exists, registry encoders take their weights from a file or an installed package (loupe never
    downloads them), and a streamed trunk is convolutional. Returns ``cfg``; raises :class:`ConfigError` naming the
    setting."""
    from loupe.models.backbones import is_backbone
    from loupe.models.encoders import ENCODERS, packaged_weights

    entry = architecture(cfg)
    for key, name, pretrained in entry.networks(cfg):
        if not is_backbone(name):
            raise ConfigError(
                f'{key}_backbone={name!r}: expected a backbone name: "tiny", "tiny_s8", a registry encoder '
                f"({', '.join(ENCODERS)}) or a timm model name (timm.list_models())"
            )
        if name in ENCODERS and pretrained is True:  # a packaged encoder's installed file, else refused
            packaged_weights(name, f"{key}_pretrained")
        if entry.streams_trunk and name in ENCODERS:
            raise ConfigError(
                f'{key}_backbone={name!r}: {entry.name} streams a convolutional trunk named by timm (e.g. "resnet34"); '
                f"registry encoders are not streamed: use them with "
                f"{' or '.join(n for n, e in ARCHITECTURES.items() if not e.streams_trunk)}"
            )
    return cfg


def build_model(cfg: Config, n_classes: int) -> SlideClassifier:
    """The model ``cfg.model.architecture`` names, fitted to ``n_classes``, built from its settings section (after
    :func:`check_config`)."""
    return architecture(check_config(cfg)).build(cfg, n_classes)


def resolve_inference(
    cfg: Config,
    mode: str | None = None,
    samples: int | None = None,
    k: int | None = None,
    epsilon: float | None = None,
    budget: int | None = None,
) -> InferenceSettings:
    """The inference settings asked for (``--inference``, ``--samples``, ``--k``, ``--epsilon``, ``--budget``),
    defaulting to the run's; a setting the architecture does not use is refused."""
    entry = architecture(cfg)
    default = entry.inference(cfg)
    if mode is not None and mode not in entry.inference_modes:
        raise ConfigError(
            f"--inference {mode}: model.architecture {entry.name} accepts {', '.join(entry.inference_modes)} "
            f"(it reads every patch)"
        )
    if samples is not None:
        if samples < 1:
            raise ConfigError(f"--samples {samples}: expected an integer ≥ 1 for the mean mode")
        if not entry.samples:
            raise ConfigError(f"--samples: not used by model.architecture {entry.name} (nothing is sampled)")
    if k is not None:
        if k < 1:
            raise ConfigError(f"--k {k}: expected an integer ≥ 1 (patches read per sample)")
        if not entry.k:
            raise ConfigError(f"--k: not used by model.architecture {entry.name} (it reads every patch)")
    adaptive = "adaptive" in entry.inference_modes
    for flag, value in (("--epsilon", epsilon), ("--budget", budget)):
        if value is not None and not adaptive:
            raise ConfigError(f"{flag}: not used by model.architecture {entry.name} (it has no adaptive inference)")
    if epsilon is not None and not (math.isfinite(epsilon) and epsilon > 0):
        raise ConfigError(f"--epsilon {epsilon}: expected a number > 0 (the top class's standard error to reach)")
    if budget is not None and budget < 1:
        raise ConfigError(f"--budget {budget}: expected an integer ≥ 1 (most patches read per slide)")
    settings = InferenceSettings(
        mode or default.mode,
        samples or default.samples,
        k or default.k,
        default.epsilon if epsilon is None else epsilon,
        budget or default.budget,
    )
    if settings.mode == "adaptive" and settings.budget < settings.k:
        raise ConfigError(
            f"--budget {settings.budget}: expected at least k = {settings.k} (adaptive inference reads whole "
            "rounds of k patches; raise --budget or lower --k)"
        )
    return settings
