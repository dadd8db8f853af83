"""What the model needs from one slide before any patch is read: header, grid, thumbnail, tissue and valid cells.

Every piece goes through the :class:`~loupe.slides.cache.SlideCache`, keyed by the parameters that made it, so
a re-run (or the next epoch in a new worker) reads a few kilobytes instead of decoding the slide again, and a
changed setting never reads a stale entry. The time spent on each piece is recorded (zero-ish on a cache hit)
for the per-slide timing report of ``loupe predict``.
"""

from __future__ import annotations

import dataclasses
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from loupe.errors import SlideError
from loupe.slides import Magnification, SlideGrid, SlideReader, build_grid
from loupe.slides.cache import SlideCache
from loupe.slides.tissue import TissueSettings, cell_validity, detect_tissue, overview_size
from loupe.slides.urls import SlideURL


@dataclass(frozen=True)
class PrepSettings:
    """The run-wide parameters that decide what is derived from a slide."""

    magnifications: tuple[Magnification, ...]
    patch_size: int
    thumbnail_size: tuple[int, int]
    backend: str = "auto"
    tissue: TissueSettings | None = None
    """None: every cell is valid (images that are all tissue, such as BACH)."""


@dataclass
class Timer:
    """Seconds spent per named step."""

    seconds: dict[str, float] = field(default_factory=dict)

    def add(self, name: str, start: float) -> None:
        self.seconds[name] = self.seconds.get(name, 0.0) + time.perf_counter() - start


@dataclass(frozen=True)
class SlideHeader:
    """Level-0 size and the µm/px in use (file's or override) of a slide."""

    dimensions: tuple[int, int]
    mpp: float | None


class SlidePreparer:
    """Derives (and caches) header, grid, thumbnail, overview and valid cells of slides for one settings."""

    def __init__(self, settings: PrepSettings, cache: SlideCache | None = None) -> None:
        self.settings = settings
        self.cache = cache if cache is not None else SlideCache(enabled=False)

    def header(self, path: str | Path | SlideURL, mpp: object, open_reader: Callable[[], SlideReader]) -> SlideHeader:
        """Dimensions and µm/px, from the cache or the opened slide; ``mpp`` describes how the µm/px is chosen
        (part of the cache key)."""
        params = {"backend": self.settings.backend, "mpp": mpp}

        def compute() -> dict[str, np.ndarray]:
            r = open_reader()
            return {"dimensions": np.asarray(r.dimensions, np.int64), "mpp": np.asarray(r.mpp or math.nan, np.float64)}

        arrays, _ = self.cache.get("header", path, params, compute)
        value = float(arrays["mpp"])
        width, height = (int(v) for v in arrays["dimensions"])
        return SlideHeader((width, height), None if math.isnan(value) else value)

    def grid(self, header: SlideHeader, path: str | Path | SlideURL) -> SlideGrid:
        """The slide's grid at every magnification (no IO: pure geometry)."""
        return build_grid(
            header.dimensions, header.mpp, self.settings.magnifications, self.settings.patch_size, str(path)
        )

    def thumbnail(
        self, path: str | Path | SlideURL, open_reader: Callable[[], SlideReader], timer: Timer | None = None
    ) -> np.ndarray:
        """The model's thumbnail (h, w, 3) uint8 at ``thumbnail_size``."""
        start = time.perf_counter()
        width, height = self.settings.thumbnail_size
        size = (int(width), int(height))
        params = {"backend": self.settings.backend, "size": size}
        arrays, _ = self.cache.get("thumbnail", path, params, lambda: {"image": open_reader().thumbnail(size)})
        if timer is not None:
            timer.add("thumbnail", start)
        return arrays["image"]

    def overview(
        self,
        path: str | Path | SlideURL,
        grid: SlideGrid,
        open_reader: Callable[[], SlideReader],
        timer: Timer | None = None,
    ) -> np.ndarray:
        """A larger thumbnail for tissue detection and overlays, fine enough to resolve the finest grid."""
        start = time.perf_counter()
        width, height = overview_size(grid.dimensions, grid)
        size = (int(width), int(height))
        params = {"backend": self.settings.backend, "size": size}
        arrays, _ = self.cache.get("overview", path, params, lambda: {"image": open_reader().thumbnail(size)})
        if timer is not None:
            timer.add("overview", start)
        return arrays["image"]

    def tissue(
        self,
        path: str | Path | SlideURL,
        grid: SlideGrid,
        open_reader: Callable[[], SlideReader],
        timer: Timer | None = None,
        overview: np.ndarray | None = None,
    ) -> tuple[np.ndarray | None, np.ndarray]:
        """(tissue mask on the overview or None, valid cells (N,) bool); raises when a slide has no tissue.

        ``overview`` saves reading it again when the caller already has it.
        """
        settings = self.settings.tissue
        if settings is None:
            return None, np.ones(grid.n_cells, dtype=bool)
        if overview is None:
            overview = self.overview(path, grid, open_reader, timer)
        start = time.perf_counter()
        params = {
            "backend": self.settings.backend,
            "overview": list(overview.shape),
            "tissue": dataclasses.asdict(settings),
            "grid": [[g.downsample, g.rows, g.cols, g.patch_size] for g in grid.grids],
        }

        def compute() -> dict[str, np.ndarray]:
            mask = detect_tissue(overview, settings)
            return {"mask": mask, "valid": cell_validity(mask, grid, settings.min_cell_fraction)}

        arrays, _ = self.cache.get("tissue", path, params, compute)
        if timer is not None:
            timer.add("tissue", start)
        valid = arrays["valid"].astype(bool)
        if not valid.any():
            raise SlideError(
                f"no tissue found in slide {path}: check the slide, or turn tissue detection off "
                "(data.tissue: false) for images that are all tissue"
            )
        return arrays["mask"].astype(bool), valid
