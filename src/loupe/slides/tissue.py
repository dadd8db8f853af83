"""Tissue detection on a slide overview and per-cell tissue fractions / validity for a SlideGrid.

The overview is a small RGB thumbnail of the whole level-0 image. Tissue is stained (saturated) and glass is
near-white or grey (unsaturated), so pixels are thresholded on HSV saturation with Otsu's method, bounded below by
a floor. Small holes are filled and small specks removed. Cell fractions are then exact area integrals of the
(piecewise-constant) mask over each cell's in-image rectangle, computed with a summed-area table.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from scipy import ndimage

from loupe.slides.grid import SlideGrid

# 8-connectivity for tissue objects (diagonal touches join pieces of one fragment); holes use 4-connectivity, the
# complementary choice, so a hole bounded by a diagonal chain of tissue pixels is still a hole.
_EIGHT = np.ones((3, 3), dtype=bool)


@dataclass(frozen=True)
class TissueSettings:
    """Parameters of :func:`detect_tissue` and :func:`cell_validity`: levels in 0..1 of 255, sizes of the overview area.

    Attributes:
        min_saturation: floor on the saturation threshold (0..1). Otsu always splits an image in two, even blank
            glass whose saturation is only noise; glass stays below ~0.03, so the floor 0.05 keeps it background.
        max_background_saturation: if the mean saturation of Otsu's lower class is above this, that class is pale
            stained tissue rather than glass (an image stained everywhere, e.g. a BACH patch, has no glass mode and
            Otsu would cut the tissue in half), so the threshold falls back to ``min_saturation``. Glass, even with
            a colour cast, has mean saturation well below 0.12; pale H&E tissue is above it.
        white_level: a pixel whose darkest channel is at least this (0..1) is glass, whatever its saturation:
            bright tinted glass and optical halos can reach a saturation of 0.05 while being nearly white.
        black_level: a pixel whose brightest channel is at most this (0..1) is not tissue and takes no part in the
            threshold: scanner borders and out-of-scan areas are black, and saturation is meaningless there.
        smooth_px: side of the box filter applied to the saturation before thresholding (<= 1: none); evens out
            the speckle of nuclei and stroma so tissue comes out as solid regions.
        fill_holes: fill background regions enclosed by tissue (lumens, fat, tears) up to ``max_hole_fraction``.
        max_hole_fraction: largest hole filled, as a fraction of the overview area; larger enclosed regions are
            genuine glass (e.g. inside a ring-shaped section) and stay background.
        min_object_fraction: tissue objects smaller than this fraction of the overview area (after hole filling)
            are removed: dust, debris and isolated specks.
        min_cell_fraction: a grid cell is valid when at least this fraction of its in-image area is tissue; low,
            so cells at the tissue border (often the informative margin) are kept.
    """

    min_saturation: float = 0.05
    max_background_saturation: float = 0.12
    white_level: float = 0.9
    black_level: float = 0.08
    smooth_px: int = 3
    fill_holes: bool = True
    max_hole_fraction: float = 0.01
    min_object_fraction: float = 1e-4
    min_cell_fraction: float = 0.05

    def __post_init__(self) -> None:
        for name in (
            "min_saturation",
            "max_background_saturation",
            "white_level",
            "black_level",
            "max_hole_fraction",
            "min_object_fraction",
            "min_cell_fraction",
        ):
            value = getattr(self, name)
            if not (isinstance(value, (int, float)) and 0.0 <= value <= 1.0):
                raise ValueError(f"TissueSettings.{name} must be a number in [0, 1], got {value!r}")
        if isinstance(self.smooth_px, bool) or not isinstance(self.smooth_px, int) or self.smooth_px < 0:
            raise ValueError(f"TissueSettings.smooth_px must be a non-negative integer, got {self.smooth_px!r}")


def _otsu_index(hist: np.ndarray) -> int:
    """Otsu's split of a histogram: the last bin of the lower class, maximising the between-class variance."""
    p = hist.astype(np.float64) / max(float(hist.sum()), 1.0)
    levels = np.arange(p.size, dtype=np.float64)
    omega = np.cumsum(p)[:-1]  # weight of the lower class when it ends at bin k
    mu = np.cumsum(p * levels)[:-1]
    mu_total = float(np.dot(p, levels))
    denom = omega * (1.0 - omega)
    between = np.zeros_like(omega)
    np.divide((mu_total * omega - mu) ** 2, denom, out=between, where=denom > 1e-12)
    return int(np.argmax(between))


def _box_mean(a: np.ndarray, size: int) -> np.ndarray:
    """Mean over a size x size window (edges replicated), as separable sums of shifted slices."""
    lo, hi = size // 2, size - 1 - size // 2
    p = np.pad(a, ((lo, hi), (lo, hi)), mode="edge")
    h, w = a.shape
    rows = p[0:h].copy()
    for k in range(1, size):
        rows += p[k : k + h]
    out = rows[:, 0:w].copy()
    for k in range(1, size):
        out += rows[:, k : k + w]
    out *= 1.0 / (size * size)
    return out


def _label(mask: np.ndarray, structure: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Connected-component labels (intp, 0 = outside ``mask``) and the pixel count of each label."""
    labels = np.empty(mask.shape, dtype=np.intp)
    n = ndimage.label(mask, structure=structure, output=labels)
    return labels, np.bincount(labels.ravel(), minlength=n + 1)


def _fill_small_holes(mask: np.ndarray, max_px: int) -> np.ndarray:
    """Fill background components not touching the image border with at most ``max_px`` pixels."""
    labels, sizes = _label(~mask)
    fill = sizes <= max_px
    fill[0] = False  # label 0 is tissue
    for edge in (labels[0], labels[-1], labels[:, 0], labels[:, -1]):
        fill[edge] = False
    return mask | fill[labels] if fill.any() else mask


def _remove_small_objects(mask: np.ndarray, min_px: int) -> np.ndarray:
    """Drop 8-connected tissue components of fewer than ``min_px`` pixels."""
    labels, sizes = _label(mask, _EIGHT)
    keep = sizes >= min_px
    keep[0] = False
    return keep[labels] if not keep[1:].all() else mask


def detect_tissue(rgb: np.ndarray, settings: TissueSettings = TissueSettings()) -> np.ndarray:
    """Boolean (H, W) tissue mask of an (H, W, 3) uint8 RGB overview (see :class:`TissueSettings`).

    Saturation is quantised to 256 levels for Otsu; the threshold is Otsu's, or the floor ``min_saturation``
    when that is higher or when Otsu's lower class is not glass (no background mode: the image is all tissue).
    """
    rgb = np.asarray(rgb)
    if rgb.ndim != 3 or rgb.shape[-1] != 3 or rgb.dtype != np.uint8:
        raise ValueError(f"detect_tissue needs an (H, W, 3) uint8 RGB image, got {rgb.shape} {rgb.dtype}")
    h, w = rgb.shape[:2]
    if h == 0 or w == 0:
        return np.zeros((h, w), dtype=bool)
    r, g, b = rgb[..., 0], rgb[..., 1], rgb[..., 2]
    hi = np.maximum(np.maximum(r, g), b)
    lo = np.minimum(np.minimum(r, g), b)
    black = hi <= settings.black_level * 255
    sat = (hi - lo).astype(np.float32)
    sat /= np.maximum(hi, 1)
    sat[black] = 0.0
    if settings.smooth_px > 1:
        sat = _box_mean(sat, settings.smooth_px)
        sat[black] = 0.0
    level = (sat * 255.0 + 0.5).astype(np.uint8)  # 0..255
    n_black = int(np.count_nonzero(black))
    if n_black == h * w:
        return np.zeros((h, w), dtype=bool)
    hist = np.bincount(level.ravel(), minlength=256)
    hist[0] -= n_black  # black pixels take no part in the threshold
    split = _otsu_index(hist)
    lower = hist[: split + 1]
    lower_mean = float(np.dot(lower, np.arange(split + 1))) / max(float(lower.sum()), 1.0) / 255.0
    floor = round(settings.min_saturation * 255)
    if lower_mean > settings.max_background_saturation:
        split = floor  # no glass mode: Otsu's lower class is pale tissue
    mask = level > max(split, floor)
    mask &= lo < settings.white_level * 255
    if settings.fill_holes and settings.max_hole_fraction > 0:
        mask = _fill_small_holes(mask, int(settings.max_hole_fraction * h * w))
    min_px = math.ceil(settings.min_object_fraction * h * w)
    if min_px > 1:
        mask = _remove_small_objects(mask, min_px)
    return mask


def _cumulative(table: np.ndarray, coords: np.ndarray, axis: int) -> np.ndarray:
    """Linear interpolation of a summed-area table along ``axis`` at fractional pixel coordinates."""
    n = table.shape[axis] - 1
    i = np.clip(np.floor(coords).astype(np.int64), 0, max(n - 1, 0))
    a = coords - i
    left = np.take(table, i, axis=axis)
    right = np.take(table, np.minimum(i + 1, n), axis=axis)
    shape = [1, 1]
    shape[axis] = -1
    a = a.reshape(shape)
    return left * (1.0 - a) + right * a


def cell_tissue_fraction(mask: np.ndarray, grid: SlideGrid) -> np.ndarray:
    """Fraction (0..1) of each cell's in-image area that is tissue: (grid.n_cells,) float64, flat order.

    The mask covers the whole level-0 image: mask pixel (r, c) is the level-0 rectangle [c*W/w, (c+1)*W/w) x
    [r*H/h, (r+1)*H/h). The mask is integrated exactly over each cell (clipped to the image) as a piecewise-constant
    function, so cells smaller than a mask pixel get the area-weighted mean of the pixels they overlap.
    """
    mask = np.asarray(mask)
    if mask.ndim != 2 or mask.size == 0:
        raise ValueError(f"tissue mask must be a non-empty 2-D array, got shape {mask.shape}")
    mh, mw = mask.shape
    width, height = grid.dimensions
    table = np.zeros((mh + 1, mw + 1), dtype=np.float64)  # summed-area table, zero first row and column
    table[1:, 1:] = np.cumsum(np.cumsum(mask, axis=0, dtype=np.float64), axis=1)
    out = []
    for g in grid.grids:
        s = g.cell_size0
        # cell edges in mask pixel units, clipped to the image
        u = np.clip(np.arange(g.cols + 1) * s, 0, width) * (mw / width)
        v = np.clip(np.arange(g.rows + 1) * s, 0, height) * (mh / height)
        f = _cumulative(_cumulative(table, u, axis=1), v, axis=0)  # (rows+1, cols+1): integral from the origin
        tissue = f[1:, 1:] - f[:-1, 1:] - f[1:, :-1] + f[:-1, :-1]
        area = np.outer(np.diff(v), np.diff(u))
        frac = np.zeros_like(area)
        np.divide(tissue, area, out=frac, where=area > 0)
        out.append(np.clip(frac, 0.0, 1.0).ravel())
    return np.concatenate(out)


def cell_validity(mask: np.ndarray, grid: SlideGrid, min_fraction: float) -> np.ndarray:
    """Cells whose in-image area is at least ``min_fraction`` tissue: (grid.n_cells,) bool, flat order.

    ``min_fraction`` 0 makes every cell valid; a tiny relative tolerance absorbs float noise at the boundary.
    """
    if not 0.0 <= min_fraction <= 1.0:
        raise ValueError(f"min_fraction must be in [0, 1], got {min_fraction!r}")
    frac = cell_tissue_fraction(mask, grid)
    return frac >= min_fraction - 1e-9


def overview_size(
    dimensions: tuple[int, int],
    grid: SlideGrid | None = None,
    min_side: int = 1024,
    max_side: int = 4096,
    px_per_cell: float = 4,
) -> tuple[int, int]:
    """(width, height) of the overview to detect tissue on, aspect preserved.

    The long side is at least ``min_side`` (enough to see tissue shapes), large enough to give about ``px_per_cell``
    pixels across the finest grid cell, at most ``max_side`` (detection time and memory), and never beyond the
    level-0 size (no upsampling).
    """
    width, height = int(dimensions[0]), int(dimensions[1])
    if width < 1 or height < 1:
        raise ValueError(f"image dimensions must be positive, got {dimensions!r}")
    if not 1 <= min_side <= max_side:
        raise ValueError(f"need 1 <= min_side <= max_side, got {min_side}, {max_side}")
    long0 = max(width, height)
    target = float(min_side)
    if grid is not None and grid.grids:
        finest = min(g.cell_size0 for g in grid.grids)
        target = max(target, math.ceil(long0 * px_per_cell / finest))
    long_side = int(min(target, max_side, long0))
    scale = long_side / long0
    return (max(1, round(width * scale)), max(1, round(height * scale)))
