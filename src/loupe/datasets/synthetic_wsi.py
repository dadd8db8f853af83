"""Large synthetic pyramidal whole-slide images for benchmarks, written tile by tile without holding the image.

The file is an Aperio-style SVS: a tiled, JPEG-compressed, multi-resolution TIFF whose ImageDescription starts
with "Aperio Image Library" and carries ``MPP`` and ``AppMag``, so OpenSlide's aperio driver reports the µm/px and
objective power, and tifffile/tiffslide see an SVS series. The layout is that of a real SVS: IFD 0 is level 0,
IFD 1 a stripped thumbnail, IFD 2.. the halved levels.

Tiles are JPEG-encoded by Pillow and handed to tifffile already compressed (an iterator of bytes); tifffile still
looks up its JPEG codec for such a page, so writing needs ``imagecodecs`` (the ``wsi`` extra: checked up front by
:func:`require_jpeg_writer`). Tiles are rendered in strips in a thread pool: the large NumPy operations release the
GIL, Pillow's in-memory JPEG encoder does not, so the gain from more cores is partial.

Every level is rendered directly at its own scale from one analytic description, so all levels agree:

* the tissue is a union of a few irregular lobes (ellipses with a smooth, seeded radial wobble) scaled so that
  they cover the requested fraction of the slide; coverage (with a one-pixel soft edge) is evaluated on a coarse
  grid and interpolated;
* the H&E-like texture (pink stroma with streaks, purple nuclei, grain) is periodic; level k samples the level-0
  texture box-averaged by 2**k, which is exactly what downsampling level 0 would give;
* a smooth, non-periodic stain-intensity field (plane waves, in µm) mottles the tissue and breaks up the
  repetition; at level k each wave is attenuated as a 2**k box average would.

Tiles whose pixels are all glass are detected from the coarse grid and reuse one pre-encoded glass tile.
"""

from __future__ import annotations

import importlib.util
import io
import math
import os
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from functools import cache, partial
from pathlib import Path
from typing import TypeVar

import numpy as np
import tifffile
from PIL import Image

from loupe.errors import LoupeError

GLASS = (243, 242, 245)
"""RGB of the empty glass (background)."""

WSI_INSTALL_HINT = "pip install 'loupe[wsi]'"

_STROMA_LIGHT = np.array([240.0, 200.0, 224.0], np.float32)
_STROMA_DARK = np.array([214.0, 118.0, 176.0], np.float32)
_NUCLEUS_LIGHT = np.array([150.0, 104.0, 184.0], np.float32)
_NUCLEUS_DARK = np.array([72.0, 44.0, 124.0], np.float32)
_TEXTURE_PERIOD = 2048  # level-0 px; a power of two, so every level's texture is exactly periodic
_GRID_STEP = 8  # level px between the coarse-grid nodes on which coverage and stain are evaluated
_HARMONICS = np.arange(2, 8)  # radial wobble of the lobes
_TOP_LEVEL_MAX = 1024  # auto levels: halve until the top level's longer side is at most this
_THUMBNAIL_MAX = 1024
_STRIP_PX = 2048  # tiles are rendered in horizontal strips about this wide (fewer, larger NumPy calls)

_SPARSE = 4  # the sparse coverage grid takes every 4th node
_SLOPE = 16.0  # bound on |gradient| of TissueLayout.signed_distance where it matters (see there)
_MIN_TEXTURE = 256  # coarse levels repeat their texture period up to at least this many px

T = TypeVar("T")


@dataclass(frozen=True)
class SyntheticWSI:
    """What :func:`make_pyramidal_slide` wrote."""

    path: Path
    width: int
    height: int
    level_dimensions: tuple[tuple[int, int], ...]
    mpp: float
    objective_power: float
    tile: int
    tissue_fraction: float
    """Fraction of the level-0 area covered by tissue (measured on the analytic layout)."""
    file_bytes: int
    seconds: float

    @property
    def levels(self) -> int:
        """Number of pyramid levels."""
        return len(self.level_dimensions)


def auto_levels(width: int, height: int, top_max: int = _TOP_LEVEL_MAX) -> int:
    """Levels obtained by halving until the top level's longer side is at most ``top_max`` px."""
    return 1 + max(0, math.ceil(math.log2(max(width, height) / top_max)))


def level_dimensions(width: int, height: int, levels: int) -> tuple[tuple[int, int], ...]:
    """(W, H) of each level: level k is level 0 divided by 2**k (rounded down, at least 1)."""
    return tuple((max(1, width >> k), max(1, height >> k)) for k in range(levels))


class TissueLayout:
    """A union of irregular lobes, in level-0 px, scaled to cover a given fraction of the slide."""

    def __init__(self, width: int, height: int, tissue_fraction: float, rng: np.random.Generator) -> None:
        self.width, self.height = width, height
        n_pieces = int(rng.integers(2, 5))
        base = math.sqrt(tissue_fraction * width * height / (n_pieces * math.pi * 1.6))
        lobes: list[tuple[float, ...]] = []
        coefs: list[np.ndarray] = []
        centres: list[np.ndarray] = []
        for _ in range(n_pieces):
            for _attempt in range(50):  # keep pieces apart when there is room
                c = rng.uniform([0.15 * width, 0.15 * height], [0.85 * width, 0.85 * height])
                if all(np.hypot(*(c - o)) > 1.6 * base for o in centres):
                    break
            centres.append(c)
            for j in range(int(rng.integers(1, 4))):
                angle = rng.uniform(0, 2 * math.pi)
                offset = 0.0 if j == 0 else rng.uniform(0.5, 1.0) * base
                r = base * (rng.uniform(0.8, 1.1) if j == 0 else rng.uniform(0.45, 0.8))
                aspect = rng.uniform(0.45, 1.0)
                theta = rng.uniform(0, math.pi)
                cx, cy = c[0] + offset * math.cos(angle), c[1] + offset * math.sin(angle)
                lobes.append((cx, cy, r / math.sqrt(aspect), r * math.sqrt(aspect), math.cos(theta), math.sin(theta)))
                amps = rng.uniform(0.2, 1.0, len(_HARMONICS)) / _HARMONICS**1.1
                amps *= rng.uniform(0.3, 0.55) / amps.sum()  # the radius stays within 0.45..1.55 of the ellipse's
                coefs.append(amps * np.exp(1j * rng.uniform(0, 2 * math.pi, len(_HARMONICS))))
        self._lobes = np.array(lobes)
        self._coefs = np.array(coefs)
        self._rmax = 1.0 + np.abs(self._coefs).sum(axis=1)
        # A point is in lobe b iff rho/R(phi) < scale, so the union covers the fraction q of the slide exactly
        # when scale is the q-quantile of min_b rho/R over the slide.
        n = 512
        gw, gh = (n, max(1, round(n * height / width))) if width >= height else (max(1, round(n * width / height)), n)
        yy, xx = np.meshgrid((np.arange(gh) + 0.5) * height / gh, (np.arange(gw) + 0.5) * width / gw, indexing="ij")
        q = np.min([self._ratio(b, xx, yy)[0] for b in range(len(self._lobes))], axis=0)
        self.scale = float(np.quantile(q, tissue_fraction))
        self.fraction = float(np.mean(q < self.scale))

    def _ratio(self, b: int, x: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """rho/R(phi) of lobe b at level-0 points (inside iff < scale), and R(phi)."""
        cx, cy, a, bb, c, s = self._lobes[b]
        dx, dy = x - cx, y - cy
        u, v = (dx * c + dy * s) / a, (dy * c - dx * s) / bb
        rho = np.hypot(u, v)
        z = (u + 1j * v) / np.maximum(rho, 1e-12)
        zk = z * z
        wobble = np.zeros_like(rho)
        for coef in self._coefs[b]:  # harmonics 2, 3, ...
            wobble += (coef * zk).real
            zk *= z
        radius = 1.0 + wobble
        return rho / radius, radius

    def bounding_boxes(self, margin: float = 0.0) -> np.ndarray:
        """(n, 4) level-0 boxes x0, y0, x1, y1 that contain each lobe, grown by ``margin``."""
        reach = self.scale * np.maximum(self._lobes[:, 2], self._lobes[:, 3]) * self._rmax + margin
        cx, cy = self._lobes[:, 0], self._lobes[:, 1]
        return np.stack([cx - reach, cy - reach, cx + reach, cy + reach], axis=1)

    def lobes_near(self, x0: float, y0: float, x1: float, y1: float, margin: float) -> list[int]:
        """Lobes whose bounding box meets the level-0 rectangle [x0, x1) x [y0, y1) grown by ``margin``."""
        bx0, by0, bx1, by1 = self.bounding_boxes(margin).T
        return [int(i) for i in np.flatnonzero((bx1 > x0) & (bx0 < x1) & (by1 > y0) & (by0 < y1))]

    def signed_distance(self, lobes: list[int], x: np.ndarray, y: np.ndarray) -> np.ndarray:
        """Approximate signed distance (level-0 px, > 0 inside) to the union of ``lobes``.

        Per lobe it is (scale R(phi) - rho) sqrt(a b); its gradient is at most sqrt(a/b) (1 + scale |R'| / rho)
        < 1.5 (1 + 3.9 / 0.45) < 16 wherever rho >= scale R_min (outside, and inside up to well past the edge).
        """
        out = np.full(np.broadcast(x, y).shape, -np.inf)
        for b in lobes:
            ratio, radius = self._ratio(b, x, y)
            size = math.sqrt(self._lobes[b, 2] * self._lobes[b, 3])
            np.maximum(out, (self.scale - ratio) * radius * size, out=out)
        return out


def _band_noise(rng: np.random.Generator, n: int, sigma: tuple[float, float], angle: float = 0.0) -> np.ndarray:
    """Periodic (n x n) Gaussian-filtered white noise with unit std; sigma (px) along and across ``angle``."""
    fy = np.fft.fftfreq(n).astype(np.float32)[:, None]
    fx = np.fft.rfftfreq(n).astype(np.float32)[None, :]
    fa = fx * math.cos(angle) + fy * math.sin(angle)
    fc = fy * math.cos(angle) - fx * math.sin(angle)
    kernel = np.exp(-2 * math.pi**2 * ((sigma[0] * fa) ** 2 + (sigma[1] * fc) ** 2))
    spectrum = np.fft.rfft2(rng.standard_normal((n, n), dtype=np.float32))
    spectrum *= kernel
    out = np.fft.irfft2(spectrum, s=(n, n)).astype(np.float32)
    return out / max(float(out.std()), 1e-12)


def _make_texture(rng: np.random.Generator, mpp: float, n: int = _TEXTURE_PERIOD) -> np.ndarray:
    """Periodic level-0 H&E-like texture, planar (3, n, n) float32, as absorbance: GLASS - RGB."""
    um = 1.0 / mpp  # px per µm
    coarse = n // 8  # the smooth fields are made at 1/8 resolution and enlarged (periodically)
    eosin = _periodic_enlarge(_band_noise(rng, coarse, (2.5 * um, 2.5 * um)), 8)
    density = _band_noise(rng, coarse, (6 * um, 6 * um))
    streaks = _band_noise(rng, n, (14 * um, 1.2 * um), angle=rng.uniform(0, math.pi))
    t = eosin
    t *= 0.12
    t += 0.45
    streaks *= 0.2
    t += streaks
    np.clip(t, 0.0, 1.0, out=t)

    # Nuclei: at most one per square lattice cell, jittered but kept inside its cell, so each pixel looks at the
    # nucleus of its own cell only; computed on the (cells, size, cells, size) view of the texture.
    cells = 2 ** min(max(0, round(math.log2(n * mpp / 16.0))), int(math.log2(n)))  # cells of ~16 µm
    size = n // cells
    shape = (cells, 1, cells, 1)
    ra = np.minimum(rng.uniform(2.0, 3.6, shape) * um, 0.45 * size)
    rb = ra * rng.uniform(0.55, 1.0, shape)
    cy = ra + rng.uniform(0, 1, shape) * (size - 2 * ra)  # centre within the cell
    cx = ra + rng.uniform(0, 1, shape) * (size - 2 * ra)
    theta = rng.uniform(0, math.pi, shape)
    at_centre = density[(np.arange(cells) * size // 8)[:, None], (np.arange(cells) * size // 8)[None, :]]
    present = rng.uniform(0, 1, shape) < np.clip(0.6 + 0.3 * at_centre, 0.05, 0.95).reshape(shape)
    local = np.arange(size, dtype=np.float32) + 0.5
    dy = (local[None, :, None, None] - cy).astype(np.float32)
    dx = (local[None, None, None, :] - cx).astype(np.float32)
    c, s = np.cos(theta).astype(np.float32), np.sin(theta).astype(np.float32)
    u = (dx * c + dy * s) / ra.astype(np.float32)
    v = (dy * c - dx * s) / rb.astype(np.float32)
    u *= u
    v *= v
    u += v
    rho = np.sqrt(u, out=u)
    cover = np.clip((1.0 - rho) * rb.astype(np.float32) + 0.5, 0.0, 1.0)
    cover *= present
    cover = cover.reshape(n, n)
    shade = rng.standard_normal((cells, size, cells, size), dtype=np.float32)
    shade *= 0.15
    shade += rng.uniform(0.35, 1.0, shape).astype(np.float32)
    np.clip(shade, 0.0, 1.0, out=shade)
    shade = shade.reshape(n, n)
    grain = rng.standard_normal((n, n), dtype=np.float32)
    grain *= 3.0

    out = np.empty((3, n, n), np.float32)
    for ch in range(3):
        plane, nucleus = out[ch], np.empty((n, n), np.float32)
        np.multiply(t, _STROMA_DARK[ch] - _STROMA_LIGHT[ch], out=plane)
        plane += _STROMA_LIGHT[ch]
        np.multiply(shade, _NUCLEUS_DARK[ch] - _NUCLEUS_LIGHT[ch], out=nucleus)
        nucleus += _NUCLEUS_LIGHT[ch]
        nucleus -= plane
        nucleus *= cover
        plane += nucleus
        plane += grain
        np.subtract(GLASS[ch], plane, out=plane)
    return out


def _periodic_enlarge(field: np.ndarray, factor: int) -> np.ndarray:
    """Bilinear enlargement of a periodic field by an integer factor (stays periodic)."""
    n = field.shape[0]
    pos = (np.arange(n * factor, dtype=np.float32) + 0.5) / factor - 0.5
    i0 = np.floor(pos).astype(np.intp)
    t = pos - i0
    i0, i1 = i0 % n, (i0 + 1) % n
    rows = field[i0] * (1 - t)[:, None] + field[i1] * t[:, None]
    return rows[:, i0] * (1 - t)[None, :] + rows[:, i1] * t[None, :]


def _box_half(planes: np.ndarray) -> np.ndarray:
    """2x2 box average of planar (c, h, w) images with even sides."""
    out = planes[:, 0::2, 0::2] + planes[:, 1::2, 0::2]
    out += planes[:, 0::2, 1::2]
    out += planes[:, 1::2, 1::2]
    out *= 0.25
    return out


def _nodes(n: int, step: int = _GRID_STEP) -> int:
    """Coarse-grid nodes covering n pixel centres: node j sits on pixel step * j."""
    return math.ceil((n - 1) / step) + 1


@cache
def _interp_weights(n: int, step: int = _GRID_STEP) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Left node, right node and right weight of each of n pixels."""
    pos = np.arange(n) / step
    j0 = np.minimum(pos.astype(np.intp), _nodes(n, step) - 1)
    j1 = np.minimum(j0 + 1, _nodes(n, step) - 1)
    return j0, j1, (pos - j0).astype(np.float32)


def _upsample(grid: np.ndarray, out: np.ndarray, scratch: np.ndarray) -> np.ndarray:
    """Bilinear interpolation of coarse-grid values to the pixels of ``out`` (h, w)."""
    x0, x1, tx = _interp_weights(out.shape[1])
    return _upsample_rows(grid[:, x0] + (grid[:, x1] - grid[:, x0]) * tx, out, scratch)


def _upsample_rows(cols: np.ndarray, out: np.ndarray, scratch: np.ndarray) -> np.ndarray:
    """Linear interpolation along y of grid rows (nodes, w) to the pixel rows of ``out`` (h, w)."""
    y0, _, ty = _interp_weights(out.shape[0])
    np.take(cols, y0, axis=0, out=out, mode="clip")  # whole-row gathers; "clip" writes to out unbuffered
    np.take(np.diff(cols, axis=0, append=cols[-1:]), y0, axis=0, out=scratch, mode="clip")
    scratch *= ty[:, None]
    out += scratch
    return out


class _Buffers:
    """Work arrays, reused across calls: fresh large arrays cost page faults, which are slow on some VMs."""

    def __init__(self) -> None:
        self._flat: dict[str, np.ndarray] = {}

    def get(self, name: str, shape: tuple[int, ...], dtype: type = np.float32) -> np.ndarray:
        """A contiguous array of ``shape`` (contents undefined), grown as needed."""
        size = math.prod(shape)
        flat = self._flat.get(name)
        if flat is None or flat.size < size:
            flat = self._flat[name] = np.empty(size, dtype)
        return flat[:size].reshape(shape)


class _Renderer:
    """Renders any rectangle of any level from the tissue layout, the texture and the stain field."""

    def __init__(self, width: int, height: int, mpp: float, tissue_fraction: float, seed: int) -> None:
        rng = np.random.default_rng(seed)
        self.layout = TissueLayout(width, height, tissue_fraction, rng)
        self._texture0: np.ndarray | None = _make_texture(rng, mpp)
        # Stain intensity: plane waves, slow ones across the slide and faster ones that mottle the tissue (and hide
        # the texture's period); stain = (1 + sum amp sin) / (1 + sum amp) <= 1, the texture darkened to match.
        wavelength = np.exp(
            np.r_[rng.uniform(math.log(1000), math.log(6000), 6), rng.uniform(math.log(80), math.log(400), 8)]
        )
        direction = rng.uniform(0, 2 * math.pi, len(wavelength))
        self._kx = 2 * math.pi * np.cos(direction) / wavelength * mpp  # radians per level-0 px
        self._ky = 2 * math.pi * np.sin(direction) / wavelength * mpp
        self._phase = rng.uniform(0, 2 * math.pi, len(wavelength))
        amp = np.r_[rng.uniform(0.03, 0.05, 6), rng.uniform(0.03, 0.05, 8)]
        self._amp = amp / (1 + amp.sum())
        self._stain_mean = np.float32(1 / (1 + amp.sum()))
        self._texture0 *= 1 + amp.sum()
        self._float: np.ndarray | None = None  # the float texture of the last level built
        self._textures: list[np.ndarray] = []  # per level: whole periods of the texture, planar uint8 absorbance
        self._glass = np.asarray(GLASS, np.uint8)[:, None, None]
        self._local = threading.local()

    def prepare(self, level: int) -> None:
        """Build the textures up to ``level`` (not thread-safe: call before rendering from several threads)."""
        while len(self._textures) <= level:
            if self._float is None:
                assert self._texture0 is not None
                self._float, self._texture0 = self._texture0, None
            else:
                self._float = _box_half(self._float)
                if self._float.shape[1] < _MIN_TEXTURE:  # repeat small periods: fewer slices per rectangle
                    self._float = np.tile(self._float, (1, 2, 2))
            tex = np.clip(self._float + 0.5, 0.0, np.asarray(GLASS, np.float32)[:, None, None])
            self._textures.append(tex.astype(np.uint8))  # <= GLASS: glass - absorbance * weight never underflows

    def _stain(self, x: np.ndarray, y: np.ndarray, d: int) -> np.ndarray:
        """Stain-intensity factor (at most 1) at downsample d on the grid of level-0 points y (rows) by x (columns).

        Each wave is attenuated as a d x d box average of level 0 would, and dropped where the grid cannot carry it.
        """
        amp = self._amp * np.sinc(self._kx * d / (2 * math.pi)) * np.sinc(self._ky * d / (2 * math.pi))
        amp[np.hypot(self._kx, self._ky) * d * 4 * _GRID_STEP > 2 * math.pi] = 0.0  # under 4 nodes per wavelength
        ax = x[:, None] * self._kx + self._phase  # (nx, waves)
        ay = y[:, None] * self._ky  # (ny, waves)
        # sum amp sin(ax + ay) = sum amp (cos(ay) sin(ax) + sin(ay) cos(ax)): one small product, by einsum rather
        # than BLAS (whose threads spin and starve the workers on small machines)
        left = np.concatenate([np.cos(ay) * amp, np.sin(ay) * amp], axis=1).astype(np.float32)
        right = np.concatenate([np.sin(ax), np.cos(ax)], axis=1).astype(np.float32)
        out = np.einsum("yk,xk->yx", left, right)
        out += self._stain_mean
        return out

    def nonempty_tiles(self, level: int, tile: int, cols: int, rows: int) -> np.ndarray:
        """(rows, cols) bool: tiles of the level that some lobe's bounding box may reach."""
        d = 1 << level
        out = np.zeros((rows, cols), bool)
        for x0, y0, x1, y1 in self.layout.bounding_boxes(margin=d) / (d * tile):
            c0, r0 = max(0, math.floor(x0)), max(0, math.floor(y0))
            out[r0 : max(r0, math.ceil(y1)), c0 : max(c0, math.ceil(x1))] = True
        return out

    def planes(self, level: int, x0: int, y0: int, w: int, h: int) -> tuple[np.ndarray, np.ndarray | None] | None:
        """RGB planes (3, h, w) uint8 of a level-px rectangle, or None where it is all glass.

        Also returns the tissue coverage on the coarse grid (node j on pixel 8j; > 0: some tissue), or None when
        the rectangle is all tissue. The planes are this thread's work array, overwritten by its next call.
        """
        if len(self._textures) <= level:
            self.prepare(level)
        d = 1 << level
        lobes = self.layout.lobes_near(x0 * d, y0 * d, (x0 + w) * d, (y0 + h) * d, d)
        if not lobes:
            return None
        gy = (y0 + 0.5 + _GRID_STEP * np.arange(_nodes(h))) * d  # grid nodes in level-0 coordinates
        gx = (x0 + 0.5 + _GRID_STEP * np.arange(_nodes(w))) * d
        cover = self._coverage(lobes, gx, gy, d)
        if cover is not None and cover.max() <= 0.0:  # interpolation stays within the nodes' range: all glass
            return None
        buf = getattr(self._local, "buffers", None)
        if buf is None:
            buf = self._local.buffers = _Buffers()
        # weight = stain * coverage, in fixed point (<= 256)
        scratch = buf.get("scratch", (h, w))
        weight = _upsample(self._stain(gx, gy, d), buf.get("weight", (h, w)), scratch)
        if cover is not None:
            edge = _upsample(cover, buf.get("edge", (h, w)), scratch)
            np.clip(edge, 0.0, 1.0, out=edge)
            weight *= edge
        weight *= 256.0
        w16 = buf.get("w16", (h, w), np.uint16)
        np.copyto(w16, weight, casting="unsafe")
        # glass - absorbance * weight / 256, where absorbance * weight <= 255 * 256 fits in uint16
        prod = buf.get("product", (3, h, w), np.uint16)
        tex = self._textures[level]
        period = tex.shape[1]
        r = 0
        while r < h:  # one plain slice of the periodic texture per period crossed
            ty = (y0 + r) % period
            nr = min(h - r, period - ty)
            c = 0
            while c < w:
                tx0 = (x0 + c) % period
                nc = min(w - c, period - tx0)
                np.multiply(
                    tex[:, ty : ty + nr, tx0 : tx0 + nc],
                    w16[r : r + nr, c : c + nc],
                    out=prod[:, r : r + nr, c : c + nc],
                )
                c += nc
            r += nr
        np.right_shift(prod, 8, out=prod)
        rgb = buf.get("rgb", (3, h, w), np.uint8)
        np.copyto(rgb, prod, casting="unsafe")
        np.subtract(self._glass, rgb, out=rgb)  # absorbance <= glass: no underflow
        return rgb, cover

    def _coverage(self, lobes: list[int], gx: np.ndarray, gy: np.ndarray, d: int) -> np.ndarray | None:
        """Coverage (signed distance in level px + 0.5) on the grid gy x gx, or None where certainly all tissue.

        A sparser grid is tried first: its nodes are at most ``_SPARSE`` grid steps from any pixel, and the
        approximate distance changes by at most ``_SLOPE`` px per px, so a margin decides all-tissue or all-glass.
        """
        if len(gx) > 2 * _SPARSE and len(gy) > 2 * _SPARSE:
            sy = np.unique(np.r_[0 : len(gy) : _SPARSE, len(gy) - 1])
            sx = np.unique(np.r_[0 : len(gx) : _SPARSE, len(gx) - 1])
            yy, xx = np.meshgrid(gy[sy], gx[sx], indexing="ij")
            sparse = self.layout.signed_distance(lobes, xx, yy) / d + 0.5
            margin = _SLOPE * _SPARSE * _GRID_STEP
            if sparse.min() >= 1.0 + margin:
                return None
            if sparse.max() <= -margin:
                return np.zeros((1, 1), np.float32)
        yy, xx = np.meshgrid(gy, gx, indexing="ij")
        return (self.layout.signed_distance(lobes, xx, yy) / d + 0.5).astype(np.float32)

    def render(self, level: int, x0: int, y0: int, w: int, h: int) -> Image.Image | None:
        """The RGB image of a level-px rectangle, or None where it is all glass."""
        result = self.planes(level, x0, y0, w, h)
        return None if result is None else Image.merge("RGB", [Image.fromarray(p) for p in result[0]])

    def encode_strip(self, level: int, x0: int, y0: int, tiles: int, tile: int, quality: int) -> list[bytes | None]:
        """JPEG tiles of a horizontal strip of ``tiles`` tiles from (x0, y0); None for a glass tile."""
        result = self.planes(level, x0, y0, tiles * tile, tile)
        if result is None:
            return [None] * tiles
        rgb, cover = result
        strip = Image.merge("RGB", [Image.fromarray(p) for p in rgb])
        step = tile // _GRID_STEP
        out: list[bytes | None] = []
        for t in range(tiles):
            if cover is not None and cover[:, t * step : (t + 1) * step + 1].max() <= 0.0:
                out.append(None)
            else:
                out.append(_jpeg(strip.crop((t * tile, 0, (t + 1) * tile, tile)), quality))
        return out


def _jpeg(image: Image.Image, quality: int) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format="JPEG", quality=quality, subsampling="4:2:0")
    return buf.getvalue()


def _in_order(pool: ThreadPoolExecutor, jobs: Iterator[T | Callable[[], T]], window: int) -> Iterator[T]:
    """Run the callables among ``jobs`` in ``pool``; yield all results (values as they are) in order, with at most
    ``window`` pending."""
    pending: deque[Future[T] | tuple[T]] = deque()
    for job in jobs:
        pending.append(pool.submit(job) if callable(job) else (job,))
        while len(pending) >= window:
            item = pending.popleft()
            yield item[0] if isinstance(item, tuple) else item.result()
    while pending:
        item = pending.popleft()
        yield item[0] if isinstance(item, tuple) else item.result()


def require_jpeg_writer() -> None:
    """Refuse, naming the extra to install, when tifffile cannot write JPEG-compressed pages: it asks imagecodecs
    for the JPEG codec even for tiles encoded already, and without it fails mid-write with a KeyError."""
    if importlib.util.find_spec("imagecodecs") is None:
        raise LoupeError(
            f"writing synthetic whole slides (JPEG-tiled TIFF) needs the imagecodecs package, not installed: "
            f"{WSI_INSTALL_HINT}"
        )


def make_pyramidal_slide(
    path: str | Path,
    width: int,
    height: int,
    mpp: float = 0.25,
    tile: int = 256,
    levels: int | None = None,
    tissue_fraction: float = 0.25,
    seed: int = 0,
    quality: int = 80,
    workers: int | None = None,
    bigtiff: bool | None = None,
) -> SyntheticWSI:
    """Write a synthetic Aperio-style SVS (see the module docstring) and describe it.

    ``levels=None`` halves until the top level is at most 1024 px; ``bigtiff=None`` uses BigTIFF when the raw
    RGB size exceeds 4 GiB; ``workers=None`` uses every core. Deterministic for given arguments.
    """
    if width < 1 or height < 1:
        raise ValueError(f"slide size must be positive, got {width}x{height}")
    if tile < 16 or tile % 16:
        raise ValueError(f"tile must be a positive multiple of 16 (JPEG 4:2:0 blocks), got {tile}")
    if not (mpp > 0 and math.isfinite(mpp)):
        raise ValueError(f"mpp must be a positive number, got {mpp!r}")
    if not 0.0 < tissue_fraction < 1.0:
        raise ValueError(f"tissue_fraction must be in (0, 1), got {tissue_fraction!r}")
    if not 1 <= quality <= 100:
        raise ValueError(f"JPEG quality must be in [1, 100], got {quality!r}")
    levels = auto_levels(width, height) if levels is None else int(levels)
    if levels < 1:
        raise ValueError(f"levels must be at least 1, got {levels}")
    if bigtiff is None:
        bigtiff = width * height * 3 > 2**32
    require_jpeg_writer()
    start = time.perf_counter()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    dims = level_dimensions(width, height, levels)
    renderer = _Renderer(width, height, mpp, tissue_fraction, seed)
    glass = _jpeg(Image.new("RGB", (tile, tile), GLASS), quality)
    power = 10.0 / mpp
    header = f"Aperio Image Library v12.0.15 \r\n{width}x{height} [0,0 {width}x{height}] ({tile}x{tile})"
    meta = f"|AppMag = {power:g}|MPP = {mpp:g}|Filename = {path.stem}|Title = loupe synthetic slide, seed {seed}"
    workers = max(1, workers or os.cpu_count() or 1)

    per_strip = max(1, _STRIP_PX // tile)

    def strips(level: int) -> Iterator[list[bytes | None] | Callable[[], list[bytes | None]]]:
        lw, lh = dims[level]
        renderer.prepare(level)  # before any worker needs it
        rows, cols = -(-lh // tile), -(-lw // tile)
        busy = renderer.nonempty_tiles(level, tile, cols, rows)
        for r in range(rows):
            for c in range(0, cols, per_strip):
                n = min(per_strip, cols - c)
                if busy[r, c : c + n].any():
                    yield partial(renderer.encode_strip, level, c * tile, r * tile, n, tile, quality)
                else:
                    yield [None] * n

    def tiles(level: int) -> Iterator[bytes]:
        for strip in _in_order(pool, strips(level), 2 * workers):
            yield from (glass if data is None else data for data in strip)

    with ThreadPoolExecutor(workers) as pool, tifffile.TiffWriter(path, bigtiff=bigtiff) as tw:
        # every page 8-bit RGB, JPEG with 4:2:0 chroma, without tifffile's JSON description
        write = partial(
            tw.write, dtype=np.uint8, photometric="rgb", compression="jpeg", subsampling=(2, 2), metadata=None
        )
        for level, (lw, lh) in enumerate(dims):
            per_cm = 1e4 / (mpp * (1 << level))
            desc = header + ("" if level == 0 else f" -> {lw}x{lh}") + f" JPEG/RGB Q={quality}" + meta
            write(
                tiles(level),
                shape=(lh, lw, 3),
                tile=(tile, tile),
                description=desc,
                resolution=(per_cm, per_cm),
                resolutionunit="CENTIMETER",
            )
            if level == 0:  # IFD 1: the stripped thumbnail, as in Aperio files
                thumb = _thumbnail(renderer, width, height)
                write(
                    iter([_jpeg(thumb, 90)]),
                    shape=(thumb.height, thumb.width, 3),
                    rowsperstrip=thumb.height,
                    description=f"{header} -> {thumb.width}x{thumb.height} JPEG/RGB Q=90",
                )
    return SyntheticWSI(
        path=path,
        width=width,
        height=height,
        level_dimensions=dims,
        mpp=float(mpp),
        objective_power=power,
        tile=tile,
        tissue_fraction=renderer.layout.fraction,
        file_bytes=path.stat().st_size,
        seconds=time.perf_counter() - start,
    )


def _thumbnail(renderer: _Renderer, width: int, height: int) -> Image.Image:
    """The whole slide rendered at the first power-of-two downsample whose longer side is at most 1024 px."""
    level = auto_levels(width, height, _THUMBNAIL_MAX) - 1
    lw, lh = level_dimensions(width, height, level + 1)[level]
    image = renderer.render(level, 0, 0, lw, lh)
    return Image.new("RGB", (lw, lh), GLASS) if image is None else image


def write_pyramidal_slide(
    path: str | Path,
    width: int,
    height: int,
    mpp: float = 0.25,
    tile: int = 256,
    levels: int | None = None,
    tissue_fraction: float = 0.25,
    seed: int = 0,
    quality: int = 80,
) -> Path:
    """Write a synthetic pyramidal SVS (see :func:`make_pyramidal_slide`) and return its path."""
    return make_pyramidal_slide(path, width, height, mpp, tile, levels, tissue_fraction, seed, quality).path
