"""The file suffixes of slides, in named groups: which files are slides, and which backend reads them.

Suffixes are lower case with the dot; compare them with ``path.suffix.lower()``.
"""

from __future__ import annotations

WSI_SUFFIXES: tuple[str, ...] = (".svs", ".ndpi", ".mrxs", ".scn", ".bif", ".vms")
"""Vendor whole-slide formats that only OpenSlide reads (besides its TIFF and DICOM ones)."""

TIFF_SUFFIXES: tuple[str, ...] = (".tif", ".tiff")
"""TIFF files: pyramidal/tiled ones go to OpenSlide, strip TIFFs (e.g. BACH photos) to the image reader."""

DICOM_SUFFIXES: tuple[str, ...] = (".dcm", ".dicom")
"""DICOM files: a slide is a folder of them (one per level), opened by OpenSlide through any one file."""

IMAGE_SUFFIXES: tuple[str, ...] = (".png", ".jpg", ".jpeg", ".bmp")
"""Plain images without a pyramid, read whole by the image reader."""

SLIDE_SUFFIXES: tuple[str, ...] = WSI_SUFFIXES + TIFF_SUFFIXES + DICOM_SUFFIXES + IMAGE_SUFFIXES
"""Every suffix of a slide file: what a folder of slides is searched for."""

BACKENDS: tuple[str, ...] = ("auto", "openslide", "tiffslide", "image")
"""The readers a slide can be opened with (``data.backend``, ``--backend``); 'auto' picks by file
(:func:`loupe.slides.open.choose_backend`). The one list: the settings, the command line and the opener read it."""
