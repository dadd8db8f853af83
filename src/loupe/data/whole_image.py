"""Whole images for StreamingCLAM: a slide's grid-aligned region at one magnification, read in parallel chunks.

Images up to a size are read into host memory whole (a uint8 tensor); larger ones (65,536² px is 12.9 GB) are
returned as :class:`SlideRegions`, which reads each crop a streamed tile asks for from the slide, through a bounded
cache of chunks. Both read the same chunks (:func:`_chunks`): a crop is byte for byte the in-memory image's.
"""

from __future__ import annotations

import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import torch
from torch import Tensor

from loupe.data.catalog import SlideCatalog
from loupe.errors import SlideError, SlideReadError, describe_error
from loupe.models.interface import WholeImage
from loupe.slides import SlideReader

__all__ = ["REGION_CACHE_BYTES", "SlideRegions", "WholeImage", "WholeImageReader", "tissue_box"]

#: Bytes of chunks a :class:`SlideRegions` keeps between crops by default: 81 chunks of 2048² px (64 cells of 32 px),
#: two chunk rows across an 80,000-px-wide box, so that a row-major sweep of tiles whose crops span two chunk rows
#: (tiles up to ~1,500 px) reads each chunk about once per pass, even at the paper's 65,536².
REGION_CACHE_BYTES = 1024 * 10**6

Box = tuple[int, int, int, int]
Key = tuple[int, int]


def tissue_box(valid: np.ndarray) -> tuple[int, int, int, int]:
    """The smallest (row0, col0, row1, col1) box holding every True cell of a (rows, cols) mask."""
    rows = np.flatnonzero(valid.any(1))
    cols = np.flatnonzero(valid.any(0))
    if len(rows) == 0:
        raise SlideError("no tissue cell: nothing to classify (check the tissue detection, or set data.tissue false)")
    return int(rows[0]), int(cols[0]), int(rows[-1]) + 1, int(cols[-1]) + 1


class WholeImageReader:
    """Reads whole images of catalog slides (their single magnification) in chunks on a thread pool, so that
    OpenSlide's decoding runs in parallel; keeps the wall time spent, like :class:`~loupe.data.loading.CellReader`.

    An image of more than ``max_image_bytes`` (uint8 RGB; None: no limit) is not read here but returned as a
    :class:`SlideRegions` reading crops on demand through a cache of ``cache_bytes``; its reads count here too."""

    def __init__(
        self,
        catalog: SlideCatalog,
        threads: int = 8,
        crop_to_tissue: bool = True,
        chunk_cells: int = 64,
        max_image_bytes: int | None = None,
        cache_bytes: int = REGION_CACHE_BYTES,
    ) -> None:
        if len(catalog.magnifications) != 1:
            raise ValueError("whole images are read at exactly one magnification")
        self.catalog = catalog
        self.crop_to_tissue = crop_to_tissue
        self.chunk_cells = chunk_cells
        self.max_image_bytes = max_image_bytes
        self.cache_bytes = cache_bytes
        self._pool = ThreadPoolExecutor(max_workers=max(1, threads), thread_name_prefix="loupe-image")
        self._lock = threading.Lock()
        self.seconds = 0.0
        self.patches = 0

    def __call__(self, slide_index: int, valid: np.ndarray | Tensor | None = None) -> WholeImage:
        """Slide ``slide_index``'s image; ``valid`` (N,) bool over its grid cells (None: every cell)."""
        start = time.perf_counter()
        try:
            return self._read(slide_index, valid)
        finally:
            self._spent(time.perf_counter() - start)

    def _spent(self, seconds: float) -> None:
        """Count reading time (also called by the :class:`SlideRegions` it made, from the streaming thread)."""
        with self._lock:
            self.seconds += seconds

    def _read(self, i: int, valid: np.ndarray | Tensor | None) -> WholeImage:
        grid = self.catalog.grid(i).grids[0]
        mask = np.ones(grid.shape, dtype=bool) if valid is None else np.asarray(valid, dtype=bool).reshape(grid.shape)
        r0, c0, r1, c1 = box = tissue_box(mask) if self.crop_to_tissue else (0, 0, *grid.shape)
        keep = torch.from_numpy(mask[r0:r1, c0:c1].copy())
        p, s = grid.patch_size, grid.cell_size0
        reader = self.catalog.reader(i)  # opened here either way: a slide that no longer opens fails now
        self.patches += (r1 - r0) * (c1 - c0)
        if self.max_image_bytes is not None and (r1 - r0) * p * (c1 - c0) * p * 3 > self.max_image_bytes:
            regions = SlideRegions(
                self.catalog, i, box, self._pool, self.chunk_cells, self.cache_bytes, clock=self._spent
            )
            return WholeImage(regions, keep, box)
        out = np.empty(((r1 - r0) * p, (c1 - c0) * p, 3), dtype=np.uint8)
        jobs = [
            self._pool.submit(_read_chunk, reader, out, chunk, p, s, (chunk[0] - r0) * p, (chunk[1] - c0) * p)
            for chunk in _chunks(box, self.chunk_cells).values()
        ]
        for job in jobs:
            job.result()
        image = torch.from_numpy(out).permute(2, 0, 1)[None]  # a view: the pixels stay channels-last, uint8
        return WholeImage(image, keep, box)

    def close(self) -> None:
        self._pool.shutdown(wait=False)


class SlideRegions:
    """One slide's grid-aligned ``box`` at the catalog's magnification, read crop by crop (an
    :class:`~loupe.models.interface.ImageRegions`): the pixels :class:`WholeImageReader` would hold, without holding
    them. A streamed tile asks for its crop (its block plus the context of its receptive field); neighbouring tiles'
    crops overlap, and the backward pass reads every tile again, so the chunks a crop is made of are kept in a cache
    of at most ``cache_bytes``.

    The slide is read in the reader's chunks (``chunk_cells``² cells, aligned to the box), the ones a crop lacks in
    parallel on ``pool``. Eviction is shaped for the row-major sweep of tiles (see :meth:`_evict`): where the cache
    holds less than the chunk rows one tile row spans, least-recently-used would drop each chunk just before the
    next tile row reuses it; this order stays near the optimum (simulated: within 1.5× of Belady's reads, where
    LRU took up to 3×). Memory held: the cache, the chunks of one crop and that crop; never the whole image.

    A failed read raises a :class:`~loupe.errors.SlideReadError` with the slide's catalog ``index``; ``clock``
    receives the seconds each crop took."""

    def __init__(
        self,
        catalog: SlideCatalog,
        index: int,
        box: Box,
        pool: ThreadPoolExecutor,
        chunk_cells: int = 64,
        cache_bytes: int = REGION_CACHE_BYTES,
        clock: Callable[[float], None] | None = None,
    ) -> None:
        grid = catalog.grid(index).grids[0]
        r0, c0, r1, c1 = box
        self.catalog = catalog
        self.index = index
        self.box = box
        self.cache_bytes = max(0, cache_bytes)
        self._pool = pool
        self._clock = clock
        self._p, self._s = grid.patch_size, grid.cell_size0
        self._chunks = _chunks(box, chunk_cells)
        self._step = chunk_cells * self._p  # pixels per chunk side (the last row and column may be shorter)
        self._shape = (1, 3, (r1 - r0) * self._p, (c1 - c0) * self._p)
        self._cache: OrderedDict[Key, np.ndarray] = OrderedDict()  # least recently used first
        self._lock = threading.Lock()
        self.cached_bytes = 0
        """Bytes of chunks in the cache now."""
        self.peak_bytes = 0
        """Most bytes held at once while serving a crop: the cache, the chunks read for the crop, the crop."""
        self.chunk_reads = 0
        """Chunks read from the slide so far (each costs a ``read_region`` of ``chunk_cells``² cells)."""

    @property
    def shape(self) -> tuple[int, int, int, int]:
        """(1, 3, H, W) of the whole box."""
        return self._shape

    def crop(self, rows: slice, cols: slice) -> Tensor:
        """Pixels ``[rows, cols]`` of the box as (1, 3, h, w) uint8 (a channels-last view)."""
        y0, y1 = _span(rows, self._shape[2])
        x0, x1 = _span(cols, self._shape[3])
        start = time.perf_counter()
        try:
            with self._lock:
                out = self._crop(y0, y1, x0, x1)
        except (SlideReadError, MemoryError):
            raise
        except Exception as err:  # a corrupt tile, a file truncated or replaced while in use
            raise SlideReadError(
                f"reading pixels [{y0}:{y1}, {x0}:{x1}] of the whole image failed: {describe_error(err)}", self.index
            ) from err
        finally:
            if self._clock is not None:
                self._clock(time.perf_counter() - start)
        return torch.from_numpy(out).permute(2, 0, 1)[None]

    def _crop(self, y0: int, y1: int, x0: int, x1: int) -> np.ndarray:
        """Pixels [y0:y1, x0:x1] (h, w, 3): cached chunks, the missing ones read (in parallel when several)."""
        out = np.empty((y1 - y0, x1 - x0, 3), dtype=np.uint8)
        if out.size == 0:
            return out
        step = self._step
        keys = [
            (i, j) for i in range(y0 // step, (y1 - 1) // step + 1) for j in range(x0 // step, (x1 - 1) // step + 1)
        ]
        have = {k: self._cache[k] for k in keys if k in self._cache}
        missing = [k for k in keys if k not in have]
        incoming = sum(self._nbytes(k) for k in missing)
        self._evict(keys, incoming, protect=True)
        self.peak_bytes = max(self.peak_bytes, self.cached_bytes + incoming + out.nbytes)
        if missing:
            reader = self.catalog.reader(self.index)
            if len(missing) == 1:
                read = {missing[0]: self._read(reader, missing[0])}
            else:
                jobs = {k: self._pool.submit(self._read, reader, k) for k in missing}
                read = {k: job.result() for k, job in jobs.items()}
            self.chunk_reads += len(missing)
        else:
            read = {}
        for key in keys:
            chunk = have[key] if key in have else read[key]
            cy, cx = key[0] * step, key[1] * step
            ya, yb = max(y0, cy), min(y1, cy + chunk.shape[0])
            xa, xb = max(x0, cx), min(x1, cx + chunk.shape[1])
            out[ya - y0 : yb - y0, xa - x0 : xb - x0] = chunk[ya - cy : yb - cy, xa - cx : xb - cx]
        for key in have:
            self._cache.move_to_end(key)
        for key, chunk in read.items():
            self._cache[key] = chunk
            self.cached_bytes += chunk.nbytes
        self._evict(keys, 0, protect=False)
        return out

    def _evict(self, keys: list[Key], room: int, protect: bool) -> None:
        """Drop cached chunks until ``room`` more bytes fit the budget. The crop's chunks ``keys`` span chunk rows
        top..bottom; a row-major sweep is past the rows above (dropped first, least recently used first) and
        needs the rows below only after this band (dropped next, last row first); within the band the most
        recently used go first (the column just left behind is the last one the next tile row needs). The crop's
        own chunks go last, left column first (the sweep goes right), unless ``protect`` (they are in use)."""
        if self.cached_bytes + room <= self.cache_bytes:
            return
        top, bottom, crop = keys[0][0], keys[-1][0], set(keys)
        others = [k for k in self._cache if k not in crop]  # least recently used first
        order = [k for k in others if k[0] < top]
        order += sorted((k for k in others if k[0] > bottom), key=lambda k: (-k[0], -k[1]))
        order += [k for k in reversed(others) if top <= k[0] <= bottom]
        if not protect:
            order += sorted((k for k in keys if k in self._cache), key=lambda k: (k[1], k[0]))
        for key in order:
            if self.cached_bytes + room <= self.cache_bytes:
                break
            self.cached_bytes -= self._cache.pop(key).nbytes

    def _nbytes(self, key: Key) -> int:
        """Bytes of chunk ``key``'s pixels."""
        _, _, rows, cols = self._chunks[key]
        return rows * self._p * cols * self._p * 3

    def _read(self, reader: SlideReader, key: Key) -> np.ndarray:
        """Chunk ``key``'s pixels, read from the slide (on a pool thread)."""
        _, _, rows, cols = self._chunks[key]
        out = np.empty((rows * self._p, cols * self._p, 3), dtype=np.uint8)
        _read_chunk(reader, out, self._chunks[key], self._p, self._s, 0, 0)
        return out


def _span(s: slice, size: int) -> tuple[int, int]:
    """[start, stop) of a slice of steps of 1 over ``size`` (clipped like tensor indexing)."""
    start, stop, step = s.indices(size)
    if step != 1:
        raise ValueError(f"crops take slices of step 1, got {s!r}")
    return start, max(start, stop)


def _chunks(box: Box, n: int) -> dict[Key, tuple[int, int, int, int]]:
    """The chunks a box is read in, by (chunk row, chunk col): (cell row, cell col, rows, cols) in the slide's
    grid; ``n``² cells each, aligned to the box's corner (the last row and column may be smaller). The one
    definition of the chunking: a chunk's pixels depend on its rectangle (resampling), so both readers use it."""
    r0, c0, r1, c1 = box
    return {
        ((r - r0) // n, (c - c0) // n): (r, c, min(n, r1 - r), min(n, c1 - c))
        for r in range(r0, r1, n)
        for c in range(c0, c1, n)
    }


def _read_chunk(
    reader: SlideReader,
    out: np.ndarray,
    chunk: tuple[int, int, int, int],
    p: int,
    s: float,
    y: int,
    x: int,
) -> None:
    """Read ``chunk`` (cell row, cell col, rows, cols): the level-0 rectangle of its cells (``s`` level-0 px per
    cell) resampled to ``p`` px per cell, into ``out`` at (y, x)."""
    r, c, rows, cols = chunk
    out[y : y + rows * p, x : x + cols * p] = reader.read_region(
        c * s, r * s, (cols * s, rows * s), (cols * p, rows * p)
    )
