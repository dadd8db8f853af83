"""A seekable, read-only file over a byte-range fetcher: what tifffile reads of a slide named by URL.

Reads are served from memory when they can be, in this order: ranges held for a while (the tiles of the region
being read, fetched together by the reader), the header ranges remembered from an earlier open (the slide
cache's entry of what tifffile read while opening: a re-run opens the slide without a request), and cached
blocks of ``block`` bytes. What is missing is fetched with **one request per run of consecutive missing
blocks**: a 150 KB tile table is one request, not five made one after another, and a read of more than one block
fetches as many bytes again after it (TIFF writers put a tile table's byte counts right after its offsets). While
recording, every read's bytes are kept, so that what tifffile reads while opening can be stored with the slide's
cache entry.

The fetcher does the network (retries, timeouts, errors); this class only decides what to ask it for.
"""

from __future__ import annotations

import bisect
import io
import threading
from collections import OrderedDict
from collections.abc import Callable, Sequence
from typing import Any

#: Fetch byte ranges [(start, end), ...] (end exclusive), one bytes object per range, each exactly its length.
Fetch = Callable[[list[tuple[int, int]]], list[bytes]]


def merge_ranges(reads: Sequence[tuple[int, bytes]]) -> list[tuple[int, bytes]]:
    """``reads`` (start, bytes), sorted and merged where they touch or overlap (same bytes at the same offsets)."""
    merged: list[tuple[int, bytearray]] = []
    for start, data in sorted(reads, key=lambda r: r[0]):
        if merged and start <= merged[-1][0] + len(merged[-1][1]):
            first, buf = merged[-1]
            tail = start + len(data) - (first + len(buf))
            if tail > 0:
                buf += data[len(data) - tail :]
        else:
            merged.append((start, bytearray(data)))
    return [(start, bytes(buf)) for start, buf in merged]


class RangeFile(io.RawIOBase):
    """The ``size`` bytes that ``fetch`` reads, as a seekable binary file (see the module's docstring)."""

    def __init__(self, fetch: Fetch, size: int, block: int, max_blocks: int, name: str = "") -> None:
        super().__init__()
        self._fetch, self._size, self._block, self._max_blocks = fetch, int(size), int(block), int(max_blocks)
        self.name = name
        self._position = 0
        self._blocks: OrderedDict[int, bytes] = OrderedDict()  # block index -> bytes, least recently used first
        self._held: dict[int, bytes] = {}  # start -> bytes, until released
        self._header_starts: list[int] = []  # sorted starts of the remembered header ranges
        self._header: list[bytes] = []
        self._recording: list[tuple[int, bytes]] | None = None
        self._lock = threading.Lock()
        self.requests = 0  # fetch calls made (each one request per range, the ranges in parallel)

    @property
    def size(self) -> int:
        return self._size

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def seek(self, offset: int, whence: int = 0) -> int:
        base = {0: 0, 1: self._position, 2: self._size}[whence]
        self._position = max(0, base + int(offset))
        return self._position

    def tell(self) -> int:
        return self._position

    def hold(self, ranges: dict[int, bytes]) -> None:
        """Serve reads inside these byte ranges (start: bytes) from memory until :meth:`release`."""
        with self._lock:
            self._held.update(ranges)

    def release(self, starts: list[int]) -> None:
        with self._lock:
            for start in starts:
                self._held.pop(start, None)

    def remember(self, ranges: Sequence[tuple[int, bytes]]) -> None:
        """Serve reads inside these ranges from memory for as long as the file is open (a cached header)."""
        merged = merge_ranges(ranges)
        with self._lock:
            self._header_starts = [start for start, _ in merged]
            self._header = [data for _, data in merged]

    def record(self) -> None:
        """Keep the bytes of every read from now on, until :meth:`recorded`."""
        self._recording = []

    def recorded(self) -> list[tuple[int, bytes]]:
        """The ranges read since :meth:`record` (merged), and recording stops."""
        reads, self._recording = self._recording or [], None
        return merge_ranges(reads)

    def _in_memory(self, start: int, end: int) -> bytes | None:
        with self._lock:
            for begin, data in self._held.items():
                if begin <= start and end <= begin + len(data):
                    return data[start - begin : end - begin]
            i = bisect.bisect_right(self._header_starts, start) - 1
            if i >= 0 and end <= self._header_starts[i] + len(self._header[i]):
                begin = self._header_starts[i]
                return self._header[i][start - begin : end - begin]
        return None

    def covered(self, start: int, end: int) -> bool:
        """Whether bytes [start, end) would be read without a request."""
        if self._in_memory(start, end) is not None:
            return True
        with self._lock:
            return all(b in self._blocks for b in range(start // self._block, (end - 1) // self._block + 1))

    def _from_blocks(self, start: int, end: int) -> bytes:
        size = self._block
        first, last = start // size, (end - 1) // size
        with self._lock:
            have = {b: self._blocks[b] for b in range(first, last + 1) if b in self._blocks}
            for b in have:
                self._blocks.move_to_end(b)
        missing = [b for b in range(first, last + 1) if b not in have]
        if missing:
            runs: list[list[int]] = []
            for b in missing:
                if runs and b == runs[-1][1] + 1:
                    runs[-1][1] = b
                else:
                    runs.append([b, b])
            if end - start > size:  # a table (tile offsets): its twin (the byte counts) usually follows it
                ahead = min((end + (end - start) - 1) // size, (self._size - 1) // size)
                while runs[-1][1] < ahead and runs[-1][1] + 1 not in self._blocks:
                    runs[-1][1] += 1
            spans = [(a * size, min((z + 1) * size, self._size)) for a, z in runs]
            self.requests += 1
            blobs = self._fetch(spans)
            with self._lock:
                for (a, z), blob in zip(runs, blobs, strict=True):
                    for b in range(a, z + 1):
                        have[b] = self._blocks[b] = blob[(b - a) * size : (b - a + 1) * size]
                while len(self._blocks) > self._max_blocks:
                    self._blocks.popitem(last=False)
        joined = b"".join(have[b] for b in range(first, last + 1))
        return joined[start - first * size : end - first * size]

    def read(self, size: int | None = -1) -> bytes:
        start = self._position
        end = self._size if size is None or size < 0 else min(start + size, self._size)
        if end <= start:
            return b""
        data = self._in_memory(start, end)
        if data is None:
            data = self._from_blocks(start, end)
        self._position = end
        if self._recording is not None:
            self._recording.append((start, data))
        return data

    def readinto(self, buffer: Any) -> int:
        view = memoryview(buffer).cast("B")
        data = self.read(len(view))
        view[: len(data)] = data
        return len(data)

    def close(self) -> None:
        with self._lock:
            self._blocks.clear()
            self._held.clear()
            self._header_starts, self._header = [], []
        super().close()
