"""OpenSlide backend: pyramidal whole-slide formats (SVS, NDPI, MRXS, DICOM, tiled TIFF, ...)."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import openslide

from loupe.errors import SlideError
from loupe.slides.formats import DICOM_SUFFIXES
from loupe.slides.pyramid import PyramidReader
from loupe.slides.resample import DS_TOLERANCE
from loupe.slides.urls import local_only


def _float_property(props: dict[str, str], key: str) -> float | None:
    try:
        value = float(props[key])
    except (KeyError, ValueError):
        return None
    return value if math.isfinite(value) and value > 0 else None


def resolve_dicom_path(path: Path) -> Path:
    """A folder of DICOM files is opened through any one of its files (OpenSlide finds the series)."""
    if not path.is_dir():
        return path
    files = sorted(p for p in path.iterdir() if p.is_file() and p.suffix.lower() in DICOM_SUFFIXES)
    if not files:
        raise SlideError(
            f"slide {path} is a folder without DICOM (.dcm) files: pass a slide file, or the folder of a "
            "DICOM whole-slide series"
        )
    return files[0]


class OpenSlideReader(PyramidReader):
    """Reads a slide through OpenSlide; its RGBA output is composited on white by ``PyramidReader``."""

    def __init__(self, path: str | Path, mpp: float | None = None) -> None:
        super().__init__(path, mpp)
        target = resolve_dicom_path(local_only(self.path, "openslide"))
        try:
            self._slide = openslide.OpenSlide(str(target))
        except openslide.OpenSlideUnsupportedFormatError:
            raise SlideError(
                f"slide {self.path} is not a format OpenSlide can read (or the file is corrupt): convert it "
                "to a pyramidal TIFF/SVS, or for a plain image (PNG/JPEG/strip TIFF) use backend='image'"
            ) from None
        except openslide.OpenSlideError as err:
            raise SlideError(
                f"slide {self.path} could not be opened by OpenSlide ({err}): check that the file is "
                "complete and not corrupt"
            ) from None
        except OSError as err:
            raise SlideError(f"slide {self.path} could not be opened ({err}): check the file") from None
        self._props = dict(self._slide.properties)
        self._level_dimensions = tuple((int(w), int(h)) for w, h in self._slide.level_dimensions)
        self._level_downsamples = tuple(float(d) for d in self._slide.level_downsamples)

    @property
    def file_mpp(self) -> float | None:
        values = [v for v in (_float_property(self._props, k) for k in ("openslide.mpp-x", "openslide.mpp-y")) if v]
        return sum(values) / len(values) if values else None

    @property
    def vendor(self) -> str:
        return self._props.get("openslide.vendor") or "unknown"

    @property
    def objective_power(self) -> float | None:
        return _float_property(self._props, "openslide.objective-power")

    @property
    def properties(self) -> dict[str, str]:
        return dict(self._props)

    def best_level(self, downsample: float) -> int:
        """The coarsest level whose downsample is at most ``downsample`` (small tolerance), per OpenSlide."""
        return int(self._slide.get_best_level_for_downsample(downsample * (1.0 + DS_TOLERANCE)))

    def _read_level(self, level: int, lx0: int, ly0: int, width: int, height: int) -> np.ndarray:
        """Pixels (lx0, ly0, width, height) in level coordinates, RGBA; outside the image is transparent."""
        ds = self._level_downsamples[level]
        try:
            rgba = self._slide.read_region((round(lx0 * ds), round(ly0 * ds)), level, (width, height))
        except openslide.OpenSlideError as err:
            raise SlideError(
                f"slide {self.path}: reading level {level} failed ({err}); the file is probably damaged, "
                "re-export or re-download it"
            ) from None
        return np.asarray(rgba)

    def close(self) -> None:
        if not self._closed:
            self._slide.close()
        super().close()
