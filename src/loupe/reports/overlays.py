"""Attention heatmaps over the slide thumbnail, one panel per magnification (the paper's Figures 4–5).

A magnification's attention map has one probability per grid cell; cell (r, c) covers the thumbnail rectangle
``[c·w, (c+1)·w) × [r·h, (r+1)·h)`` for that map's cell extent (w, h) in thumbnail pixels, cropped at the
image edge. The overlay's opacity grows with the attention value, so cells with no attention (padding,
background) leave the thumbnail untouched and the hottest cells stand out most.
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from matplotlib import colormaps
from matplotlib.cm import ScalarMappable
from matplotlib.colors import Normalize
from matplotlib.figure import Figure
from matplotlib.patches import Rectangle

from loupe.errors import LoupeError
from loupe.reports.plots import save_figure

__all__ = ["attention_overlay", "heatmap_image", "panel_titles"]

DEFAULT_CMAP = "turbo"
DEFAULT_ALPHA = 0.6


def _as_rgb(thumbnail: np.ndarray) -> np.ndarray:
    """The thumbnail as (H, W, 3) uint8: grey is replicated, an alpha channel is dropped."""
    image = np.asarray(thumbnail)
    if image.dtype != np.uint8:
        raise LoupeError(f"thumbnail must be a uint8 image, got dtype {image.dtype}")
    if image.ndim == 2:
        return np.repeat(image[:, :, None], 3, axis=2)
    if image.ndim == 3 and image.shape[2] in (3, 4):
        return image[:, :, :3]
    raise LoupeError(f"thumbnail must have shape (H, W, 3), got {image.shape}")


def _check_map(attention_map: np.ndarray, index: int = 0) -> np.ndarray:
    values = np.asarray(attention_map, dtype=np.float64)
    if values.ndim != 2 or values.size == 0:
        raise LoupeError(f"attention map {index} must be a non-empty (rows, cols) array, got shape {values.shape}")
    if not np.all(np.isfinite(values)) or np.any(values < 0):
        raise LoupeError(f"attention map {index} has negative or non-finite values")
    return values


def _check_extent(cell_extent: tuple[float, float], index: int = 0) -> tuple[float, float]:
    try:
        width, height = (float(v) for v in cell_extent)
    except (TypeError, ValueError) as exc:
        raise LoupeError(f"cell extent {index} must be (width, height), got {cell_extent!r}") from exc
    if not (math.isfinite(width) and math.isfinite(height) and width > 0 and height > 0):
        raise LoupeError(f"cell extent {index} must be positive (width, height) in pixels, got {cell_extent!r}")
    return width, height


def _pixel_values(shape: tuple[int, int], values: np.ndarray, extent: tuple[float, float]) -> np.ndarray:
    """Per-pixel attention value (H, W): a pixel takes the value of the cell holding its centre."""
    height, width = shape
    cell_w, cell_h = extent
    rows = np.floor((np.arange(height) + 0.5) / cell_h).astype(np.int64)
    cols = np.floor((np.arange(width) + 0.5) / cell_w).astype(np.int64)
    row_ok = rows < values.shape[0]
    col_ok = cols < values.shape[1]
    out = np.zeros((height, width), dtype=np.float64)
    out[np.ix_(row_ok, col_ok)] = values[np.ix_(rows[row_ok], cols[col_ok])]
    return out


def heatmap_image(
    thumbnail: np.ndarray,
    attention_map: np.ndarray,
    cell_extent: tuple[float, float],
    *,
    vmax: float | None = None,
    alpha: float = DEFAULT_ALPHA,
    cmap: str = DEFAULT_CMAP,
) -> np.ndarray:
    """One attention map blended over the thumbnail, as an (H, W, 3) uint8 array.

    Values are scaled by ``vmax`` (default: this map's maximum; pass a shared value to compare maps); a cell
    at ``vmax`` is drawn with opacity ``alpha``, a cell at 0 is transparent.
    """
    rgb = _as_rgb(thumbnail)
    values = _check_map(attention_map)
    extent = _check_extent(cell_extent)
    if not 0.0 <= alpha <= 1.0:
        raise LoupeError(f"alpha must lie in [0, 1], got {alpha}")
    scale = float(values.max()) if vmax is None else float(vmax)
    if not scale > 0:
        return rgb.copy()
    level = np.clip(_pixel_values(rgb.shape[:2], values, extent) / scale, 0.0, 1.0)
    colour = colormaps[cmap](level)[:, :, :3] * 255.0
    weight = (alpha * level)[:, :, None]
    blended = rgb.astype(np.float64) * (1.0 - weight) + colour * weight
    return np.clip(np.rint(blended), 0, 255).astype(np.uint8)


def panel_titles(maps: Sequence[np.ndarray], labels: Sequence[str]) -> list[str]:
    """Panel titles "label · share%": the map's total attention over all maps' total (0% if all are zero)."""
    totals = [float(np.sum(m)) for m in maps]
    grand = sum(totals)
    return [
        f"{label} · {100 * total / grand if grand > 0 else 0.0:.0f}%"
        for label, total in zip(labels, totals, strict=True)
    ]


def attention_overlay(
    thumbnail: np.ndarray,
    maps: Sequence[np.ndarray],
    labels: Sequence[str],
    cell_extents: Sequence[tuple[float, float]],
    path: str | os.PathLike[str],
    title: str | None = None,
    sampled: Sequence[Sequence[tuple[int, int]]] | None = None,
) -> Path:
    """Save a PNG: the thumbnail, then one heatmap panel per magnification on one shared colour scale.

    Each panel is titled with its label and its share of the total attention (e.g. ``"200X · 78%"``).
    ``sampled[j]`` lists (row, col) cells of map j to outline, e.g. the cells drawn by the sampler.
    """
    rgb = _as_rgb(thumbnail)
    labels = [str(label) for label in labels]
    values = [_check_map(m, j) for j, m in enumerate(maps)]
    if not values:
        raise LoupeError("attention_overlay needs at least one attention map")
    if len(labels) != len(values) or len(cell_extents) != len(values):
        raise LoupeError(
            f"got {len(values)} maps, {len(labels)} labels and {len(cell_extents)} cell extents; they must match"
        )
    extents = [_check_extent(e, j) for j, e in enumerate(cell_extents)]
    if sampled is not None and len(sampled) != len(values):
        raise LoupeError(f"sampled must give one list of cells per map ({len(values)}), got {len(sampled)}")

    titles = panel_titles(values, labels)
    vmax = max(float(v.max()) for v in values)
    height, width = rgb.shape[:2]
    n_panels = 1 + len(values)
    panel_h = 3.2
    panel_w = panel_h * width / height
    fig = Figure(figsize=(panel_w * n_panels + 1.2, panel_h + (0.9 if title else 0.5)))
    axes = fig.subplots(1, n_panels, squeeze=False)[0]
    axes[0].imshow(rgb)
    axes[0].set_title("thumbnail")
    for j, (ax, label, value, extent) in enumerate(zip(axes[1:], labels, values, extents, strict=True)):
        ax.imshow(heatmap_image(rgb, value, extent, vmax=vmax))
        ax.set_title(titles[j])
        for row, col in sampled[j] if sampled is not None else ():
            if not (0 <= row < value.shape[0] and 0 <= col < value.shape[1]):
                raise LoupeError(f"sampled cell ({row}, {col}) lies outside map {label} of shape {value.shape}")
            ax.add_patch(
                Rectangle(
                    (col * extent[0] - 0.5, row * extent[1] - 0.5),
                    extent[0],
                    extent[1],
                    fill=False,
                    edgecolor="white",
                    linewidth=1.8,
                )
            )
    for ax in axes:
        ax.set_xlim(-0.5, width - 0.5)
        ax.set_ylim(height - 0.5, -0.5)
        ax.set_xticks([])
        ax.set_yticks([])
    mappable = ScalarMappable(norm=Normalize(vmin=0.0, vmax=vmax if vmax > 0 else 1.0), cmap=DEFAULT_CMAP)
    fig.colorbar(mappable, ax=list(axes), fraction=0.02, pad=0.01, label="attention probability")
    if title:
        fig.suptitle(title)
    return save_figure(fig, path)
