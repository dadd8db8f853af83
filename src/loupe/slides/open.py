"""Open a slide with the right backend, turning every failure into a SlideError that names the file."""

from __future__ import annotations

from pathlib import Path

import openslide

from loupe.errors import ConfigError, SlideError
from loupe.slides.formats import IMAGE_SUFFIXES, TIFF_SUFFIXES
from loupe.slides.image_reader import ImageReader
from loupe.slides.openslide_reader import OpenSlideReader, resolve_dicom_path
from loupe.slides.reader import SlideReader
from loupe.slides.tiffslide_reader import TiffSlideReader

BACKENDS = ("auto", "openslide", "tiffslide", "image")


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


def open_slide(path: str | Path, backend: str = "auto", mpp: float | None = None) -> SlideReader:
    """Open a slide for reading. ``mpp`` overrides (or supplies) the level-0 µm/px.

    'auto' picks OpenSlide or the image reader (see ``choose_backend``); 'tiffslide' must be asked for and needs
    the optional extra ``loupe[tiffslide]``.
    """
    if backend not in BACKENDS:
        raise ConfigError(f"unknown slide backend {backend!r}: choose one of {', '.join(BACKENDS)}")
    p = Path(path).expanduser()
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
    if backend == "auto":
        backend = choose_backend(p)
    if backend == "image":
        return ImageReader(p, mpp)
    if backend == "tiffslide":
        return TiffSlideReader(p, mpp)  # wraps every tiffslide open failure in a SlideError naming the file
    return OpenSlideReader(p, mpp)
