"""Feeding the model: thumbnails through a DataLoader, sampled cells read concurrently by threads."""

from __future__ import annotations

import itertools
import time
from collections import defaultdict
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import DataLoader, Dataset, Sampler

from loupe.data.catalog import SlideCatalog
from loupe.data.preparation import Timer
from loupe.errors import SlideReadError, describe_error
from loupe.models.interface import GridShapes, SlideBatch
from loupe.ranks import world


@dataclass(frozen=True)
class SlideItem:
    """One slide as the model's inputs: thumbnail (3, h, w) uint8, valid cells (N,) bool, label index (-1:
    unknown), catalog index and grid shapes. :func:`collate_slides` stacks items into a :class:`SlideBatch`."""

    thumbnail: Tensor
    valid: Tensor
    label: int
    index: int
    shapes: GridShapes

    @classmethod
    def from_arrays(
        cls, thumbnail: np.ndarray, valid: np.ndarray, index: int, shapes: GridShapes, label: int = -1
    ) -> SlideItem:
        """From a thumbnail (h, w, 3) uint8 array and a valid-cell mask, as the catalog gives them."""
        thumb = torch.from_numpy(np.array(thumbnail, copy=True)).permute(2, 0, 1).contiguous()
        return cls(thumb, torch.from_numpy(np.array(valid, dtype=bool)), label, index, shapes)


def collate_slides(items: Sequence[SlideItem]) -> SlideBatch:
    """The one way slides become a batch: stacked thumbnails, masks, labels and indices; all items must share
    their grid shapes (the shape-bucketed sampler guarantees it)."""
    shapes = items[0].shapes
    if any(item.shapes != shapes for item in items):
        raise ValueError("slides of one batch must have the same grid shapes (use ShapeBatchSampler)")
    return SlideBatch(
        thumbnails=torch.stack([item.thumbnail for item in items]),
        valid=torch.stack([item.valid for item in items]),
        labels=torch.tensor([item.label for item in items], dtype=torch.long),
        indices=torch.tensor([item.index for item in items], dtype=torch.long),
        shapes=shapes,
    )


class ThumbnailDataset(Dataset):
    """Item i of a subset of a catalog: the slide's thumbnail (uint8, 3×h×w), its valid cells (N,) bool, label
    index and catalog index. Thumbnails and masks come through the catalog's disk cache; with ``cache`` they are
    also kept in memory after the first epoch."""

    def __init__(
        self,
        catalog: SlideCatalog,
        indices: Sequence[int],
        labels: Sequence[int] | None = None,
        cache: bool = True,
    ) -> None:
        self.catalog = catalog
        self.indices = list(indices)
        self.labels = list(labels) if labels is not None else [-1] * len(self.indices)
        self.cache = cache
        self._memo: dict[int, tuple[Tensor, Tensor]] = {}

    def __len__(self) -> int:
        return len(self.indices)

    def shapes(self, item: int) -> GridShapes:
        return _shapes(self.catalog, self.indices[item])

    def _inputs(self, item: int) -> tuple[Tensor, Tensor]:
        i = self.indices[item]
        found = self._memo.get(i)
        if found is None:
            arr = self.catalog.thumbnail(i)
            thumb = torch.from_numpy(np.array(arr, copy=True)).permute(2, 0, 1).contiguous()
            found = (thumb, torch.from_numpy(np.array(self.catalog.valid(i), dtype=bool)))
            if self.cache:
                self._memo[i] = found
        return found

    def thumbnail(self, item: int) -> Tensor:
        return self._inputs(item)[0]

    def __getitem__(self, item: int) -> SlideItem:
        i = self.indices[item]
        thumb, valid = self._inputs(item)
        return SlideItem(thumb, valid, int(self.labels[item]), i, self.shapes(item))


def _shapes(catalog: SlideCatalog, i: int) -> GridShapes:
    return tuple((int(r), int(c)) for r, c in catalog.grid(i).shapes)


@dataclass
class PreparedSlide:
    """A slide prepared for prediction: the model's inputs (``item``), the overview and tissue mask its outputs
    are drawn on, and the seconds each step took; or, when it could not be prepared, the reason (``error``)."""

    index: int
    item: SlideItem | None = None
    overview: np.ndarray | None = None
    tissue: np.ndarray | None = None
    timings: dict[str, float] = field(default_factory=dict)
    error: str | None = None


class PreparedSlides(Dataset):
    """Item i: what the model needs of catalog slide ``indices[i]`` (thumbnail, valid cells, overview), prepared
    in a DataLoader worker while the model runs on earlier slides, with the time each step took.

    A slide that cannot be prepared yields a :class:`PreparedSlide` with its ``error`` instead of raising: one bad
    slide never stops a batch run.
    """

    def __init__(self, catalog: SlideCatalog, indices: Sequence[int], overview: bool = True) -> None:
        self.catalog = catalog
        self.indices = list(indices)
        self.overview = overview

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, item: int) -> PreparedSlide:
        i = self.indices[item]
        timer = Timer()
        try:
            start = time.perf_counter()
            shapes = _shapes(self.catalog, i)
            timer.add("open", start)
            thumbnail = self.catalog.thumbnail(i, timer)
            overview = None
            if self.overview or self.catalog.tissue is not None:
                overview = self.catalog.overview(i, timer)
            mask, valid = self.catalog.tissue_and_valid(i, timer, overview)
        except Exception as err:  # reported per slide by the caller
            return PreparedSlide(i, error=describe_error(err))
        item_ = SlideItem.from_arrays(thumbnail, valid, i, shapes)
        return PreparedSlide(i, item_, overview, mask, dict(timer.seconds))


def _unbatched(item: Any) -> Any:
    return item


def prepared_loader(dataset: PreparedSlides, num_workers: int, sampler: Sampler[int] | None = None) -> DataLoader:
    """Slides one at a time, prepared ahead by ``num_workers`` worker processes (0: in this process); ``sampler``
    (items in the order it yields them, drawn in this process as the loader needs more) defaults to every item."""
    return DataLoader(
        dataset,
        batch_size=None,
        shuffle=False,
        sampler=sampler,
        num_workers=num_workers,
        collate_fn=_unbatched,
        prefetch_factor=2 if num_workers > 0 else None,
    )


class ShapeBatchSampler(Sampler[list[int]]):
    """Batches of items whose grids have the same shapes (so attention maps stack), shuffled per epoch.

    In a data-parallel run each rank takes every ``world``-th batch of the epoch's one shuffled list (the same
    list on every rank: it depends only on the seed and the epoch), so the ranks' shards are disjoint and their
    union is the epoch. The list is padded by repeating its first batches to a multiple of the number of ranks,
    so that every rank takes the same number of steps (none waits forever at a collective); the repeats are at
    most ``world - 1`` batches (validation drops them when it gathers). The number of ranks is read when the
    batches are drawn, so a sampler made before the process group exists (as Lightning's launch does) shards
    correctly. ``num_replicas`` and ``rank`` override it."""

    def __init__(
        self,
        shapes: Sequence[tuple],
        batch_size: int,
        shuffle: bool,
        seed: int = 0,
        *,
        num_replicas: int | None = None,
        rank: int | None = None,
    ) -> None:
        self.groups: dict[tuple, list[int]] = defaultdict(list)
        for item, s in enumerate(shapes):
            self.groups[tuple(s)].append(item)
        self.batch_size = batch_size
        self.shuffle = shuffle
        self.seed = seed
        self.epoch = 0
        self.num_replicas = num_replicas
        self.rank = rank

    def set_epoch(self, epoch: int) -> None:
        """The epoch whose order to draw (Lightning calls it before every epoch, also after a resume)."""
        self.epoch = epoch

    def _world(self) -> tuple[int, int]:
        size, rank = world()
        return (self.num_replicas or size), (self.rank if self.rank is not None else rank)

    def epoch_batches(self) -> list[list[int]]:
        """The batches of the current epoch, all ranks together, in order (before sharding)."""
        rng = np.random.default_rng(self.seed + self.epoch)
        batches = []
        for items in self.groups.values():
            order = rng.permutation(items).tolist() if self.shuffle else list(items)
            batches += [order[i : i + self.batch_size] for i in range(0, len(order), self.batch_size)]
        if self.shuffle:
            batches = [batches[i] for i in rng.permutation(len(batches))]
        return batches

    def __iter__(self) -> Iterator[list[int]]:
        batches = self.epoch_batches()
        self.epoch += 1  # without set_epoch (a plain loop), the next pass draws a new order
        size, rank = self._world()
        if size > 1 and batches:
            padded = len(self) * size
            batches = [batches[i % len(batches)] for i in range(padded)][rank::size]
        return iter(batches)

    def __len__(self) -> int:
        n = sum(-(-len(v) // self.batch_size) for v in self.groups.values())
        size, _ = self._world()
        return -(-n // size)


def make_loader(
    dataset: ThumbnailDataset, batch_size: int, shuffle: bool, num_workers: int, seed: int = 0
) -> DataLoader:
    """A DataLoader over a thumbnail dataset with shape-homogeneous batches."""
    shapes = [dataset.shapes(i) for i in range(len(dataset))]
    sampler = ShapeBatchSampler(shapes, batch_size, shuffle, seed)
    return DataLoader(
        dataset,
        batch_sampler=sampler,
        num_workers=num_workers,
        persistent_workers=num_workers > 0,
        collate_fn=collate_slides,
    )


class CellReader:
    """Reads the patches of sampled cells of catalog slides, off the main thread (OpenSlide and NumPy release the
    GIL): the batch's cells are split into at most ``threads`` contiguous ranges, each read slide by slide with
    one batched ``read_regions`` call and converted to float in its worker, so that no Python work is done per
    patch on the main thread and no thread task is made per patch."""

    def __init__(self, catalog: SlideCatalog, threads: int = 8) -> None:
        self.catalog = catalog
        self.patch_size = catalog.patch_size
        self.threads = max(1, threads)
        self._pool = ThreadPoolExecutor(max_workers=self.threads, thread_name_prefix="loupe-read")
        self.seconds = 0.0
        """Wall time spent reading patches so far (for timing reports)."""
        self.patches = 0

    def __call__(self, slide_indices: Sequence[int], cells: Tensor) -> Tensor:
        """Patches (B, n, 3, p, p) float in [0, 1] of cells (B, n) of the given catalog slides."""
        start = time.perf_counter()
        try:
            return self._read(slide_indices, cells)
        finally:
            self.seconds += time.perf_counter() - start
            self.patches += cells.numel()

    def _read(self, slide_indices: Sequence[int], cells: Tensor) -> Tensor:
        p = self.patch_size
        cells_np = cells.detach().cpu().numpy()
        b, n = cells_np.shape
        # Channels-last memory (each pixel's RGB together, as read): no transposing copy, and the layout the
        # convolutions of the backbones run fastest on (oneDNN on CPU, cuDNN with AMP on GPU).
        out = torch.empty((b * n, p, p, 3), dtype=torch.float32)
        if b * n:
            slides = [int(i) for i in slide_indices]
            rects = np.concatenate([self.catalog.grid(i).cell_rects(cells_np[r]) for r, i in enumerate(slides)])
            readers = [self._reader(i) for i in slides]
            bounds = np.linspace(0, b * n, min(self.threads, b * n) + 1).round().astype(int)
            ranges = [(int(lo), int(hi)) for lo, hi in itertools.pairwise(bounds) if hi > lo]
            flat = out.numpy()
            if len(ranges) == 1:
                _read_range(readers, n, rects, flat, *ranges[0], p, slides)
            else:
                jobs = [self._pool.submit(_read_range, readers, n, rects, flat, lo, hi, p, slides) for lo, hi in ranges]
                for job in jobs:
                    job.result()
        return out.view(b, n, p, p, 3).permute(0, 1, 4, 2, 3)

    def _reader(self, i: int) -> Any:
        """Catalog slide i's reader; a slide that no longer opens raises a SlideReadError naming it."""
        try:
            return self.catalog.reader(i)
        except Exception as err:
            raise SlideReadError(describe_error(err), i) from err

    def close(self) -> None:
        self._pool.shutdown(wait=False)


def _read_range(
    readers: list, n: int, rects: np.ndarray, out: np.ndarray, lo: int, hi: int, p: int, slides: Sequence[int]
) -> None:
    """Read flat cells [lo, hi) (slide = index // n) into ``out`` (N, p, p, 3) as float in [0, 1], one call per
    slide; NumPy converts (it releases the GIL and, unlike torch ops, starts no thread pool inside the worker).
    A failing read raises a SlideReadError with the catalog index (``slides``) of its slide."""
    while lo < hi:
        slide = lo // n
        stop = min(hi, (slide + 1) * n)
        try:
            patches = readers[slide].read_regions(rects[lo:stop], (p, p))
        except Exception as err:  # a corrupt tile, a file truncated or replaced while in use
            raise SlideReadError(f"reading patches failed: {describe_error(err)}", slides[slide]) from err
        np.divide(patches, np.float32(255), out=out[lo:stop])
        lo = stop
