"""tiffslide backend (optional extra): pure-Python OpenSlide look-alike on tifffile + zarr for TIFF-based slides."""

from __future__ import annotations

import importlib
import math
import threading
from pathlib import Path
from types import ModuleType
from typing import Any

import numpy as np

from loupe.errors import ConfigError, SlideError
from loupe.slides.pyramid import PyramidReader
from loupe.slides.resample import to_rgb8, white
from loupe.slides.urls import SlideURL

INSTALL_HINT = "pip install 'loupe[tiffslide]'"


def import_tiffslide(path: Path | SlideURL) -> ModuleType:
    """The tiffslide module, or a ConfigError naming the slide and the extra to install."""
    try:
        return importlib.import_module("tiffslide")
    except ImportError as err:
        if err.name == "tiffslide":
            raise ConfigError(
                f"slide {path}: backend 'tiffslide' needs the optional extra: {INSTALL_HINT} "
                "(or use backend='openslide')"
            ) from None
        # installed, but a dependency is missing or too new (e.g. tiffslide<2.5.1 with a recent tifffile)
        raise ConfigError(
            f"slide {path}: backend 'tiffslide' is installed but cannot be imported ({err}): reinstall the "
            f"optional extra with pip install -U 'loupe[tiffslide]', or use backend='openslide'"
        ) from None


def _positive_float(value: Any) -> float | None:
    try:
        f = float(value)
    except (TypeError, ValueError):
        return None
    return f if math.isfinite(f) and f > 0 else None


class TiffSlideReader(PyramidReader):
    """Reads a TIFF-based slide (SVS, generic tiled TIFF, NDPI, ...) through tiffslide; no DICOM/MRXS.

    Concurrent reads need no lock of ours: tiffslide keeps one zarr store per thread (its fix for corrupt
    multi-threaded reads, Bayer-Group/tiffslide#14) and tifffile's store serialises seeks and reads on the
    file handle's lock, while decoding runs in parallel. All metadata is parsed at open time so no lazily
    cached tiffslide property is first computed in a reader thread; ``close`` is guarded by a lock.
    """

    def __init__(self, path: str | Path | SlideURL, mpp: float | None = None) -> None:
        super().__init__(path, mpp)
        tiffslide = import_tiffslide(self.path)
        if isinstance(self.path, Path) and self.path.is_dir():
            raise SlideError(
                f"slide {self.path} is a folder: the tiffslide backend reads single TIFF-based files (SVS, "
                "tiled TIFF, NDPI); for a DICOM series use backend='openslide'"
            )
        self._lock = threading.Lock()
        try:
            self._slide = self._open_tiffslide(tiffslide)
        except (SlideError, ConfigError):  # already one message naming the slide (the remote reader's)
            raise
        except Exception as err:  # tifffile raises TiffFileError, ValueError, OSError... on bad input
            raise SlideError(
                f"slide {self.path} could not be opened by tiffslide ({type(err).__name__}: {err}): it reads "
                "TIFF-based slides only (SVS, tiled TIFF, NDPI); use backend='openslide' for other formats, "
                "or check that the file is complete"
            ) from None
        try:
            props = self._slide.properties
            self._level_dimensions = tuple((int(w), int(h)) for w, h in self._slide.level_dimensions)
            self._level_downsamples = tuple(float(d) for d in self._slide.level_downsamples)
        except Exception as err:
            self._slide.close()
            raise SlideError(
                f"slide {self.path}: tiffslide could not parse its metadata ({type(err).__name__}: {err}); "
                "use backend='openslide', or check that the file is complete"
            ) from None
        if not self._level_dimensions or min(min(d) for d in self._level_dimensions) < 1:
            self._slide.close()
            raise SlideError(f"slide {self.path}: tiffslide found no image levels; use backend='openslide'")
        self._props = {str(k): str(v) for k, v in props.items() if v is not None and not isinstance(v, dict)}

    def _open_tiffslide(self, tiffslide: ModuleType) -> Any:
        """The ``tiffslide.TiffSlide`` of this slide (the remote reader opens it over fsspec instead)."""
        return tiffslide.TiffSlide(str(self.path))

    def _read_failure(self, level: int, err: BaseException) -> SlideError:
        """The SlideError of a failed read at ``level``."""
        return SlideError(
            f"slide {self.path}: reading level {level} with tiffslide failed ({type(err).__name__}: {err}); "
            "the file is probably damaged, or try backend='openslide'"
        )

    @property
    def file_mpp(self) -> float | None:
        values = [v for v in (_positive_float(self._props.get(k)) for k in ("tiffslide.mpp-x", "tiffslide.mpp-y")) if v]
        return sum(values) / len(values) if values else None

    @property
    def vendor(self) -> str:
        # tiffslide only opens TIFFs and leaves the vendor empty for a plain pyramidal TIFF
        return self._props.get("tiffslide.vendor") or "generic-tiff"

    @property
    def objective_power(self) -> float | None:
        return _positive_float(self._props.get("tiffslide.objective-power"))

    @property
    def properties(self) -> dict[str, str]:
        return dict(self._props)

    def _level0_location(self, level: int, lx: int, ly: int) -> tuple[int, int]:
        """The level-0 location that tiffslide maps (int(L / ds)) exactly onto level pixel (lx, ly)."""
        ds = self._level_downsamples[level]

        def invert(target: int) -> int:
            loc = math.ceil(target * ds)
            while int(loc / ds) < target:
                loc += 1
            while loc > 0 and int((loc - 1) / ds) >= target:
                loc -= 1
            return loc

        return invert(lx), invert(ly)

    def _read_level(self, level: int, lx0: int, ly0: int, width: int, height: int) -> np.ndarray:
        """Pixels (lx0, ly0, width, height) in level coordinates, RGB; outside the image is white."""
        lw, lh = self._level_dimensions[level]
        sx0, sy0 = max(lx0, 0), max(ly0, 0)
        sx1, sy1 = min(lx0 + width, lw), min(ly0 + height, lh)
        out = white(height, width)
        if sx1 <= sx0 or sy1 <= sy0:
            return out
        location = self._level0_location(level, sx0, sy0)
        try:
            arr = self._slide.read_region(location, level, (sx1 - sx0, sy1 - sy0), as_array=True, padding=False)
        except Exception as err:  # tifffile/imagecodecs/zarr errors on damaged tiles
            self._check_open()  # closed meanwhile by another thread: say so instead
            raise self._read_failure(level, err) from None
        rgb = to_rgb8(arr)
        if rgb.shape[:2] != (sy1 - sy0, sx1 - sx0):
            raise SlideError(
                f"slide {self.path}: tiffslide returned {rgb.shape[1]}x{rgb.shape[0]} pixels for a "
                f"{sx1 - sx0}x{sy1 - sy0} read at level {level}; try backend='openslide'"
            )
        out[sy0 - ly0 : sy1 - ly0, sx0 - lx0 : sx1 - lx0] = rgb
        return out

    def close(self) -> None:
        with self._lock:
            if not self._closed:
                self._slide.close()
            super().close()
