"""A per-slide disk cache of derived arrays (thumbnail, overview, tissue mask, slide header).

Each entry is keyed by the slide file's identity (resolved path, size, modification time; for a slide named by URL,
the URL without credentials and the object's ETag or Last-Modified and size) and every parameter
that produced it, hashed together: a changed parameter or a rewritten file gives a new key, so a stale entry is
never read. Entries are single ``.npz`` files written atomically (:mod:`loupe.atomic`: a temporary file of a
unique name, then rename), so concurrent DataLoader workers, several prediction workers preparing the same slide
(on one machine or sharing the cache folder over NFS) or an interrupted run cannot leave a half-written entry
behind: two writers of one entry each rename a complete file, and the last one stays (both hold the same arrays).
A reader sees the old entry, the new one or none; an entry missing or unreadable when read is computed again.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import threading
import zipfile
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import numpy as np

from loupe.atomic import atomic_write
from loupe.slides.remote import remote_identity
from loupe.slides.urls import SlideURL, as_source

log = logging.getLogger("loupe")

#: Bump when the content of an entry kind changes meaning, so old entries are ignored.
CACHE_VERSION = 1

ENV_VAR = "LOUPE_CACHE_DIR"

#: One reader of ``.npz`` headers at a time in this process. NumPy parses each member's header with
#: ``ast.literal_eval``, and CPython 3.11 (3.11.7 here; cpython#106905) can fail two concurrent AST constructions
#: with a spurious ``SystemError: AST constructor recursion depth mismatch``: the catalog's and the loader's
#: read-ahead threads read cache entries at once, and a slide would be skipped for it. The entries are small, so
#: reading them one at a time costs nothing measurable.
_NPZ_LOCK = threading.Lock()


def read_npz(path: str | Path) -> dict[str, np.ndarray]:
    """Every array of an ``.npz`` file (no pickles), safe to call from many threads at once."""
    with _NPZ_LOCK, np.load(path, allow_pickle=False) as data:
        return {name: data[name] for name in data.files}


def default_cache_dir() -> Path:
    """``$LOUPE_CACHE_DIR``, else ``$XDG_CACHE_HOME/loupe``, else ``~/.cache/loupe``."""
    if os.environ.get(ENV_VAR):
        return Path(os.path.expanduser(os.environ[ENV_VAR]))
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(os.path.expanduser(base)) / "loupe"


def file_identity(path: str | Path | SlideURL) -> dict[str, Any]:
    """What identifies a slide's content cheaply: resolved path, size and mtime (of every file, for a folder);
    for a URL, the URL without credentials and the object's ETag (or Last-Modified and size)."""
    url = as_source(path)
    if url is not None:
        return remote_identity(url)
    assert not isinstance(path, SlideURL)
    p = Path(os.path.expanduser(path)).resolve()
    if p.is_dir():  # DICOM: a folder of files
        files = sorted(f for f in p.iterdir() if f.is_file())
        stats = [(f.name, f.stat().st_size, f.stat().st_mtime_ns) for f in files]
        return {"path": str(p), "files": stats}
    st = p.stat()
    return {"path": str(p), "size": st.st_size, "mtime_ns": st.st_mtime_ns}


def cache_key(kind: str, path: str | Path | SlideURL, params: Mapping[str, Any]) -> str:
    """The hex key of entry ``kind`` of a slide made with ``params`` (JSON-serialisable values)."""
    payload = {"version": CACHE_VERSION, "kind": kind, "file": file_identity(path), "params": dict(params)}
    text = json.dumps(payload, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:32]


class SlideCache:
    """Keyed ``.npz`` entries under one folder; ``enabled=False`` computes every time and stores nothing."""

    def __init__(self, root: str | Path | None = None, enabled: bool = True) -> None:
        self.root = Path(os.path.expanduser(root)) if root else default_cache_dir()
        self.enabled = enabled
        self._warned = False

    def _entry(self, kind: str, key: str) -> Path:
        return self.root / kind / key[:2] / f"{key}.npz"

    def _key(self, kind: str, path: str | Path | SlideURL, params: Mapping[str, Any]) -> Path | None:
        """The entry file, or None when caching is off or the slide cannot be stat'ed (then nothing is cached)."""
        if not self.enabled:
            return None
        try:
            return self._entry(kind, cache_key(kind, path, params))
        except OSError:
            return None

    def load(self, kind: str, path: str | Path | SlideURL, params: Mapping[str, Any]) -> dict[str, np.ndarray] | None:
        """The stored arrays of an entry, or None when absent (or unreadable: it is then recomputed)."""
        entry = self._key(kind, path, params)
        if entry is None:
            return None
        try:  # no existence check first: the entry may vanish or be replaced at any moment
            return read_npz(entry)
        except (OSError, ValueError, EOFError, zipfile.BadZipFile):
            return None

    def store(
        self, kind: str, path: str | Path | SlideURL, params: Mapping[str, Any], arrays: Mapping[str, np.ndarray]
    ) -> None:
        """Write an entry atomically; a cache that cannot be written is skipped, never fatal."""
        entry = self._key(kind, path, params)
        if entry is None:
            return
        # Any, not ndarray: np.savez's stub would match a dict of arrays against its allow_pickle: bool
        named: dict[str, Any] = {k: np.asarray(v) for k, v in arrays.items()}
        try:
            atomic_write(entry, lambda handle: np.savez(handle, **named))
        except OSError as err:
            if not self._warned:  # once per cache: a run over thousands of slides warns once, not per slide
                self._warned = True
                log.warning(
                    "cannot write the slide cache in %s (%s): continuing without it (set data.cache_dir, or "
                    "$LOUPE_CACHE_DIR, to a writable folder to cache thumbnails and masks)",
                    self.root, err.strerror or err,
                )  # fmt: skip

    def get(
        self,
        kind: str,
        path: str | Path | SlideURL,
        params: Mapping[str, Any],
        compute: Callable[[], Mapping[str, np.ndarray]],
    ) -> tuple[dict[str, np.ndarray], bool]:
        """The entry's arrays and whether they came from the cache; computed and stored on a miss."""
        hit = self.load(kind, path, params)
        if hit is not None:
            return hit, True
        arrays = {k: np.asarray(v) for k, v in compute().items()}
        self.store(kind, path, params, arrays)
        return arrays, False
