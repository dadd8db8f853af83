"""Grid geometry: each magnification cuts the image into ceil(W_j/p) x ceil(H_j/p) cells; flat indexing."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from loupe.errors import SlideError
from loupe.slides.magnification import Magnification, parse_magnification

# Relative slack for float noise such as 2048 * 0.42 / 0.42 when taking ceil / comparing to the patch size.
_EPS = 1e-6
#: The most cells one magnification's grid may have (2^26: a 260,000 px square slide in 32 px cells); more means a
#: wrong size or µm/px, and the attention maps and masks of such a grid would not fit in memory.
MAX_CELLS = 2**26


def _ceil(value: float) -> int:
    return math.ceil(value - _EPS * max(1.0, abs(value)))


@dataclass(frozen=True)
class MagnificationGrid:
    """The grid of non-overlapping p x p cells at one magnification (edge cells padded)."""

    magnification: Magnification
    downsample: float
    rows: int
    cols: int
    patch_size: int

    @property
    def n_cells(self) -> int:
        """Number of cells (rows * cols)."""
        return self.rows * self.cols

    @property
    def shape(self) -> tuple[int, int]:
        """(rows, cols)."""
        return (self.rows, self.cols)

    @property
    def cell_size0(self) -> float:
        """Side of a cell in level-0 pixels."""
        return self.patch_size * self.downsample

    def cell_rect(self, row: int, col: int) -> tuple[float, float, float, float]:
        """Level-0 rectangle (x0, y0, w0, h0) of cell (row, col)."""
        if not (0 <= row < self.rows and 0 <= col < self.cols):
            raise IndexError(f"cell ({row}, {col}) outside a {self.rows}x{self.cols} grid")
        s = self.cell_size0
        return (col * s, row * s, s, s)


@dataclass(frozen=True)
class SlideGrid:
    """All magnifications' grids of one slide; cells numbered magnification by magnification, row-major."""

    dimensions: tuple[int, int]
    grids: tuple[MagnificationGrid, ...]

    @property
    def n_cells(self) -> int:
        """Total number of cells over all magnifications."""
        return sum(g.n_cells for g in self.grids)

    @property
    def shapes(self) -> tuple[tuple[int, int], ...]:
        """(rows, cols) per magnification."""
        return tuple(g.shape for g in self.grids)

    @property
    def offsets(self) -> tuple[int, ...]:
        """Flat index of the first cell of each magnification."""
        starts = np.cumsum([0] + [g.n_cells for g in self.grids])[:-1]
        return tuple(int(s) for s in starts)

    def _locate(self, flat_indices: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        idx = np.asarray(flat_indices, dtype=np.int64)
        if idx.size and (idx.min() < 0 or idx.max() >= self.n_cells):
            raise IndexError(f"cell index out of range [0, {self.n_cells}): {idx.min()}..{idx.max()}")
        starts = np.asarray(self.offsets, dtype=np.int64)
        mag = np.searchsorted(starts, idx, side="right") - 1
        cols = np.asarray([g.cols for g in self.grids], dtype=np.int64)[mag]
        local = idx - starts[mag]
        return mag, local // cols, local % cols

    def cell(self, flat_index: int) -> tuple[int, int, int]:
        """(magnification index, row, col) of a flat cell index."""
        mag, row, col = self._locate(np.asarray([flat_index]))
        return int(mag[0]), int(row[0]), int(col[0])

    def cells(self, flat_indices: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Vectorised :meth:`cell`: arrays of magnification index, row, col."""
        return self._locate(flat_indices)

    def flat_index(self, mag_index: int, row: int, col: int) -> int:
        """Inverse of :meth:`cell`."""
        g = self.grids[mag_index]
        if not (0 <= row < g.rows and 0 <= col < g.cols):
            raise IndexError(f"cell ({row}, {col}) outside a {g.rows}x{g.cols} grid")
        return self.offsets[mag_index] + row * g.cols + col

    def downsamples(self, flat_indices: np.ndarray) -> np.ndarray:
        """Downsample (level-0 px per px) of each cell: (N,) float64."""
        mag, _, _ = self._locate(flat_indices)
        return np.asarray([g.downsample for g in self.grids], dtype=np.float64)[mag]

    def cell_rects(self, flat_indices: np.ndarray) -> np.ndarray:
        """Level-0 rectangles (x0, y0, w0, h0) of the cells: (N, 4) float64."""
        mag, row, col = self._locate(flat_indices)
        size = np.asarray([g.cell_size0 for g in self.grids], dtype=np.float64)[mag]
        return np.stack([col * size, row * size, size, size], axis=-1).reshape(-1, 4)


def build_grid(
    dimensions: tuple[int, int],
    slide_mpp: float | None,
    magnifications: Sequence[Magnification | str | float],
    patch_size: int,
    slide: str | Path,
) -> SlideGrid:
    """The grids of a W x H slide at each magnification; errors name the slide and the fix."""
    if isinstance(patch_size, bool) or not isinstance(patch_size, (int, np.integer)) or patch_size < 1:
        raise ValueError(f"patch_size must be a positive integer, got {patch_size!r}")
    if len(magnifications) == 0:
        raise ValueError("at least one magnification is needed")
    w, h = int(dimensions[0]), int(dimensions[1])
    if w < 1 or h < 1:
        raise SlideError(f"slide {slide} has a size of {w}x{h} px: the file is damaged or not a slide")
    grids = []
    for spec in magnifications:
        mag = spec if isinstance(spec, Magnification) else parse_magnification(spec)
        ds = mag.downsample_for(slide_mpp, slide)
        wj, hj = w / ds, h / ds
        if wj < patch_size * (1 - _EPS) or hj < patch_size * (1 - _EPS):
            raise SlideError(
                f"slide {slide} is {wj:.0f}x{hj:.0f} px at magnification {mag.label} (downsample {ds:.4g} of "
                f"{w}x{h}), smaller than one {patch_size}x{patch_size} patch: use a higher magnification or "
                "a smaller patch_size"
            )
        rows, cols = _ceil(hj / patch_size), _ceil(wj / patch_size)
        if rows * cols > MAX_CELLS:
            raise SlideError(
                f"slide {slide}: {rows}x{cols} cells of {patch_size} px at magnification {mag.label}, more than "
                f"{MAX_CELLS}; its size ({w}x{h} px) or resolution ({slide_mpp} µm/px) is wrong, or the "
                "magnification too high for it: check the file's µm/px (the manifest's mpp column, --slide-mpp)"
            )
        grids.append(
            MagnificationGrid(
                magnification=mag,
                downsample=ds,
                rows=rows,
                cols=cols,
                patch_size=int(patch_size),
            )
        )
    return SlideGrid(dimensions=(w, h), grids=tuple(grids))
