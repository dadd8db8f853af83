"""Magnifications: a target resolution in µm/px (canonical), an objective power, or a plain downsample."""

from __future__ import annotations

import math
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from loupe.errors import ConfigError, SlideError

ACCEPTED_FORMS = (
    "µm/px as a number or string (0.5, '0.5', '0.5um', '0.5mpp', '0.5 um/px'), "
    "objective power ('20x', '20X' = 10/20 = 0.5 µm/px), "
    "or a downsample factor vs level 0 for images without resolution metadata ('ds4')"
)

_NUMBER = r"(\d+(?:\.\d*)?|\.\d+)(?:[eE][-+]?\d+)?"
_MPP_RE = re.compile(rf"^({_NUMBER})\s*(?:mpp|um|µm|μm|um/px|µm/px|μm/px|microns?)?$", re.IGNORECASE)
_POWER_RE = re.compile(rf"^({_NUMBER})\s*x$", re.IGNORECASE)
_DS_RE = re.compile(rf"^ds\s*({_NUMBER})$", re.IGNORECASE)

# Nominal convention: a 10x objective images about 1 µm per pixel.
_MPP_AT_1X = 10.0


@dataclass(frozen=True)
class Magnification:
    """One magnification the model looks at: either a target µm/px or a downsample vs level 0."""

    label: str
    mpp: float | None
    downsample: float | None

    def __post_init__(self) -> None:
        if (self.mpp is None) == (self.downsample is None):
            raise ConfigError(
                f"magnification {self.label!r} must set exactly one of mpp or downsample; accepted forms: "
                f"{ACCEPTED_FORMS}"
            )
        value = self.mpp if self.mpp is not None else self.downsample
        if not (isinstance(value, (int, float)) and math.isfinite(value) and value > 0):
            raise ConfigError(f"magnification {self.label!r} must be a positive number, got {value!r}")

    def downsample_for(self, slide_mpp: float | None, slide: str | Path) -> float:
        """Level-0 pixels per pixel at this magnification on a slide of base resolution ``slide_mpp``."""
        if self.downsample is not None:
            return float(self.downsample)
        if slide_mpp is None:
            raise SlideError(
                f"slide {slide} has no resolution (µm/px) in its metadata, so magnification {self.label} "
                f"({self.mpp:g} µm/px) cannot be located: pass --slide-mpp (or data.slide_mpp in the config) "
                "or add an mpp column to the manifest"
            )
        if not (math.isfinite(slide_mpp) and slide_mpp > 0):
            raise SlideError(f"slide {slide} has an invalid resolution {slide_mpp!r} µm/px: pass --slide-mpp")
        assert self.mpp is not None
        return float(self.mpp) / float(slide_mpp)


def _positive(value: float, spec: object) -> float:
    if not (math.isfinite(value) and value > 0):
        raise ConfigError(f"magnification {spec!r} must be positive; accepted forms: {ACCEPTED_FORMS}")
    return value


def parse_magnification(spec: str | float | int, label: str | None = None) -> Magnification:
    """Parse one magnification spec ('0.5', '20x', 'ds4', 0.5) into a :class:`Magnification`."""
    if isinstance(spec, Magnification):
        return spec if label is None else Magnification(label, spec.mpp, spec.downsample)
    if isinstance(spec, bool) or not isinstance(spec, (str, int, float)):
        raise ConfigError(f"magnification {spec!r} is not understood; accepted forms: {ACCEPTED_FORMS}")
    if isinstance(spec, (int, float)):
        mpp = _positive(float(spec), spec)
        return Magnification(label or f"{mpp:g}mpp", mpp, None)
    text = spec.strip()
    if m := _MPP_RE.match(text):
        mpp = _positive(float(m.group(1)), spec)
        return Magnification(label or f"{mpp:g}mpp", mpp, None)
    if m := _POWER_RE.match(text):
        power = _positive(float(m.group(1)), spec)
        return Magnification(label or f"{power:g}x", _MPP_AT_1X / power, None)
    if m := _DS_RE.match(text):
        ds = _positive(float(m.group(1)), spec)
        return Magnification(label or f"ds{ds:g}", None, ds)
    raise ConfigError(f"magnification {spec!r} is not understood; accepted forms: {ACCEPTED_FORMS}")


def parse_magnifications(
    specs: Sequence[str | float], labels: Sequence[str] | None = None
) -> tuple[Magnification, ...]:
    """Parse a list of magnification specs, with optional display labels; rejects duplicates."""
    if isinstance(specs, (str, int, float)):
        specs = [specs]
    if len(specs) == 0:
        raise ConfigError(f"at least one magnification is needed; accepted forms: {ACCEPTED_FORMS}")
    if labels is not None:
        if isinstance(labels, str):
            labels = [labels]
        if len(labels) != len(specs):
            raise ConfigError(
                f"{len(labels)} magnification labels given for {len(specs)} magnifications: "
                "give one label per magnification or none"
            )
        if len(set(labels)) != len(labels):
            raise ConfigError(f"magnification labels must be unique, got {list(labels)}")
    mags = tuple(parse_magnification(spec, None if labels is None else labels[i]) for i, spec in enumerate(specs))
    for i, a in enumerate(mags):
        for b in mags[:i]:
            same_mpp = a.mpp is not None and b.mpp is not None and math.isclose(a.mpp, b.mpp, rel_tol=1e-9)
            same_ds = (
                a.downsample is not None
                and b.downsample is not None
                and math.isclose(a.downsample, b.downsample, rel_tol=1e-9)
            )
            if same_mpp or same_ds:
                raise ConfigError(f"magnifications {b.label!r} and {a.label!r} are the same resolution: list each once")
    labels_out = [m.label for m in mags]
    if len(set(labels_out)) != len(labels_out):
        raise ConfigError(f"magnification labels must be unique, got {labels_out}: pass explicit labels")
    return mags
