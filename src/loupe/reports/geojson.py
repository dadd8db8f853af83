"""Attention as GeoJSON that QuPath imports (File > Import objects, or drag and drop) over the slide itself.

Each attended grid cell becomes one Feature whose geometry is the cell's level-0 rectangle (pixels, origin at
the top-left, x right and y down, as QuPath uses), clipped to the image. QuPath's GeoJSON reader
(``qupath.lib.io.PathObjectTypeAdapters`` and ``GsonTools.PathClassTypeAdapter``) takes from ``properties``:

* ``objectType``: ``"tile"`` (default here), ``"detection"``, ``"annotation"``, ``"cell"`` or ``"tmaCore"``;
  a tile is QuPath's grid-tile detection: light to draw in thousands and usable in Measure > Show measurement maps;
* ``classification``: ``{"name": ..., "color": [r, g, b]}``; both keys are needed for the object form. The name is
  the magnification label, so users can show, hide and colour cells per magnification;
* ``measurements``: a flat object of numbers (probability, probability relative to the slide's maximum, sampled as
  0/1), which QuPath lists per object and can colour by.

Other properties (``magnification``, ``probability``, ``sampled``, ``row``, ``col``, ``cell``) are ignored by QuPath
but kept for other GeoJSON tools and scripts.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from loupe.errors import LoupeError
from loupe.reports.io import write_text
from loupe.slides.grid import SlideGrid

__all__ = ["OBJECT_TYPES", "attention_geojson", "write_attention_geojson"]

#: QuPath object types its GeoJSON import understands (the rectangle suits all but "cell" and "tmaCore" best).
OBJECT_TYPES = ("tile", "detection", "annotation")

#: Per-magnification classification colours (matplotlib's tab10), cycled when there are more magnifications.
_COLOURS: tuple[tuple[int, int, int], ...] = (
    (31, 119, 180),
    (255, 127, 14),
    (44, 160, 44),
    (214, 39, 40),
    (148, 103, 189),
    (140, 86, 75),
    (227, 119, 194),
    (127, 127, 127),
    (188, 189, 34),
    (23, 190, 207),
)

_DECIMALS = 2


def _check_attention(grid: SlideGrid, attention: np.ndarray) -> np.ndarray:
    values = np.asarray(attention, dtype=np.float64)
    if values.shape != (grid.n_cells,):
        raise LoupeError(
            f"attention must be a flat array of one probability per grid cell, shape ({grid.n_cells},), "
            f"got shape {values.shape}"
        )
    if not np.all(np.isfinite(values)) or np.any(values < 0):
        raise LoupeError("attention has negative or non-finite values: pass the attention probabilities")
    return values


def _sampled_mask(grid: SlideGrid, sampled: np.ndarray | None) -> np.ndarray:
    """Boolean mask (N,) of the cells read: ``sampled`` is a boolean mask (N,) or flat cell indices."""
    mask = np.zeros(grid.n_cells, dtype=bool)
    if sampled is None:
        return mask
    arr = np.asarray(sampled)
    if arr.dtype == np.bool_:
        if arr.shape != (grid.n_cells,):
            raise LoupeError(f"a boolean sampled mask must have shape ({grid.n_cells},), got {arr.shape}")
        return arr.copy()
    if arr.size == 0:
        return mask
    if not np.issubdtype(arr.dtype, np.integer):
        raise LoupeError(f"sampled must be flat cell indices (integers) or a boolean mask, got dtype {arr.dtype}")
    flat = arr.reshape(-1).astype(np.int64)
    if flat.min() < 0 or flat.max() >= grid.n_cells:
        raise LoupeError(f"sampled cell indices must lie in [0, {grid.n_cells}), got {flat.min()}..{flat.max()}")
    mask[flat] = True
    return mask


def _share(min_share: float) -> float:
    """``min_share`` as a float in [0, 1] (NaN, booleans and non-numbers are refused)."""
    try:
        share = float(min_share)
    except (TypeError, ValueError):
        share = math.nan
    if isinstance(min_share, (bool, str)) or not 0.0 <= share <= 1.0:
        raise LoupeError(f"min_share must be a number in [0, 1], got {min_share!r}")
    return share


def _select_cells(values: np.ndarray, sampled: np.ndarray, min_share: float, max_features: int) -> np.ndarray:
    """Flat indices to draw, highest probability first (ties by index): sampled cells plus the strongest others."""
    top = float(values.max()) if values.size else 0.0
    if top <= 0.0:
        return np.zeros(0, dtype=np.int64)
    positive = values > 0.0
    keep = sampled & positive
    candidates = np.flatnonzero(positive & ~keep & (values >= min_share * top))
    room = max(0, max_features - int(keep.sum()))
    if candidates.size > room:
        order = np.lexsort((candidates, -values[candidates]))  # probability descending, then cell index
        candidates = candidates[order[:room]]
    chosen = np.concatenate([np.flatnonzero(keep), candidates])
    return chosen[np.lexsort((chosen, -values[chosen]))]


def _ring(x0: float, y0: float, x1: float, y1: float) -> list[list[float]]:
    """Closed rectangle ring, counter-clockwise in (x, y) numbers (RFC 7946's right-hand rule for exteriors)."""
    a, b, c, d = (round(float(v), _DECIMALS) for v in (x0, y0, x1, y1))
    return [[a, b], [c, b], [c, d], [a, d], [a, b]]


def attention_geojson(
    grid: SlideGrid,
    attention: np.ndarray,
    labels: Sequence[str],
    sampled: np.ndarray | None = None,
    min_share: float = 0.01,
    max_features: int = 10000,
    slide_id: str | None = None,
    *,
    object_type: str = "tile",
) -> dict[str, Any]:
    """A GeoJSON FeatureCollection of one slide's attended cells, for QuPath or any GeoJSON viewer.

    ``attention`` holds one probability per flat grid cell (magnification by magnification, row-major) and
    ``labels`` one display name per magnification. Drawn are every ``sampled`` cell (flat indices or a boolean
    mask) plus, highest first, the cells whose probability is at least ``min_share`` times the slide's maximum,
    up to ``max_features`` features in all (sampled cells are always kept, even past the cap); cells of zero
    probability never. Features come highest probability first; coordinates are level-0 pixels rounded to
    2 decimals. All values are plain Python types, so the result goes straight to ``json.dumps``.
    """
    values = _check_attention(grid, attention)
    labels = [str(label) for label in labels]
    if len(labels) != len(grid.grids):
        raise LoupeError(f"{len(labels)} labels given for {len(grid.grids)} magnifications: give one per magnification")
    mask = _sampled_mask(grid, sampled)
    share = _share(min_share)
    if isinstance(max_features, bool) or not isinstance(max_features, (int, np.integer)) or max_features < 0:
        raise LoupeError(f"max_features must be a non-negative integer, got {max_features!r}")
    if object_type not in OBJECT_TYPES:
        raise LoupeError(f"object_type must be one of {list(OBJECT_TYPES)}, got {object_type!r}")

    chosen = _select_cells(values, mask, share, int(max_features))
    width, height = grid.dimensions
    top = float(values.max()) if values.size else 0.0
    mags, rows, cols = grid.cells(chosen)
    rects = grid.cell_rects(chosen)
    features: list[dict[str, Any]] = []
    for flat, mag, row, col, (x0, y0, w0, h0) in zip(chosen, mags, rows, cols, rects, strict=True):
        x1, y1 = min(x0 + w0, width), min(y0 + h0, height)
        x0, y0 = max(x0, 0.0), max(y0, 0.0)
        if x1 <= x0 or y1 <= y0:  # cannot happen for a grid built by build_grid; never emit a degenerate polygon
            continue
        label = labels[int(mag)]
        probability = float(values[flat])
        is_sampled = bool(mask[flat])
        features.append(
            {
                "type": "Feature",
                "geometry": {"type": "Polygon", "coordinates": [_ring(x0, y0, x1, y1)]},
                "properties": {
                    "objectType": object_type,
                    "classification": {"name": label, "color": list(_COLOURS[int(mag) % len(_COLOURS)])},
                    "measurements": {
                        "probability": probability,
                        "probability / max": probability / top,
                        "sampled": 1.0 if is_sampled else 0.0,
                    },
                    "magnification": label,
                    "probability": probability,
                    "sampled": is_sampled,
                    "row": int(row),
                    "col": int(col),
                    "cell": int(flat),
                },
            }
        )
    metadata: dict[str, Any] = {
        "dimensions": [int(width), int(height)],
        "magnifications": labels,
        "max_probability": top,
        "min_share": share,
        "max_features": int(max_features),
        "n_sampled": int(mask.sum()),
    }
    if slide_id is not None:
        metadata = {"slide_id": str(slide_id), **metadata}
    # "metadata" is a GeoJSON foreign member (RFC 7946 §6.1): readers, QuPath included, skip it.
    return {"type": "FeatureCollection", "metadata": metadata, "features": features}


def write_attention_geojson(
    path: str | os.PathLike[str],
    grid: SlideGrid,
    attention: np.ndarray,
    labels: Sequence[str],
    sampled: np.ndarray | None = None,
    min_share: float = 0.01,
    max_features: int = 10000,
    slide_id: str | None = None,
    *,
    object_type: str = "tile",
) -> Path:
    """Write :func:`attention_geojson` atomically to ``path`` (name it ``.geojson`` or ``.json`` for QuPath)."""
    collection = attention_geojson(
        grid,
        attention,
        labels,
        sampled,
        min_share=min_share,
        max_features=max_features,
        slide_id=slide_id,
        object_type=object_type,
    )
    # Compact, and straight through json: every value is already a plain Python type (tested), and the generic
    # converter of write_json costs seconds on ten thousand features.
    return write_text(path, json.dumps(collection, separators=(",", ":"), allow_nan=False) + "\n")
