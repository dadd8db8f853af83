"""Deep Zoom tiles over any :class:`loupe.slides.SlideReader`: one code path for every backend.

The Deep Zoom pyramid (the protocol of Microsoft's Deep Zoom and openslide's ``DeepZoomGenerator``) has levels
0..L, L = ceil(log2(max(W, H))); level l is the level-0 image scaled by 2^(l − L), each dimension rounded up, cut
into ``tile_size`` squares that overlap their neighbours by ``overlap`` pixels. A tile is one
``SlideReader.read_region`` call (the reader picks its best pyramid level and resamples), encoded as JPEG.
Encoded tiles are kept in a :class:`TileCache` bounded in bytes.
"""

from __future__ import annotations

import io
import math
import threading
from collections import OrderedDict
from collections.abc import Hashable

from PIL import Image

from loupe.slides.reader import SlideReader

TILE_SIZE, OVERLAP, JPEG_QUALITY = 254, 1, 85


class TileError(ValueError):
    """A tile that the pyramid does not have (the app answers 404)."""


class DeepZoom:
    """The Deep Zoom pyramid of a slide of level-0 size ``dimensions``."""

    def __init__(self, dimensions: tuple[int, int], tile_size: int = TILE_SIZE, overlap: int = OVERLAP) -> None:
        w, h = int(dimensions[0]), int(dimensions[1])
        if w < 1 or h < 1:
            raise ValueError(f"image size must be positive, got {dimensions!r}")
        self.width, self.height = w, h
        self.tile_size, self.overlap = int(tile_size), int(overlap)
        self.max_level = max(0, math.ceil(math.log2(max(w, h))))

    @property
    def level_count(self) -> int:
        return self.max_level + 1

    def level_dimensions(self, level: int) -> tuple[int, int]:
        """(w, h) of a Deep Zoom level."""
        self._check_level(level)
        scale = 2 ** (self.max_level - level)
        return (max(1, math.ceil(self.width / scale)), max(1, math.ceil(self.height / scale)))

    def level_tiles(self, level: int) -> tuple[int, int]:
        """(columns, rows) of tiles of a level."""
        w, h = self.level_dimensions(level)
        return (math.ceil(w / self.tile_size), math.ceil(h / self.tile_size))

    def _check_level(self, level: int) -> None:
        if not 0 <= level <= self.max_level:
            raise TileError(f"level {level} outside 0..{self.max_level}")

    def tile_box(self, level: int, col: int, row: int) -> tuple[int, int, int, int]:
        """(x, y, w, h) of a tile in the pixels of its level, overlap included."""
        cols, rows = self.level_tiles(level)
        if not (0 <= col < cols and 0 <= row < rows):
            raise TileError(f"tile ({col}, {row}) outside the {cols}x{rows} tiles of level {level}")
        lw, lh = self.level_dimensions(level)
        x0 = col * self.tile_size - (self.overlap if col > 0 else 0)
        y0 = row * self.tile_size - (self.overlap if row > 0 else 0)
        x1 = min(lw, (col + 1) * self.tile_size + self.overlap)
        y1 = min(lh, (row + 1) * self.tile_size + self.overlap)
        return (x0, y0, x1 - x0, y1 - y0)

    def level0_rect(self, level: int, col: int, row: int) -> tuple[tuple[float, float, float, float], tuple[int, int]]:
        """The level-0 rectangle a tile shows and the tile's pixel size."""
        x, y, w, h = self.tile_box(level, col, row)
        lw, lh = self.level_dimensions(level)
        sx, sy = self.width / lw, self.height / lh  # exact at the image's edge, 2^(L-l) inside
        return (x * sx, y * sy, w * sx, h * sy), (w, h)

    def dzi(self, fmt: str = "jpeg") -> str:
        """The pyramid's ``.dzi`` descriptor."""
        return (
            '<?xml version="1.0" encoding="UTF-8"?>\n'
            f'<Image xmlns="http://schemas.microsoft.com/deepzoom/2008" Format="{fmt}" Overlap="{self.overlap}" '
            f'TileSize="{self.tile_size}"><Size Width="{self.width}" Height="{self.height}"/></Image>\n'
        )

    def tile(self, reader: SlideReader, level: int, col: int, row: int, quality: int = JPEG_QUALITY) -> bytes:
        """One tile as JPEG bytes."""
        (x, y, w0, h0), size = self.level0_rect(level, col, row)
        pixels = reader.read_region(x, y, (w0, h0), size)
        buffer = io.BytesIO()
        Image.fromarray(pixels).save(buffer, format="JPEG", quality=quality)
        return buffer.getvalue()


class TileCache:
    """Encoded tiles (or any bytes) by key, least recently used dropped first once ``max_bytes`` is exceeded.
    Thread-safe."""

    def __init__(self, max_bytes: int) -> None:
        if max_bytes < 0:
            raise ValueError(f"max_bytes must be ≥ 0, got {max_bytes}")
        self.max_bytes = int(max_bytes)
        self.bytes = 0
        self.hits = self.misses = 0
        self._items: OrderedDict[Hashable, bytes] = OrderedDict()
        self._lock = threading.Lock()

    def get(self, key: Hashable) -> bytes | None:
        with self._lock:
            data = self._items.get(key)
            if data is None:
                self.misses += 1
                return None
            self._items.move_to_end(key)
            self.hits += 1
            return data

    def put(self, key: Hashable, data: bytes) -> None:
        if len(data) > self.max_bytes:
            return
        with self._lock:
            old = self._items.pop(key, None)
            if old is not None:
                self.bytes -= len(old)
            self._items[key] = data
            self.bytes += len(data)
            while self.bytes > self.max_bytes:
                _, dropped = self._items.popitem(last=False)
                self.bytes -= len(dropped)

    def __len__(self) -> int:
        return len(self._items)
