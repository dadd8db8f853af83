"""Plain-image backend: large microscopy images without a pyramid (BACH TIFFs, PNG, JPEG).

The file is decoded once, on first use. Each magnification read is built once as the whole image resized with
an area filter and cached, so that reading a patch afterwards is an array slice.
"""

from __future__ import annotations

import math
import threading
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import tifffile
from PIL import Image, UnidentifiedImageError

from loupe.errors import SlideError
from loupe.slides.formats import TIFF_SUFFIXES
from loupe.slides.reader import SlideReader
from loupe.slides.resample import crop_padded, read_box_from_array, to_rgb8
from loupe.slides.urls import local_only

# A resolution coarser than this is a document default (72/96/300 dpi), not a microscope calibration.
MAX_PLAUSIBLE_MPP = 50.0
# Resized whole-image copies kept at once (one per magnification in use); the oldest is dropped beyond this.
MAX_CACHED_DOWNSAMPLES = 8
_UM_PER_UNIT = {2: 25400.0, 3: 10000.0}  # TIFF ResolutionUnit: 2 = inch, 3 = centimetre


def _plausible(mpp: float | None) -> float | None:
    if mpp is None or not math.isfinite(mpp) or mpp <= 0 or mpp > MAX_PLAUSIBLE_MPP:
        return None
    return mpp


def _rational(value: Any) -> float | None:
    try:
        if isinstance(value, tuple):
            num, den = value
            return float(num) / float(den) if den else None
        return float(value)
    except (TypeError, ValueError, ZeroDivisionError):
        return None


def tiff_mpp(page: tifffile.TiffPage) -> float | None:
    """µm/px from a TIFF page's XResolution/YResolution/ResolutionUnit (inch or cm), else None."""
    tags = page.tags
    unit_tag = tags.get("ResolutionUnit")
    unit = int(unit_tag.value) if unit_tag is not None else 2
    if unit not in _UM_PER_UNIT:
        return None
    values = []
    for name in ("XResolution", "YResolution"):
        tag = tags.get(name)
        res = _rational(tag.value) if tag is not None else None
        if res and res > 0:
            values.append(_UM_PER_UNIT[unit] / res)
    return _plausible(sum(values) / len(values)) if values else None


def pil_mpp(info: Mapping[Any, Any]) -> float | None:
    """µm/px from a Pillow image's dpi (PNG pHYs, JPEG JFIF density), else None."""
    dpi = info.get("dpi")
    if not dpi:
        return None
    values = [25400.0 / float(d) for d in dpi if d and float(d) > 0]
    return _plausible(sum(values) / len(values)) if values else None


class ImageReader(SlideReader):
    """A single-level image read fully into memory, with a per-downsample cache of resized copies."""

    def __init__(self, path: str | Path, mpp: float | None = None) -> None:
        super().__init__(path, mpp)
        self._file = local_only(self.path, "image")
        self._lock = threading.Lock()
        self._full: np.ndarray | None = None
        self._cache: dict[float, np.ndarray] = {}
        self._is_tiff = self.path.suffix.lower() in TIFF_SUFFIXES
        self._props: dict[str, str] = {"loupe.backend": "image"}
        try:
            if self._is_tiff:
                self._open_tiff()
            else:
                self._open_pil()
        except SlideError:
            raise
        except Exception as err:  # tifffile / Pillow raise many types on bad input
            raise SlideError(
                f"slide {self.path} cannot be read as an image ({type(err).__name__}: {err}): check that the "
                "file is a complete PNG/JPEG/TIFF, or use backend='openslide' for whole-slide formats"
            ) from None

    def _open_tiff(self) -> None:
        with tifffile.TiffFile(self._file) as tif:
            if not tif.pages:
                raise ValueError("no image pages")
            page = tif.pages.first
            self._size = (int(page.imagewidth), int(page.imagelength))
            self._file_mpp = tiff_mpp(page)
            self._props.update({"image.format": "TIFF", "image.dtype": str(page.dtype), "image.axes": page.axes})

    def _open_pil(self) -> None:
        try:
            with Image.open(self._file) as img:
                self._size = (int(img.width), int(img.height))
                self._file_mpp = pil_mpp(img.info)
                self._props.update({"image.format": str(img.format), "image.mode": img.mode})
        except UnidentifiedImageError:
            raise SlideError(
                f"slide {self.path} is not an image Pillow recognises (corrupt, or another format): check "
                "the file, or use backend='openslide' for whole-slide formats"
            ) from None

    # --- metadata -------------------------------------------------------------------------------------
    @property
    def level_dimensions(self) -> tuple[tuple[int, int], ...]:
        return (self._size,)

    @property
    def level_downsamples(self) -> tuple[float, ...]:
        return (1.0,)

    @property
    def file_mpp(self) -> float | None:
        return self._file_mpp

    @property
    def vendor(self) -> str:
        return "image"

    @property
    def objective_power(self) -> float | None:
        return None

    @property
    def properties(self) -> dict[str, str]:
        return dict(self._props)

    def best_level(self, downsample: float) -> int:
        return 0

    # --- decoding and cache ---------------------------------------------------------------------------
    def _decode(self) -> np.ndarray:
        errors = []
        if self._is_tiff:
            try:
                with tifffile.TiffFile(self._file) as tif:
                    array = tif.pages.first.asarray()
                if array.ndim == 3 and array.shape[0] in (3, 4) and array.shape[2] not in (1, 2, 3, 4):
                    array = np.moveaxis(array, 0, -1)  # planar (separate) channels
                return to_rgb8(array)
            except Exception as err:  # e.g. a compression tifffile cannot decode without imagecodecs
                errors.append(f"tifffile: {err}")
        try:
            with Image.open(self._file) as img:
                img.load()
                if img.mode in ("I;16", "I;16B", "I;16L", "I", "F"):
                    return to_rgb8(np.asarray(img))
                return np.asarray(img.convert("RGBA" if "A" in img.getbands() else "RGB")).copy()
        except Exception as err:
            errors.append(f"Pillow: {err}")
        raise SlideError(
            f"slide {self.path} could not be decoded ({'; '.join(errors)}): check that the file is complete, "
            "or convert it to an uncompressed or pyramidal TIFF"
        )

    def _full_image(self) -> np.ndarray:
        with self._lock:
            if self._full is None:
                self._check_open()
                full = to_rgb8(self._decode())
                if full.shape[:2] != (self._size[1], self._size[0]):
                    raise SlideError(f"slide {self.path}: decoded size {full.shape[:2]} differs from its header")
                self._full = full
            return self._full

    def _scaled(self, ds: float) -> np.ndarray:
        """The whole image at downsample ``ds`` (>= 1), built once with an area filter and cached.

        The image is padded with white to a multiple of ``ds`` first, so edge pixels average in white exactly
        as an out-of-bounds read does.
        """
        key = round(ds, 6)
        cached = self._cache.get(key)
        if cached is not None:
            return cached
        full = self._full_image()
        with self._lock:
            cached = self._cache.get(key)
            if cached is not None:
                return cached
            w, h = self._size
            nw, nh = math.ceil(w / ds - 1e-6), math.ceil(h / ds - 1e-6)
            ids = round(ds)
            if abs(ds - ids) < 1e-6:
                if ids == 1:
                    scaled = full
                else:
                    padded = crop_padded(full, 0, 0, nw * ids, nh * ids)
                    scaled = np.asarray(Image.fromarray(np.ascontiguousarray(padded)).reduce(ids))
            else:
                pw, ph = math.ceil(nw * ds), math.ceil(nh * ds)
                padded = crop_padded(full, 0, 0, pw, ph)
                scaled = np.asarray(
                    Image.fromarray(np.ascontiguousarray(padded)).resize(
                        (nw, nh), resample=Image.Resampling.BOX, box=(0.0, 0.0, nw * ds, nh * ds)
                    )
                )
            while len(self._cache) >= MAX_CACHED_DOWNSAMPLES:
                self._cache.pop(next(iter(self._cache)))
            self._cache[key] = scaled
            return scaled

    @property
    def cached_downsamples(self) -> tuple[float, ...]:
        """Downsamples whose resized copy is currently cached."""
        return tuple(sorted(self._cache))

    # --- reading --------------------------------------------------------------------------------------
    def _read_region(self, x: float, y: float, w0: float, h0: float, out_size: tuple[int, int]) -> np.ndarray:
        """Uniform downsamples >= 1 slice the cached resized image (origin rounded to its nearest pixel,
        exact for grid cells); anything else is resampled from the full image."""
        ow, oh = out_size
        dsx, dsy = w0 / ow, h0 / oh
        uniform = abs(dsx - dsy) <= 1e-6 * max(dsx, dsy)
        if uniform and dsx >= 1.0 - 1e-9:
            scaled = self._scaled(dsx)
            cx, cy = round(x / dsx), round(y / dsx)
            return np.ascontiguousarray(crop_padded(scaled, cx, cy, ow, oh))
        return read_box_from_array(self._full_image(), x, y, w0, h0, out_size)

    def thumbnail(self, size: tuple[int, int]) -> np.ndarray:
        self._check_open()
        w, h = self._size
        return read_box_from_array(self._full_image(), 0.0, 0.0, float(w), float(h), (int(size[0]), int(size[1])))

    def close(self) -> None:
        with self._lock:
            self._full = None
            self._cache.clear()
        super().close()
