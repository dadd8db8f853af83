"""Pixel helpers shared by the readers: white-padded crops, area resampling, RGBA/grey/16-bit to RGB."""

from __future__ import annotations

import math

import numpy as np
from PIL import Image

WHITE = 255
# Relative tolerance when matching a wanted downsample to a pyramid level: level downsamples of odd-sized
# images drift (e.g. 8.017 for a nominal 8), and reading the nominal level then upscaling <1% is harmless.
DS_TOLERANCE = 1e-2


def white(height: int, width: int) -> np.ndarray:
    """A white HxWx3 uint8 canvas."""
    return np.full((height, width, 3), WHITE, dtype=np.uint8)


def crop_padded(image: np.ndarray, x0: int, y0: int, width: int, height: int) -> np.ndarray:
    """The rectangle (x0, y0, width, height) of an HxWx3 image; the part outside the image is white."""
    h, w = image.shape[:2]
    if x0 >= 0 and y0 >= 0 and x0 + width <= w and y0 + height <= h:
        return image[y0 : y0 + height, x0 : x0 + width]
    out = white(height, width)
    sx0, sy0 = max(x0, 0), max(y0, 0)
    sx1, sy1 = min(x0 + width, w), min(y0 + height, h)
    if sx1 > sx0 and sy1 > sy0:
        out[sy0 - y0 : sy1 - y0, sx0 - x0 : sx1 - x0] = image[sy0:sy1, sx0:sx1]
    return out


def resample_box(image: np.ndarray, box: tuple[float, float, float, float], out_size: tuple[int, int]) -> np.ndarray:
    """Resample the float box (x0, y0, x1, y1) of an RGB array (box inside it) to out_size (w, h).

    Downscaling uses an area (box) filter so that fine patterns average instead of aliasing; upscaling is
    bilinear.
    """
    w_out, h_out = out_size
    bw, bh = box[2] - box[0], box[3] - box[1]
    if (
        abs(bw - w_out) < 1e-6
        and abs(bh - h_out) < 1e-6
        and abs(box[0] - round(box[0])) < 1e-6
        and abs(box[1] - round(box[1])) < 1e-6
    ):
        x0, y0 = round(box[0]), round(box[1])
        return np.ascontiguousarray(image[y0 : y0 + h_out, x0 : x0 + w_out])
    filt = Image.Resampling.BOX if bw >= w_out and bh >= h_out else Image.Resampling.BILINEAR
    out = Image.fromarray(np.ascontiguousarray(image)).resize((w_out, h_out), resample=filt, box=box)
    return np.asarray(out)


def read_box_from_array(
    image: np.ndarray,
    x: float,
    y: float,
    w: float,
    h: float,
    out_size: tuple[int, int],
) -> np.ndarray:
    """The float rectangle (x, y, w, h) in array pixels, resampled to out_size; white outside the array."""
    ix0, iy0 = math.floor(x), math.floor(y)
    ix1, iy1 = math.ceil(x + w - 1e-9), math.ceil(y + h - 1e-9)
    ix1, iy1 = max(ix1, ix0 + 1), max(iy1, iy0 + 1)
    region = crop_padded(image, ix0, iy0, ix1 - ix0, iy1 - iy0)
    return resample_box(region, (x - ix0, y - iy0, x - ix0 + w, y - iy0 + h), out_size)


def to_rgb8(array: np.ndarray) -> np.ndarray:
    """Convert a decoded image (grey, grey+alpha, RGB, RGBA; uint8/uint16/float) to HxWx3 uint8 RGB.

    16-bit values are scaled from the full 0..65535 range; alpha is composited on white.
    """
    a = np.asarray(array)
    if a.ndim == 2:
        a = a[:, :, None]
    if a.ndim != 3:
        raise ValueError(f"expected a 2-D image with optional channels, got shape {a.shape}")
    if a.dtype == np.uint8:
        a8 = a
    elif a.dtype == np.bool_:
        a8 = a.astype(np.uint8) * 255
    elif np.issubdtype(a.dtype, np.integer):
        bits = np.iinfo(a.dtype).bits
        a8 = (np.clip(a.astype(np.float64), 0, None) / (2**bits - 1) * 255 + 0.5).astype(np.uint8)
    else:
        af = np.nan_to_num(a.astype(np.float64))
        scale = 255.0 if af.max(initial=0) <= 1.0 else 1.0
        a8 = (np.clip(af * scale, 0, 255) + 0.5).astype(np.uint8)
    c = a8.shape[2]
    if c == 1:
        return np.repeat(a8, 3, axis=2)
    if c == 2:
        return composite_on_white(np.concatenate([np.repeat(a8[:, :, :1], 3, axis=2), a8[:, :, 1:]], axis=2))
    if c == 3:
        return a8
    return composite_on_white(a8[:, :, :4])


def composite_on_white(rgba: np.ndarray) -> np.ndarray:
    """Composite a (non-premultiplied) RGBA uint8 array on white, giving RGB uint8."""
    alpha = rgba[:, :, 3:4]
    if alpha.min(initial=255) == 255:
        return np.ascontiguousarray(rgba[:, :, :3])
    a = alpha.astype(np.uint16)
    rgb = (rgba[:, :, :3].astype(np.uint16) * a + WHITE * (255 - a) + 127) // 255
    return rgb.astype(np.uint8)
