"""Reading from a file's own pyramid, shared by the OpenSlide and tiffslide backends.

A read picks the coarsest level fine enough for the wanted scale, reads the covering level pixels through the
backend's one primitive, ``_read_level``, and resamples them to the output size; transparent pixels are
composited on white. A backend only opens the file, reports its metadata and implements that primitive.
"""

from __future__ import annotations

import math
from abc import abstractmethod

import numpy as np

from loupe.slides.reader import SlideReader
from loupe.slides.resample import resample_box, to_rgb8


class PyramidReader(SlideReader):
    """A slide read level by level; a backend sets the level tables when it opens the file."""

    _level_dimensions: tuple[tuple[int, int], ...]
    _level_downsamples: tuple[float, ...]

    @property
    def level_dimensions(self) -> tuple[tuple[int, int], ...]:
        return self._level_dimensions

    @property
    def level_downsamples(self) -> tuple[float, ...]:
        return self._level_downsamples

    @abstractmethod
    def _read_level(self, level: int, lx0: int, ly0: int, width: int, height: int) -> np.ndarray:
        """Pixels (lx0, ly0, width, height) in level coordinates: HxWx3 RGB or HxWx4 RGBA uint8, white (or
        transparent) outside the level."""

    def _read_level_rgb(self, level: int, lx0: int, ly0: int, width: int, height: int) -> np.ndarray:
        """``_read_level`` as HxWx3 uint8 RGB, any alpha composited on white."""
        return to_rgb8(self._read_level(level, lx0, ly0, width, height))

    def _read_region(self, x: float, y: float, w0: float, h0: float, out_size: tuple[int, int]) -> np.ndarray:
        ds_wanted = min(w0 / out_size[0], h0 / out_size[1])
        level = self.best_level(ds_wanted)
        lds = self._level_downsamples[level]
        lx, ly, lw, lh = x / lds, y / lds, w0 / lds, h0 / lds
        lx0, ly0 = math.floor(lx), math.floor(ly)
        lx1, ly1 = math.ceil(lx + lw - 1e-9), math.ceil(ly + lh - 1e-9)
        region = self._read_level_rgb(level, lx0, ly0, max(lx1 - lx0, 1), max(ly1 - ly0, 1))
        return resample_box(region, (lx - lx0, ly - ly0, lx - lx0 + lw, ly - ly0 + lh), out_size)

    def thumbnail(self, size: tuple[int, int]) -> np.ndarray:
        self._check_open()
        level = self._thumbnail_level(size)
        w, h = self._level_dimensions[level]
        region = self._read_level_rgb(level, 0, 0, w, h)
        return resample_box(region, (0.0, 0.0, float(w), float(h)), (int(size[0]), int(size[1])))
