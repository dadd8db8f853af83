"""Open a slide with the right backend, turning every failure into a SlideError that names the file."""

from __future__ import annotations

import math
import os
from collections.abc import Callable
from pathlib import Path

import openslide

from loupe.errors import ConfigError, SlideError
from loupe.slides.cache import SlideCache
from loupe.slides.formats import BACKENDS, IMAGE_SUFFIXES, TIFF_SUFFIXES
from loupe.slides.image_reader import ImageReader
from loupe.slides.openslide_reader import OpenSlideReader, resolve_dicom_path
from loupe.slides.reader import SlideReader
from loupe.slides.remote import open_remote
from loupe.slides.tiffslide_reader import TiffSlideReader
from loupe.slides.urls import SlideURL, as_source

__all__ = ["BACKENDS", "READERS", "check_header", "choose_backend", "open_slide"]

#: The reader of each backend ('auto' picks one of them per file, :func:`choose_backend`). A new backend is a
#: :class:`SlideReader`, one entry here and its name in :data:`loupe.slides.formats.BACKENDS` (which the settings
#: and the command line read without importing the readers; ``tests/slides/test_open.py`` checks they agree).
READERS: dict[str, Callable[[Path, float | None], SlideReader]] = {
    "openslide": OpenSlideReader,
    "tiffslide": TiffSlideReader,  # wraps every tiffslide open failure in a SlideError naming the file
    "image": ImageReader,
}


def choose_backend(path: Path) -> str:
    """The backend 'auto' picks: images and strip TIFFs -> image; tiled TIFFs and the rest -> openslide."""
    suffix = path.suffix.lower()
    if suffix in IMAGE_SUFFIXES:
        return "image"
    if suffix in TIFF_SUFFIXES:
        try:
            fmt = openslide.OpenSlide.detect_format(str(path))
        except (openslide.OpenSlideError, OSError):
            fmt = None
        return "openslide" if fmt is not None else "image"
    return "openslide"


#: The largest level-0 side accepted (pixels): the largest whole-slide scans are ~250,000 px; a header claiming
#: more is damaged or crafted, and believing it would make loupe allocate grids and masks of absurd size.
MAX_SIDE = 2**21
#: The largest level-0 area accepted (pixels): ~275 gigapixels, 60 times the largest scans in use.
MAX_PIXELS = 2**38
#: The plausible range of a slide's µm/px: from super-resolution microscopy to a photograph of a whole glass slide.
MPP_RANGE = (1e-3, 1e4)


def check_header(reader: SlideReader) -> None:
    """Refuse, with a message naming the file, a header that cannot describe a real slide: non-positive or absurd
    dimensions, a µm/px that is zero, negative, NaN or out of any plausible range. Nothing is allocated first."""
    where = f"slide {reader.path}"
    dims = reader.level_dimensions
    if not dims:
        raise SlideError(f"{where} has no image levels: the file is damaged or not a slide")
    for level, (w, h) in enumerate(dims):
        if not (0 < w <= MAX_SIDE and 0 < h <= MAX_SIDE):
            raise SlideError(
                f"{where}: its header gives level {level} a size of {w}x{h} px, which no slide has (accepted: "
                f"1 to {MAX_SIDE} px a side); the file is damaged or not a slide: re-export it"
            )
    w0, h0 = dims[0]
    if w0 * h0 > MAX_PIXELS:
        raise SlideError(
            f"{where}: its header gives {w0}x{h0} px ({w0 * h0:.3g} pixels, more than {MAX_PIXELS:.3g}); the file is "
            "damaged or not a slide: re-export it"
        )
    mpp = reader.mpp
    if mpp is not None and not (math.isfinite(mpp) and MPP_RANGE[0] <= mpp <= MPP_RANGE[1]):
        raise SlideError(
            f"{where}: a resolution of {mpp!r} µm/px is not plausible (expected {MPP_RANGE[0]:g} to "
            f"{MPP_RANGE[1]:g}): correct the mpp column of the manifest, or pass --slide-mpp for a file without one"
        )


def open_slide(
    path: str | Path | SlideURL, backend: str = "auto", mpp: float | None = None, *, cache: SlideCache | None = None
) -> SlideReader:
    """Open a slide for reading. ``mpp`` overrides (or supplies) the level-0 µm/px.

    'auto' picks OpenSlide or the image reader (see ``choose_backend``); 'tiffslide' must be asked for and needs
    the optional extra ``loupe[tiffslide]``. A header no real slide has is refused (:func:`check_header`).
    ``path`` may be a URL (:mod:`loupe.slides.urls`): TIFF-family slides are then read over the network
    (:mod:`loupe.slides.remote`, the optional extra ``loupe[remote]``), and ``cache`` keeps what their header
    reads fetched, so that the next open asks the server nothing (local files ignore it).
    """
    reader = _open(path, backend, mpp, cache)
    try:
        check_header(reader)
    except BaseException:
        reader.close()
        raise
    return reader


def _open(path: str | Path | SlideURL, backend: str, mpp: float | None, cache: SlideCache | None) -> SlideReader:
    if backend != "auto" and backend not in READERS:
        raise ConfigError(f"unknown slide backend {backend!r}: choose one of {', '.join(('auto', *READERS))}")
    url = as_source(path)
    if url is not None:
        return open_remote(url, backend, mpp, cache)
    assert not isinstance(path, SlideURL)
    p = Path(os.path.expanduser(path))
    if not p.exists():
        raise SlideError(f"slide not found: {p} (check the path, or the path column of the manifest)")
    if p.is_dir():
        resolve_dicom_path(p)  # raises a SlideError when the folder holds no DICOM files
        if backend == "image":
            raise SlideError(f"slide {p} is a folder: the image backend reads one image file; pass the file")
        if backend == "tiffslide":
            raise SlideError(
                f"slide {p} is a folder (a DICOM series?): the tiffslide backend reads single TIFF-based files; "
                "use backend='openslide' for DICOM"
            )
        return OpenSlideReader(p, mpp)
    return READERS[choose_backend(p) if backend == "auto" else backend](p, mpp)
