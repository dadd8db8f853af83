"""The images laid over a slide: one attention map per magnification in a perceptually uniform colormap (viridis,
on one scale shared by every magnification of the slide) and the tissue mask the model used.

Each is a small PNG with one block of pixels per grid cell (cells stay sharp when the browser scales it up);
cells that could not be attended are transparent. The page places it over the slide by the grid's level-0 size.
"""

from __future__ import annotations

import io
import math
from functools import lru_cache

import numpy as np
from PIL import Image

COLORMAP = "viridis"
#: The longest side a layer image gets (pixels): each cell is a block of pixels (up to 128 px a side), so that the
#: browser's smoothing blurs only the block's outermost pixel; blocks of one colour keep the PNG small.
MAX_LAYER_SIDE = 1024
#: Opacity (0..255) of an attention cell of zero attention; full at the slide's largest.
MIN_ALPHA = 64
#: Opacity (0..255) of the background shade of the tissue layer.
TISSUE_SHADE = 150


@lru_cache(maxsize=1)
def colormap_table() -> np.ndarray:
    """(256, 3) uint8: the colormap's colours from 0 to 1."""
    from matplotlib import colormaps

    return np.round(colormaps[COLORMAP](np.linspace(0.0, 1.0, 256))[:, :3] * 255.0).astype(np.uint8)


def colormap_stops(n: int = 9) -> list[str]:
    """``n`` evenly spaced colours of the colormap as CSS hex strings (the legend's gradient)."""
    table = colormap_table()
    picks = np.round(np.linspace(0, 255, n)).astype(int)
    return ["#{:02x}{:02x}{:02x}".format(*table[i]) for i in picks]


def _block(shape: tuple[int, int]) -> int:
    rows, cols = shape
    return max(1, min(128, MAX_LAYER_SIDE // max(rows, cols, 1)))


def _png(rgba: np.ndarray, block: int) -> bytes:
    if block > 1:
        rgba = np.repeat(np.repeat(rgba, block, axis=0), block, axis=1)
    buffer = io.BytesIO()
    Image.fromarray(np.ascontiguousarray(rgba), "RGBA").save(buffer, format="PNG", compress_level=3)
    return buffer.getvalue()


def attention_png(values: np.ndarray, valid: np.ndarray | None, vmax: float) -> bytes:
    """The attention map (rows, cols) coloured on [0, vmax]; cells with no attention that could not be attended
    (or, without a validity map, with zero attention) are transparent."""
    values = np.asarray(values, dtype=np.float64)
    top = vmax if math.isfinite(vmax) and vmax > 0 else 1.0
    level = np.clip(np.round(values / top * 255.0), 0, 255).astype(np.uint8)
    rgba = np.empty((*values.shape, 4), dtype=np.uint8)
    rgba[..., :3] = colormap_table()[level]
    shown = values > 0 if valid is None else (np.asarray(valid, dtype=bool) | (values > 0))
    # Opacity grows with attention (MIN_ALPHA at zero): the tissue stays visible where the model did not look.
    alpha = np.round(MIN_ALPHA + (255 - MIN_ALPHA) * level.astype(np.float64) / 255.0).astype(np.uint8)
    rgba[..., 3] = np.where(shown, alpha, 0)
    return _png(rgba, _block(values.shape))


def tissue_png(valid: np.ndarray) -> bytes:
    """The background (cells not attendable) shaded dark, tissue left clear."""
    mask = np.asarray(valid, dtype=bool)
    rgba = np.zeros((*mask.shape, 4), dtype=np.uint8)
    rgba[..., 3] = np.where(mask, 0, TISSUE_SHADE)
    return _png(rgba, _block(mask.shape))
