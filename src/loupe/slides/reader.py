"""The slide reader interface: levels, dimensions, µm/px, and reading a level-0 rectangle at any scale."""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from pathlib import Path
from types import TracebackType

import numpy as np

from loupe.errors import SlideError
from loupe.slides.resample import DS_TOLERANCE
from loupe.slides.urls import SlideURL


class SlideReader(ABC):
    """A whole-slide image opened for reading; use as a context manager. Reads are thread-safe."""

    def __init__(self, path: str | Path | SlideURL, mpp: float | None = None) -> None:
        self.path: Path | SlideURL = path if isinstance(path, SlideURL) else Path(path)
        if mpp is not None and not (isinstance(mpp, (int, float)) and math.isfinite(mpp) and mpp > 0):
            raise SlideError(f"slide {self.path}: the µm/px override must be a positive number, got {mpp!r}")
        self._mpp_override = None if mpp is None else float(mpp)
        self._closed = False

    # --- metadata -------------------------------------------------------------------------------------
    @property
    @abstractmethod
    def level_dimensions(self) -> tuple[tuple[int, int], ...]:
        """(W, H) of each pyramid level, finest first."""

    @property
    @abstractmethod
    def level_downsamples(self) -> tuple[float, ...]:
        """Downsample of each pyramid level vs level 0."""

    @property
    def dimensions(self) -> tuple[int, int]:
        """Level-0 (W, H)."""
        return self.level_dimensions[0]

    @property
    def level_count(self) -> int:
        """Number of pyramid levels."""
        return len(self.level_dimensions)

    @property
    @abstractmethod
    def file_mpp(self) -> float | None:
        """µm/px recorded in the file, or None."""

    @property
    def mpp(self) -> float | None:
        """Level-0 µm/px: the override given at open time, else the file's, else None."""
        return self._mpp_override if self._mpp_override is not None else self.file_mpp

    @property
    @abstractmethod
    def vendor(self) -> str:
        """Format/vendor name (e.g. 'aperio', 'hamamatsu', 'image')."""

    @property
    @abstractmethod
    def objective_power(self) -> float | None:
        """Scanner objective power, when recorded."""

    @property
    @abstractmethod
    def properties(self) -> dict[str, str]:
        """Raw metadata key/value pairs."""

    # --- reading --------------------------------------------------------------------------------------
    def best_level(self, downsample: float) -> int:
        """The coarsest level whose downsample is at most ``downsample`` (with a small tolerance)."""
        target = downsample * (1.0 + DS_TOLERANCE)
        best = 0
        for i, ds in enumerate(self.level_downsamples):
            if ds <= target:
                best = i
        return best

    def read_region(self, x: float, y: float, size0: tuple[float, float], out_size: tuple[int, int]) -> np.ndarray:
        """The level-0 rectangle (x, y, w0, h0) resampled to out_size (w, h): HxWx3 uint8, white outside."""
        self._check_open()
        w0, h0 = float(size0[0]), float(size0[1])
        ow, oh = int(out_size[0]), int(out_size[1])
        if not (w0 > 0 and h0 > 0 and math.isfinite(w0) and math.isfinite(h0)):
            raise ValueError(f"region size must be positive, got {size0!r}")
        if ow < 1 or oh < 1:
            raise ValueError(f"output size must be at least 1x1, got {out_size!r}")
        if not (math.isfinite(x) and math.isfinite(y)):
            raise ValueError(f"region origin must be finite, got {(x, y)!r}")
        out = self._read_region(float(x), float(y), w0, h0, (ow, oh))
        assert out.shape == (oh, ow, 3) and out.dtype == np.uint8, out.shape
        return out

    def read_regions(self, rects: np.ndarray, out_size: tuple[int, int]) -> np.ndarray:
        """Read each level-0 rectangle row (x, y, w0, h0) of ``rects`` at out_size: (N, h, w, 3) uint8."""
        rects = np.asarray(rects, dtype=np.float64).reshape(-1, 4)
        out = np.empty((len(rects), int(out_size[1]), int(out_size[0]), 3), dtype=np.uint8)
        for i, (x, y, w0, h0) in enumerate(rects):
            out[i] = self.read_region(x, y, (w0, h0), out_size)
        return out

    @abstractmethod
    def _read_region(self, x: float, y: float, w0: float, h0: float, out_size: tuple[int, int]) -> np.ndarray:
        """Backend read; arguments already validated."""

    @abstractmethod
    def thumbnail(self, size: tuple[int, int]) -> np.ndarray:
        """The whole image resized to exactly (w, h): HxWx3 uint8 RGB."""

    def _thumbnail_level(self, size: tuple[int, int]) -> int:
        """The smallest level at least ``size`` in both dimensions (level 0 if none is)."""
        best = 0
        for i, (w, h) in enumerate(self.level_dimensions):
            if w >= size[0] and h >= size[1]:
                best = i
        return best

    # --- lifetime -------------------------------------------------------------------------------------
    def close(self) -> None:
        """Release the file handle and cached pixels."""
        self._closed = True

    def _check_open(self) -> None:
        if self._closed:
            raise SlideError(f"slide {self.path} is closed: open it again with loupe.slides.open_slide")

    def __enter__(self) -> SlideReader:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def __repr__(self) -> str:
        w, h = self.dimensions
        return f"{type(self).__name__}({str(self.path)!r}, {w}x{h}, levels={self.level_count}, mpp={self.mpp})"
