"""A disk cache of patch embeddings of a frozen encoder: an epoch embeds only cells never embedded before, and
evaluate and predict reuse what training embedded.

Keys. An embedding depends on the slide file (path, size, mtime), how a cell is cut from it (magnifications, cell
size, µm/px, backend) and the encoder's exact weights: the encoder key is a hash of the frozen network's state (its
class and every tensor's bytes), so a changed encoder, weights file or seed never reads a stale embedding.

Layout. ``ROOT/<encoder key>/<slide key>/chunk-<uuid>.npz`` holds (cells, features) written atomically, one folder
per slide and magnification with the cells numbered within that magnification's grid: a cell's embedding does not
depend on which other magnifications a model reads, so the joint model, each single magnification and gated MIL at
one of them share it (a cross-validation embeds each cell once for every method). Many processes can add chunks to
one folder at once without locks. When a slide has many chunks, a process merges the
ones it sees into one and removes them (a reader that misses a removed chunk re-lists the folder).
"""

from __future__ import annotations

import hashlib
import logging
import uuid
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import Tensor, nn

from loupe.atomic import atomic_write
from loupe.data.catalog import SlideCatalog
from loupe.slides.cache import cache_key, default_cache_dir, read_npz
from loupe.slides.magnification import parse_magnification

log = logging.getLogger("loupe")

#: Merge a slide's chunks into one when it has more than this many.
MAX_CHUNKS = 16
#: Slides whose embeddings are held in memory at once (least recently used ones are dropped).
MEMORY_SLIDES = 256


def encoder_key(net: nn.Module) -> str:
    """A hash of a network's class and exact state (every parameter and buffer, bytes and shapes)."""
    digest = hashlib.sha256(type(net).__qualname__.encode())
    for name, tensor in sorted(net.state_dict().items()):
        digest.update(name.encode())
        digest.update(str(tuple(tensor.shape)).encode() + str(tensor.dtype).encode())
        digest.update(tensor.detach().to("cpu").contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()[:32]


@dataclass
class _Slide:
    """The embedded cells of one slide (sorted) and their features, plus the chunk files they came from."""

    cells: np.ndarray  # (n,) int64, sorted
    features: np.ndarray  # (n, D) float32
    files: frozenset[str]


class EmbeddingCache:
    """Per-slide embeddings of catalog slides by one frozen encoder (``key`` from :func:`encoder_key`)."""

    def __init__(self, catalog: SlideCatalog, key: str, root: str | Path | None = None) -> None:
        self.catalog = catalog
        self.key = key
        self.root = (Path(root).expanduser() if root else default_cache_dir() / "embeddings") / key
        self.enabled = True
        self._memory: OrderedDict[tuple[int, int], _Slide] = OrderedDict()
        self.embedded = 0
        """Cells embedded (not found in the cache) by this process."""
        self.reused = 0
        """Cells whose embedding came from the cache in this process."""

    def folder(self, i: int, j: int) -> Path:
        """The folder of slide i's cells at magnification j: keyed by its file and how those cells are cut."""
        cat = self.catalog
        m = cat.magnifications[j]
        if isinstance(m, str | float | int):  # a bare spec, as tests give it
            m = parse_magnification(m)
        params = {
            "magnification": {"mpp": m.mpp, "downsample": m.downsample},  # not its label: 20x is 20x by any name
            "cell_size": cat.patch_size,
            "mpp": cat.mpp_of(i),
            "backend": cat.backend,
        }
        return self.root / cache_key("embeddings", cat.records[i].path, params)

    # --- reading ----------------------------------------------------------------------------------------------
    def _split(self, i: int, cells: np.ndarray) -> list[tuple[int, np.ndarray, np.ndarray]]:
        """Flat cells of slide i as (magnification j, positions in ``cells``, cells within j's grid) per j."""
        grid = self.catalog.grid(i)
        starts = np.asarray(grid.offsets, dtype=np.int64)
        mag = np.searchsorted(starts, cells, side="right") - 1
        return [(int(j), np.flatnonzero(mag == j), cells[mag == j] - starts[j]) for j in np.unique(mag)]

    def _load(self, i: int, j: int) -> _Slide:
        folder = self.folder(i, j)
        for _ in range(3):  # a chunk merged away by another process between listing and reading: list again
            files = sorted(folder.glob("chunk-*.npz")) if folder.is_dir() else []
            try:
                parts = [read_npz(f) for f in files]
                cells = [p["cells"] for p in parts]
                feats = [p["features"] for p in parts]
            except FileNotFoundError:
                continue
            return _merge(cells, feats, frozenset(f.name for f in files))
        return _merge([], [], frozenset())

    def _slide(self, i: int, j: int) -> _Slide:
        found = self._memory.get((i, j))
        if found is None:
            found = self._load(i, j)
            self._memory[(i, j)] = found
            while len(self._memory) > MEMORY_SLIDES:
                self._memory.popitem(last=False)
        self._memory.move_to_end((i, j))
        return found

    def lookup(self, i: int, cells: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(found (n,) bool, features (n_found, D)) of slide i's (flat) ``cells``."""
        cells = np.asarray(cells, dtype=np.int64)
        found = np.zeros(len(cells), dtype=bool)
        rows: dict[int, np.ndarray] = {}
        for j, where, local in self._split(i, cells):
            entry = self._slide(i, j)
            if len(entry.cells) == 0:
                continue
            pos = np.clip(np.searchsorted(entry.cells, local), 0, len(entry.cells) - 1)
            hit = entry.cells[pos] == local
            found[where[hit]] = True
            rows.update(zip(where[hit].tolist(), entry.features[pos[hit]], strict=True))
        if not rows:
            return found, np.zeros((0, 0), dtype=np.float32)
        return found, np.stack([rows[n] for n in np.flatnonzero(found).tolist()])

    # --- writing ----------------------------------------------------------------------------------------------
    def store(self, i: int, cells: np.ndarray, features: np.ndarray) -> None:
        """Add slide i's embeddings of (flat) ``cells`` (new cells only); an unwritable cache turns itself off with
        one warning (the run goes on, embedding every time)."""
        for j, where, local in self._split(i, np.asarray(cells, dtype=np.int64)):
            self._store(i, j, local, np.ascontiguousarray(features[where]))

    def _store(self, i: int, j: int, cells: np.ndarray, features: np.ndarray) -> None:
        entry = self._slide(i, j)
        name = f"chunk-{uuid.uuid4().hex}.npz"
        if self.enabled:
            try:
                atomic_write(self.folder(i, j) / name, lambda h: np.savez(h, cells=cells, features=features))
            except OSError as err:
                self.enabled = False
                log.warning("embedding cache %s is not writable (%s): embedding without it", self.root, err)
        merged = _merge([entry.cells, cells], [entry.features, features], entry.files | {name})
        self._memory[(i, j)] = merged
        if self.enabled and len(merged.files) > MAX_CHUNKS:
            self._compact(i, j, merged)

    def _compact(self, i: int, j: int, entry: _Slide) -> None:
        folder = self.folder(i, j)
        name = f"chunk-{uuid.uuid4().hex}.npz"
        try:
            atomic_write(folder / name, lambda h: np.savez(h, cells=entry.cells, features=entry.features))
            for old in entry.files:
                (folder / old).unlink(missing_ok=True)
        except OSError:
            return
        self._memory[(i, j)] = _Slide(entry.cells, entry.features, frozenset({name}))

    # --- the model's view -------------------------------------------------------------------------------------
    def features(self, slides: Sequence[int], cells: Tensor, compute: Callable[[Tensor], Tensor]) -> Tensor:
        """Embeddings (B, n, D) of ``cells`` (B, n) of the batch's ``slides``: cached ones from the cache, the others
        by ``compute`` (cells (B, m) → embeddings (B, m, D), one call for the whole batch), then stored."""
        cells_np = cells.detach().cpu().numpy().astype(np.int64)
        b, n = cells_np.shape
        missing: list[np.ndarray] = []
        cached: list[tuple[np.ndarray, np.ndarray]] = []
        for row, i in enumerate(slides):
            found, feats = self.lookup(i, cells_np[row])
            cached.append((found, feats))
            missing.append(np.unique(cells_np[row][~found]))
        m = max((len(c) for c in missing), default=0)
        new: Tensor | None = None
        if m:
            # Rows are padded with a cell of their own (read again, dropped): one read and one forward per batch.
            padded = np.stack(
                [np.pad(c, (0, m - len(c)), mode="edge") if len(c) else np.full(m, cells_np[r, 0]) for r, c in
                 enumerate(missing)]
            )  # fmt: skip
            new = compute(torch.from_numpy(padded).to(cells.device))
        dim = int(new.shape[-1]) if new is not None else max(f.shape[-1] for _, f in cached if f.size)
        out = np.empty((b, n, dim), dtype=np.float32)
        new_np = new.detach().float().cpu().numpy() if new is not None else None
        for row, i in enumerate(slides):
            found, feats = cached[row]
            if found.any():
                out[row, found] = feats
            if (~found).any():
                assert new_np is not None
                own = missing[row]
                rows_new = new_np[row, : len(own)]
                out[row, ~found] = rows_new[np.searchsorted(own, cells_np[row][~found])]
                self.store(i, own, np.ascontiguousarray(rows_new))
                self.embedded += len(own)
            self.reused += int(found.sum())
        result = torch.from_numpy(out).to(cells.device)
        return result if new is None else result.to(new.dtype)

    # --- reports ----------------------------------------------------------------------------------------------
    def coverage(self, indices: Sequence[int]) -> dict[str, float | int | str]:
        """How much of the slides' valid cells has ever been embedded (from the files on disk)."""
        embedded = valid = 0
        for i in indices:
            embedded += sum(len(self._load(i, j).cells) for j in range(len(self.catalog.magnifications)))
            valid += int(np.count_nonzero(self.catalog.valid(i)))
        return {
            "encoder_key": self.key,
            "slides": len(indices),
            "cells_embedded": embedded,
            "valid_cells": valid,
            "fraction_embedded": embedded / valid if valid else 0.0,
        }


def _merge(cells: list[np.ndarray], feats: list[np.ndarray], files: frozenset[str]) -> _Slide:
    cells = [c for c in cells if len(c)]
    feats = [f for f in feats if len(f)]
    if not cells:
        return _Slide(np.zeros(0, dtype=np.int64), np.zeros((0, 0), dtype=np.float32), files)
    all_cells = np.concatenate(cells).astype(np.int64)
    all_feats = np.concatenate(feats).astype(np.float32)
    unique, first = np.unique(all_cells, return_index=True)
    return _Slide(unique, all_feats[first], files)
