"""RangeFile: what it asks its fetcher for (one request per run of missing blocks), and what it serves from memory."""

from __future__ import annotations

import io

import pytest

from loupe.slides.range_file import RangeFile, merge_ranges

DATA = bytes(range(256)) * 64  # 16 KiB


class Fetcher:
    def __init__(self) -> None:
        self.calls: list[list[tuple[int, int]]] = []

    def __call__(self, spans: list[tuple[int, int]]) -> list[bytes]:
        self.calls.append(spans)
        return [DATA[a:b] for a, b in spans]


def test_reads_equal_the_bytes_and_missing_blocks_are_one_request_per_run():
    fetch = Fetcher()
    f = RangeFile(fetch, len(DATA), block=1024, max_blocks=64)
    f.seek(100)
    assert f.read(10) == DATA[100:110] and fetch.calls == [[(0, 1024)]]
    f.seek(1500)
    assert f.read(3000) == DATA[1500:4500]  # blocks 1-4 in one range, and as many bytes again read ahead
    assert fetch.calls[1] == [(1024, 8192)]
    f.seek(5000)
    assert f.read(100) == DATA[5000:5100] and len(fetch.calls) == 2  # read ahead: no request
    f.seek(-10, io.SEEK_END)
    assert f.read() == DATA[-10:] and f.read(5) == b""


def test_held_and_remembered_ranges_are_served_without_a_request():
    fetch = Fetcher()
    f = RangeFile(fetch, len(DATA), block=1024, max_blocks=64)
    f.hold({3000: DATA[3000:3500]})
    f.remember([(10, DATA[10:20]), (18, DATA[18:40]), (9000, DATA[9000:9100])])
    for start, size in ((3100, 200), (12, 25), (9050, 50)):
        f.seek(start)
        assert f.read(size) == DATA[start : start + size]
    assert fetch.calls == [] and f.covered(3000, 3500) and not f.covered(5000, 5001)
    f.release([3000])
    f.seek(3100)
    assert f.read(10) == DATA[3100:3110] and len(fetch.calls) == 1


def test_recorded_reads_are_merged_and_serve_a_second_file_alone():
    f = RangeFile(Fetcher(), len(DATA), block=1024, max_blocks=2)
    f.record()
    for start, size in ((0, 8), (8, 100), (5000, 40), (20, 10)):
        f.seek(start)
        f.read(size)
    recorded = f.recorded()
    assert [(s, len(d)) for s, d in recorded] == [(0, 108), (5000, 40)]
    again = RangeFile(Fetcher(), len(DATA), block=1024, max_blocks=2)
    again.remember(recorded)
    again.seek(5010)
    assert again.read(30) == DATA[5010:5040]


def test_a_failing_fetch_raises_and_caches_nothing():
    def fail(spans: list[tuple[int, int]]) -> list[bytes]:
        raise ConnectionError("gone")

    f = RangeFile(fail, len(DATA), block=1024, max_blocks=4)
    with pytest.raises(ConnectionError):
        f.read(10)
    assert not f.covered(0, 10)


def test_merge_ranges_keeps_gaps():
    assert merge_ranges([(5, b"bc"), (0, b"a"), (4, b"abc")]) == [(0, b"a"), (4, b"abc")]
