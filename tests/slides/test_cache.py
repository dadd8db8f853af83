"""The per-slide disk cache: keyed by file identity and parameters, atomic, never stale."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from loupe.slides.cache import SlideCache, cache_key, default_cache_dir


class Counter:
    def __init__(self, value: float = 1.0) -> None:
        self.calls = 0
        self.value = value

    def __call__(self) -> dict[str, np.ndarray]:
        self.calls += 1
        return {"a": np.full((2, 3), self.value), "b": np.arange(4)}


def _slide(tmp_path: Path, name: str = "s.tif", content: bytes = b"slide") -> Path:
    p = tmp_path / name
    p.write_bytes(content)
    return p


def test_a_second_get_reads_the_stored_arrays(tmp_path):
    cache, slide, compute = SlideCache(tmp_path / "c"), _slide(tmp_path), Counter()
    first, hit1 = cache.get("thumb", slide, {"size": [4, 4]}, compute)
    second, hit2 = cache.get("thumb", slide, {"size": [4, 4]}, compute)
    assert (hit1, hit2, compute.calls) == (False, True, 1)
    assert np.array_equal(first["a"], second["a"]) and np.array_equal(second["b"], np.arange(4))
    files = [f for f in (tmp_path / "c").rglob("*") if f.is_file()]
    assert len(files) == 1 and files[0].suffix == ".npz"  # the entry, and no temporary file left behind


def test_an_entry_that_cannot_be_written_is_skipped(tmp_path, monkeypatch):
    cache, slide, compute = SlideCache(tmp_path / "c"), _slide(tmp_path), Counter()

    def disk_full(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(np, "savez", disk_full)
    arrays, hit = cache.get("thumb", slide, {}, compute)
    assert not hit and np.array_equal(arrays["b"], np.arange(4))
    assert not [f for f in (tmp_path / "c").rglob("*") if f.is_file()]  # no entry, no temporary file


def test_a_changed_parameter_kind_or_file_makes_a_new_entry(tmp_path):
    cache, slide, compute = SlideCache(tmp_path / "c"), _slide(tmp_path), Counter()
    cache.get("thumb", slide, {"size": [4, 4]}, compute)
    cache.get("thumb", slide, {"size": [4, 5]}, compute)  # parameter
    cache.get("overview", slide, {"size": [4, 4]}, compute)  # kind
    assert compute.calls == 3
    # The same path rewritten (new size and mtime) must not read the old entry.
    slide.write_bytes(b"another slide, longer")
    os.utime(slide, ns=(1, 2_000_000_000))
    _, hit = cache.get("thumb", slide, {"size": [4, 4]}, Counter(7.0))
    assert not hit
    again, hit = cache.get("thumb", slide, {"size": [4, 4]}, compute)
    assert hit and float(again["a"][0, 0]) == 7.0


def test_keys_depend_on_the_resolved_path_and_parameter_values(tmp_path, monkeypatch):
    a, b = _slide(tmp_path, "a.tif"), _slide(tmp_path, "b.tif")
    assert cache_key("k", a, {"x": 1}) != cache_key("k", b, {"x": 1})
    assert cache_key("k", a, {"x": 1}) != cache_key("k", a, {"x": 2})
    assert cache_key("k", a, {"x": 1, "y": 2}) == cache_key("k", a, {"y": 2, "x": 1})
    monkeypatch.chdir(tmp_path)
    assert cache_key("k", "a.tif", {"x": 1}) == cache_key("k", a, {"x": 1})


def test_a_corrupt_entry_is_recomputed_and_a_disabled_cache_stores_nothing(tmp_path):
    cache, slide, compute = SlideCache(tmp_path / "c"), _slide(tmp_path), Counter()
    cache.get("thumb", slide, {}, compute)
    (entry,) = (tmp_path / "c").rglob("*.npz")
    entry.write_bytes(b"garbage")
    _, hit = cache.get("thumb", slide, {}, compute)
    assert not hit and compute.calls == 2
    off = SlideCache(tmp_path / "off", enabled=False)
    off.get("thumb", slide, {}, compute)
    off.get("thumb", slide, {}, compute)
    assert compute.calls == 4 and not (tmp_path / "off").exists()


def test_a_missing_slide_is_computed_without_caching(tmp_path):
    cache = SlideCache(tmp_path / "c")
    compute = Counter()
    _, hit = cache.get("thumb", tmp_path / "gone.svs", {}, compute)
    assert not hit and compute.calls == 1 and not (tmp_path / "c").exists()


def test_folders_are_identified_by_their_files(tmp_path):
    folder = tmp_path / "dicom"
    folder.mkdir()
    (folder / "1.dcm").write_bytes(b"x")
    key = cache_key("k", folder, {})
    (folder / "2.dcm").write_bytes(b"y")
    assert cache_key("k", folder, {}) != key


def test_default_folder_follows_the_environment(tmp_path, monkeypatch):
    monkeypatch.setenv("LOUPE_CACHE_DIR", str(tmp_path / "here"))
    assert default_cache_dir() == tmp_path / "here"
    monkeypatch.delenv("LOUPE_CACHE_DIR")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert default_cache_dir() == tmp_path / "xdg" / "loupe"


# Stores one entry over and over: each write holds arrays filled with this writer's own value (a few MB, so that a
# write takes long enough for a reader to meet it half done if it could).
WRITER = """
import sys, time
import numpy as np
from loupe.slides.cache import SlideCache
root, slide, value, seconds = sys.argv[1], sys.argv[2], int(sys.argv[3]), float(sys.argv[4])
cache = SlideCache(root)
arrays = {"thumbnail": np.full((1024, 1024, 3), value, np.uint8), "valid": np.full(4096, value, np.int64)}
end, writes = time.time() + seconds, 0
while time.time() < end:
    cache.store("thumbnail", slide, {"size": 8}, arrays)
    writes += 1
print(writes)
"""


def test_two_processes_writing_one_entry_never_leave_a_torn_one(tmp_path):
    import subprocess
    import sys
    import time

    slide = _slide(tmp_path)
    root = tmp_path / "c"
    writers = [
        subprocess.Popen(
            [sys.executable, "-c", WRITER, str(root), str(slide), str(value), "2.0"], stdout=subprocess.PIPE, text=True
        )
        for value in (1, 2)
    ]
    cache = SlideCache(root)
    loads, misses_after_first, seen = 0, 0, set()
    while any(w.poll() is None for w in writers):
        entry = cache.load("thumbnail", slide, {"size": 8})
        if entry is None:
            misses_after_first += bool(seen)  # once written, the entry is always there, old or new
            time.sleep(0.001)
            continue
        loads += 1
        values = {int(v) for v in np.unique(entry["thumbnail"])} | {int(v) for v in np.unique(entry["valid"])}
        assert entry["thumbnail"].shape == (1024, 1024, 3) and entry["valid"].shape == (4096,)
        assert len(values) == 1, values  # one writer's arrays, never a mix
        seen |= values
    writes = [int(w.communicate()[0]) for w in writers]
    assert all(w.returncode == 0 for w in writers) and min(writes) >= 2
    assert loads >= 5 and misses_after_first == 0
    assert seen <= {1, 2}
    files = [f for f in root.rglob("*") if f.is_file()]
    assert len(files) == 1 and files[0].suffix == ".npz"  # no temporary file left behind


def test_npz_entries_are_read_one_header_at_a_time_from_many_threads(tmp_path, monkeypatch):
    """NumPy parses .npz headers with ast.literal_eval, which CPython 3.11.7 can fail when two threads construct
    ASTs at once (a slide was skipped in CI for it): read_npz never lets two headers be parsed together."""
    import ast
    import threading
    import time
    from concurrent.futures import ThreadPoolExecutor

    from loupe.slides.cache import read_npz

    files = []
    for i in range(8):
        f = tmp_path / f"e{i}.npz"
        np.savez(f, a=np.full(3, i), b=np.zeros((2, 2)))
        files.append(f)
    inside, most = 0, 0
    count = threading.Lock()
    parse = ast.literal_eval

    def watched(source):  # widens the window two unguarded threads would share
        nonlocal inside, most
        with count:
            inside += 1
            most = max(most, inside)
        time.sleep(0.005)
        try:
            return parse(source)
        finally:
            with count:
                inside -= 1

    monkeypatch.setattr(ast, "literal_eval", watched)
    with ThreadPoolExecutor(8) as pool:
        read = list(pool.map(read_npz, files * 4))
    assert most == 1
    assert [int(r["a"][0]) for r in read] == list(range(8)) * 4
