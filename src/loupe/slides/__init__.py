"""Slide reading: backends (OpenSlide, plain images), magnifications, grids and slide descriptions."""

from __future__ import annotations

from loupe.slides.grid import MagnificationGrid, SlideGrid, build_grid
from loupe.slides.image_reader import ImageReader
from loupe.slides.info import describe_slide, format_description
from loupe.slides.magnification import Magnification, parse_magnification, parse_magnifications
from loupe.slides.open import BACKENDS, choose_backend, open_slide
from loupe.slides.openslide_reader import OpenSlideReader
from loupe.slides.reader import SlideReader

__all__ = [
    "BACKENDS",
    "ImageReader",
    "Magnification",
    "MagnificationGrid",
    "OpenSlideReader",
    "SlideGrid",
    "SlideReader",
    "build_grid",
    "choose_backend",
    "describe_slide",
    "format_description",
    "open_slide",
    "parse_magnification",
    "parse_magnifications",
]
