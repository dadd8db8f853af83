"""A set of slides with their grids, checked up front and opened lazily once per process."""

from __future__ import annotations

import json
import logging
import os
import threading
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import TypeVar

import numpy as np

from loupe.atomic import write_text
from loupe.data.manifest import SlideRecord
from loupe.data.preparation import PrepSettings, SlideHeader, SlidePreparer, Timer
from loupe.errors import LoupeError, SlideError, SlideReadError
from loupe.models.interface import SlideBatch
from loupe.slides import Magnification, SlideGrid, SlideReader, open_slide
from loupe.slides.cache import SlideCache
from loupe.slides.tissue import TissueSettings

log = logging.getLogger("loupe")
T = TypeVar("T")


@dataclass(frozen=True)
class SlideProblem:
    """A slide that cannot be used, and why."""

    record: SlideRecord
    reason: str


#: The run folder's list of the slides training skipped (slide_id, path, reason, when).
SKIPPED_SLIDES_FILE = "skipped_slides.json"


@dataclass
class SlideFailures:
    """The slides a training run skips, and why: found unusable before training, or failing while it runs (a
    corrupt tile deep in level 0, a file truncated or replaced meanwhile). Each is warned about once and written
    to ``record`` (a JSON list, rewritten atomically) when set; once more than ``max_fraction`` of the ``total``
    slides failed, :meth:`add` raises a :class:`SlideError` listing them: the data, not one slide, is at fault."""

    records: Sequence[SlideRecord]
    """The catalog's records (indices refer to them)."""
    total: int
    """The slides the run uses (the fraction's denominator)."""
    max_fraction: float
    record: Path | None = None
    failed: dict[int, dict[str, str]] = field(default_factory=dict)

    def __contains__(self, index: int) -> bool:
        return index in self.failed

    def add(self, index: int, reason: str, when: str, check: bool = True) -> None:
        """Count catalog slide ``index`` as failed (once); with ``check``, raise when too many have."""
        if index in self.failed:
            return
        rec = self.records[index]
        self.failed[index] = {"slide_id": rec.slide_id, "path": str(rec.path), "reason": reason, "when": when}
        log.warning("skipping slide %s (%s): %s", rec.slide_id, when, reason)
        self.save()
        if check:
            self.check()

    def check(self) -> None:
        """Raise a SlideError when more than ``max_fraction`` of the slides failed."""
        n = len(self.failed)
        if n and n > self.max_fraction * self.total:
            lines = "\n".join(f"  {v['slide_id']} ({v['path']}): {v['reason']}" for v in self.failed.values())
            raise SlideError(
                f"{n} of {self.total} slides cannot be read ({100 * n / self.total:.1f}%, more than "
                f"data.max_failed_fraction={self.max_fraction:g}):\n{lines}\nRepair or remove these slides (or "
                "raise data.max_failed_fraction to train without them)"
            )

    def save(self) -> None:
        """Write the list of skipped slides to ``record`` (when set)."""
        if self.record is not None:
            write_text(self.record, json.dumps(list(self.failed.values()), indent=2, ensure_ascii=False) + "\n")

    def keep(self, indices: Sequence[int]) -> list[int]:
        """``indices`` without the failed slides."""
        return [i for i in indices if i not in self.failed]


class SlideCatalog:
    """Records + grids + what is derived from each slide (through the cache); readers are opened on first use
    in each process (DataLoader workers included) and reused."""

    def __init__(
        self,
        records: Sequence[SlideRecord],
        magnifications: Sequence[Magnification],
        patch_size: int,
        backend: str = "auto",
        slide_mpp: float | None = None,
        thumbnail_size: Sequence[int] = (96, 96),
        tissue: TissueSettings | None = None,
        cache: SlideCache | None = None,
    ) -> None:
        self.records = tuple(records)
        self.magnifications = tuple(magnifications)
        self.patch_size = patch_size
        self.backend = backend
        self.slide_mpp = slide_mpp
        if len(thumbnail_size) != 2:
            raise LoupeError(f"thumbnail_size must be (width, height), got {tuple(thumbnail_size)!r}")
        thumb_wh = (int(thumbnail_size[0]), int(thumbnail_size[1]))
        self.preparer = SlidePreparer(PrepSettings(self.magnifications, patch_size, thumb_wh, backend, tissue), cache)
        self.grids: list[SlideGrid | None] = [None] * len(self.records)
        self._readers: dict[int, SlideReader] = {}
        self.max_open = 256
        self._pid = os.getpid()
        self._lock = threading.Lock()

    def __len__(self) -> int:
        return len(self.records)

    def __getstate__(self) -> dict:
        state = self.__dict__.copy()
        state["_readers"] = {}
        state["_lock"] = None
        return state

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        self._lock = threading.Lock()
        self._pid = -1

    def mpp_of(self, i: int) -> dict[str, float | None]:
        """How slide i's µm/px is decided: the manifest's mpp column overrides the file; the run-wide
        ``slide_mpp`` only fills in for a file that records none."""
        return {"override": self.records[i].mpp, "fallback": self.slide_mpp}

    def reader(self, i: int) -> SlideReader:
        """The open reader of slide i in this process (at most ``max_open`` stay open: least recently used
        ones are closed, so a run over thousands of slides does not exhaust file handles)."""
        with self._lock:
            if self._pid != os.getpid():
                self._readers = {}
                self._pid = os.getpid()
            r = self._readers.pop(i, None)
            if r is not None:
                self._readers[i] = r  # most recently used last
                return r
        rec = self.records[i]
        cache = self.preparer.cache  # a slide named by URL keeps its header's bytes there
        r = open_slide(rec.path, backend=self.backend, mpp=rec.mpp, cache=cache)
        if rec.mpp is None and r.file_mpp is None and self.slide_mpp is not None:
            r.close()
            r = open_slide(rec.path, backend=self.backend, mpp=self.slide_mpp, cache=cache)
        with self._lock:
            if i in self._readers:  # another thread opened it meanwhile
                r.close()
                return self._readers[i]
            self._readers[i] = r
            while len(self._readers) > self.max_open:
                oldest = next(iter(self._readers))
                self._readers.pop(oldest).close()
            return r

    @property
    def tissue(self) -> TissueSettings | None:
        return self.preparer.settings.tissue

    def header(self, i: int) -> SlideHeader:
        """Slide i's level-0 size and µm/px (cached: no need to open the slide on a re-run)."""
        return self.preparer.header(self.records[i].path, self.mpp_of(i), lambda: self.reader(i))

    def grid(self, i: int) -> SlideGrid:
        """Slide i's grid of cells at every magnification."""
        g = self.grids[i]
        if g is None:
            g = self.preparer.grid(self.header(i), self.records[i].path)
            self.grids[i] = g
        return g

    def thumbnail(self, i: int, timer: Timer | None = None) -> np.ndarray:
        """Slide i's model thumbnail (h, w, 3) uint8."""
        return self.preparer.thumbnail(self.records[i].path, lambda: self.reader(i), timer)

    def overview(self, i: int, timer: Timer | None = None) -> np.ndarray:
        """Slide i's overview image (tissue detection, overlays)."""
        return self.preparer.overview(self.records[i].path, self.grid(i), lambda: self.reader(i), timer)

    def tissue_and_valid(
        self, i: int, timer: Timer | None = None, overview: np.ndarray | None = None
    ) -> tuple[np.ndarray | None, np.ndarray]:
        """Slide i's tissue mask (None when detection is off) and valid cells (N,) bool."""
        return self.preparer.tissue(self.records[i].path, self.grid(i), lambda: self.reader(i), timer, overview)

    def valid(self, i: int, timer: Timer | None = None) -> np.ndarray:
        """Slide i's valid cells (N,) bool: tissue cells, or all cells when detection is off."""
        return self.tissue_and_valid(i, timer)[1]

    def _problem(self, i: int, thumbnail: bool = False) -> SlideProblem | None:
        rec = self.records[i]
        try:
            self.grid(i)
            if self.tissue is not None:
                self.valid(i)
            if thumbnail:
                self.thumbnail(i)
        except LoupeError as err:
            return SlideProblem(rec, str(err))
        except Exception as err:  # a backend failing in an unforeseen way must not hide the other slides
            return SlideProblem(rec, f"{type(err).__name__}: {err}")
        return None

    def check(self, threads: int = 8, thumbnails: bool = False) -> list[SlideProblem]:
        """Open every slide, build its grid (and tissue mask; with ``thumbnails``, its thumbnail); return the ones
        that fail (unreadable, no µm/px, too small, no tissue). Slides are checked concurrently; results fill the
        cache for later epochs."""
        if threads <= 1 or len(self.records) <= 1:
            found = [self._problem(i, thumbnails) for i in range(len(self.records))]
        else:
            # The first slide alone: its reader's lazy imports happen in this thread. Several threads importing
            # (compiling) one module at once can fail in CPython 3.11 ("SystemError: AST constructor recursion
            # depth mismatch"), seen here on a fresh cache with PYTHONDONTWRITEBYTECODE set.
            found = [self._problem(0, thumbnails)]
            with ThreadPoolExecutor(max_workers=threads, thread_name_prefix="loupe-check") as pool:
                found += list(pool.map(lambda i: self._problem(i, thumbnails), range(1, len(self.records))))
        return [p for p in found if p is not None]

    def require_all(self) -> None:
        """Raise one error listing every unusable slide (before any training starts)."""
        problems = self.check()
        if problems:
            lines = "\n".join(f"  {p.record.slide_id} ({p.record.path}): {p.reason}" for p in problems)
            raise SlideError(f"{len(problems)} of {len(self.records)} slides cannot be used:\n{lines}")

    def close(self) -> None:
        with self._lock:
            for r in self._readers.values():
                r.close()
            self._readers = {}


def run_dropping_failed(
    batch: SlideBatch, run: Callable[[SlideBatch], T], failures: SlideFailures | None, when: str
) -> tuple[SlideBatch, T] | None:
    """``run(batch)`` without the slides that fail to read: a slide whose patches cannot be read (a
    :class:`SlideReadError`) is counted in ``failures`` and dropped from the batch, and the rest run again; slides
    that failed before are dropped first. None when no slide of the batch is left (the caller then takes a step
    that changes nothing, so that the ranks of a distributed run stay in step). Without ``failures`` it is
    ``run(batch)``."""
    if failures is None:
        return batch, run(batch)
    while True:
        keep = [b for b, i in enumerate(batch.slides) if i not in failures]
        if not keep:
            return None
        if len(keep) < len(batch):
            batch = batch.select(keep)
        try:
            return batch, run(batch)
        except SlideReadError as err:
            if err.index not in batch.slides:
                raise
            failures.add(err.index, str(err), when)
