"""A set of slides with their grids, checked up front and opened lazily once per process."""

from __future__ import annotations

import os
import threading
from collections.abc import Sequence
from dataclasses import dataclass

from loupe.data.manifest import SlideRecord
from loupe.errors import LoupeError, SlideError
from loupe.slides import Magnification, SlideGrid, SlideReader, build_grid, open_slide


@dataclass(frozen=True)
class SlideProblem:
    """A slide that cannot be used, and why."""

    record: SlideRecord
    reason: str


class SlideCatalog:
    """Records + grids; readers are opened on first use in each process (DataLoader workers included)."""

    def __init__(
        self,
        records: Sequence[SlideRecord],
        magnifications: Sequence[Magnification],
        patch_size: int,
        backend: str = "auto",
        slide_mpp: float | None = None,
    ) -> None:
        self.records = tuple(records)
        self.magnifications = tuple(magnifications)
        self.patch_size = patch_size
        self.backend = backend
        self.slide_mpp = slide_mpp
        self.grids: list[SlideGrid | None] = [None] * len(self.records)
        self._readers: dict[int, SlideReader] = {}
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

    def mpp_of(self, i: int) -> float | None:
        """The µm/px to use for slide i: manifest column, else the run-wide override, else the file's."""
        rec = self.records[i]
        return rec.mpp if rec.mpp is not None else self.slide_mpp

    def reader(self, i: int) -> SlideReader:
        """The open reader of slide i in this process."""
        with self._lock:
            if self._pid != os.getpid():
                self._readers = {}
                self._pid = os.getpid()
            r = self._readers.get(i)
            if r is None:
                r = open_slide(self.records[i].path, backend=self.backend, mpp=self.mpp_of(i))
                self._readers[i] = r
            return r

    def grid(self, i: int) -> SlideGrid:
        """Slide i's grid of cells at every magnification."""
        g = self.grids[i]
        if g is None:
            r = self.reader(i)
            g = build_grid(r.dimensions, r.mpp, self.magnifications, self.patch_size, self.records[i].path)
            self.grids[i] = g
        return g

    def check(self) -> list[SlideProblem]:
        """Open every slide and build its grid; return the ones that fail (unreadable, no µm/px, too small)."""
        problems = []
        for i, rec in enumerate(self.records):
            try:
                self.grid(i)
            except LoupeError as err:
                problems.append(SlideProblem(rec, str(err)))
            except Exception as err:  # a backend failing in an unforeseen way must not hide the other slides
                problems.append(SlideProblem(rec, f"{type(err).__name__}: {err}"))
        return problems

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
