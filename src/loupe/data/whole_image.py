"""Whole images for StreamingCLAM: a slide's grid-aligned region at one magnification, read in parallel chunks."""

from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import torch
from torch import Tensor

from loupe.data.catalog import SlideCatalog
from loupe.errors import SlideError
from loupe.models.interface import WholeImage
from loupe.slides import SlideReader

__all__ = ["WholeImage", "WholeImageReader", "tissue_box"]


def tissue_box(valid: np.ndarray) -> tuple[int, int, int, int]:
    """The smallest (row0, col0, row1, col1) box holding every True cell of a (rows, cols) mask."""
    rows = np.flatnonzero(valid.any(1))
    cols = np.flatnonzero(valid.any(0))
    if len(rows) == 0:
        raise SlideError("no tissue cell: nothing to classify (check the tissue detection, or set data.tissue false)")
    return int(rows[0]), int(cols[0]), int(rows[-1]) + 1, int(cols[-1]) + 1


class WholeImageReader:
    """Reads whole images of catalog slides (their single magnification) in chunks on a thread pool, so that
    OpenSlide's decoding runs in parallel; keeps the wall time spent, like :class:`~loupe.data.loading.CellReader`."""

    def __init__(
        self, catalog: SlideCatalog, threads: int = 8, crop_to_tissue: bool = True, chunk_cells: int = 64
    ) -> None:
        if len(catalog.magnifications) != 1:
            raise ValueError("whole images are read at exactly one magnification")
        self.catalog = catalog
        self.crop_to_tissue = crop_to_tissue
        self.chunk_cells = chunk_cells
        self._pool = ThreadPoolExecutor(max_workers=max(1, threads), thread_name_prefix="loupe-image")
        self.seconds = 0.0
        self.patches = 0

    def __call__(self, slide_index: int, valid: np.ndarray | Tensor | None = None) -> WholeImage:
        """Slide ``slide_index``'s image; ``valid`` (N,) bool over its grid cells (None: every cell)."""
        start = time.perf_counter()
        try:
            return self._read(slide_index, valid)
        finally:
            self.seconds += time.perf_counter() - start

    def _read(self, i: int, valid: np.ndarray | Tensor | None) -> WholeImage:
        grid = self.catalog.grid(i).grids[0]
        mask = np.ones(grid.shape, dtype=bool) if valid is None else np.asarray(valid, dtype=bool).reshape(grid.shape)
        r0, c0, r1, c1 = tissue_box(mask) if self.crop_to_tissue else (0, 0, *grid.shape)
        p, s = grid.patch_size, grid.cell_size0
        out = np.empty(((r1 - r0) * p, (c1 - c0) * p, 3), dtype=np.uint8)
        reader = self.catalog.reader(i)
        n = self.chunk_cells
        jobs = []
        for r in range(r0, r1, n):
            for c in range(c0, c1, n):
                rows, cols = min(n, r1 - r), min(n, c1 - c)
                rect = (c * s, r * s, cols * s, rows * s)
                jobs.append(
                    self._pool.submit(_read_chunk, reader, out, rect, (r - r0) * p, (c - c0) * p, rows, cols, p)
                )
        for job in jobs:
            job.result()
        self.patches += (r1 - r0) * (c1 - c0)
        image = torch.from_numpy(out).permute(2, 0, 1)[None]  # a view: the pixels stay channels-last, uint8
        return WholeImage(image, torch.from_numpy(mask[r0:r1, c0:c1].copy()), (r0, c0, r1, c1))

    def close(self) -> None:
        self._pool.shutdown(wait=False)


def _read_chunk(
    reader: SlideReader,
    out: np.ndarray,
    rect: tuple[float, float, float, float],
    y: int,
    x: int,
    rows: int,
    cols: int,
    p: int,
) -> None:
    out[y : y + rows * p, x : x + cols * p] = reader.read_region(
        rect[0], rect[1], (rect[2], rect[3]), (cols * p, rows * p)
    )
