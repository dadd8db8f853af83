"""Slides read over a network: TIFF-family slides by URL through fsspec + tiffslide (optional extra ``remote``).

Only what is read is fetched: tifffile parses the header (the IFDs and, per level read, its tile table), tiffslide
reads the tiles under each region, and fsspec fetches them as HTTP range requests (S3/GCS ranged GETs) on
reused connections. The header's reads go through a block cache (:data:`BLOCK_SIZE`; a read over several missing
blocks is one request) and, with a slide cache, are kept with the slide's entries, so the next open of the same
object asks the server nothing (:class:`RemoteTiffReader`). The object's identity for the slide cache is its URL
without credentials plus its ETag (or Last-Modified and size): :func:`remote_identity`, asked once per
:data:`IDENTITY_TTL_S` per process.

Faults: a server error (5xx, 429), a refused or dropped connection or a truncated response is retried with
exponential backoff (:func:`with_retries`, a bounded number of times); 404, 401/403 and other refusals fail at
once, and so does a server that stalls past the timeout (retrying it would only multiply the wait). Every failure
is one :class:`SlideError` naming the redacted URL and the status, so predict fails that slide alone.

Settings (environment, read when a slide is opened): ``LOUPE_REMOTE_TIMEOUT`` (seconds a read may wait for the
server before the slide fails, default 30), ``LOUPE_REMOTE_RETRIES`` (retries of a failed request, default 4,
backoff 0.25 s doubling) and ``LOUPE_REMOTE_BLOCK`` (bytes per block, default 32 KiB).
"""

from __future__ import annotations

import importlib
import logging
import os
import threading
import time
from collections.abc import Callable
from types import ModuleType
from typing import TYPE_CHECKING, Any, TypeVar

import numpy as np

from loupe.errors import ConfigError, SlideError
from loupe.slides.pyramid import PyramidReader
from loupe.slides.range_file import RangeFile
from loupe.slides.tiffslide_reader import TiffSlideReader
from loupe.slides.urls import REMOTE_TIFF_SUFFIXES, SlideURL, needs_local_file, redact_text

if TYPE_CHECKING:
    from loupe.slides.cache import SlideCache

log = logging.getLogger("loupe")

INSTALL_HINT = "pip install 'loupe[remote]'"

#: Bytes fetched per block of the read cache, which serves tifffile's header reads (IFDs, tile tables; the tiles
#: of a region are fetched apart, :meth:`RemoteTiffReader._read_level`). Measured on the 40000×30000 benchmark
#: slide: 32 KiB moves 0.7% of the file, 64 KiB 1.0%, 256 KiB 3.3% (benchmarks/remote_speed.py).
BLOCK_SIZE = 32 * 1024
#: Tiles of a region whose byte ranges are at most this far apart are fetched as one range request.
MERGE_GAP = 16 * 1024
#: Blocks kept per open slide (the header's and the last regions').
MAX_BLOCKS = 256
#: Seconds a server may take to answer or to send the next bytes before the read fails.
TIMEOUT_S = 30.0
#: Retries of a failed request (server error, dropped connection) before the slide fails.
RETRIES = 4
#: Seconds before the first retry; each next one waits twice as long.
BACKOFF_S = 0.25
#: Seconds after a read used up its retries during which the file's reads fail at once.
GIVE_UP_S = 10.0
#: Seconds an object's identity (one HEAD request) is reused within a process.
IDENTITY_TTL_S = 60.0

_FS_EXTRA = {"http": "aiohttp", "https": "aiohttp", "s3": "s3fs", "gs": "gcsfs"}
_EXTRA_NAME = {"s3": "s3", "gs": "gcs"}  # the pyproject extra that installs each scheme's filesystem


def _env_number(name: str, default: float, minimum: float) -> float:
    raw = os.environ.get(name, "")
    if not raw:
        return default
    try:
        value = float(raw)
    except ValueError:
        value = float("nan")
    if not value >= minimum:
        raise ConfigError(f"${name}={raw!r}: expected a number ≥ {minimum:g} (unset it for the default {default:g})")
    return value


def timeout_s() -> float:
    """``$LOUPE_REMOTE_TIMEOUT`` or :data:`TIMEOUT_S`."""
    return _env_number("LOUPE_REMOTE_TIMEOUT", TIMEOUT_S, 0.1)


def retries() -> int:
    """``$LOUPE_REMOTE_RETRIES`` or :data:`RETRIES`."""
    return int(_env_number("LOUPE_REMOTE_RETRIES", RETRIES, 0))


def block_size() -> int:
    """``$LOUPE_REMOTE_BLOCK`` or :data:`BLOCK_SIZE`."""
    return int(_env_number("LOUPE_REMOTE_BLOCK", BLOCK_SIZE, 4096))


def _import(module: str, url: SlideURL) -> ModuleType:
    try:
        return importlib.import_module(module)
    except ImportError as err:
        raise ConfigError(
            f"slide {url}: reading {url.scheme}:// slides needs the optional extra ({err.name} is missing): "
            f"pip install 'loupe[{_EXTRA_NAME.get(url.scheme, 'remote')}]'"
        ) from None


def filesystem(url: SlideURL) -> Any:
    """The fsspec filesystem of ``url``'s scheme (one per process and settings: its connections are reused).

    HTTP(S) takes proxies and ``~/.netrc`` credentials from the environment (aiohttp's ``trust_env``); S3 and
    GCS take theirs from boto's and Google's usual environment variables and files (s3fs, gcsfs).
    """
    fsspec = _import("fsspec", url)
    _import(_FS_EXTRA[url.scheme], url)
    if url.scheme in ("http", "https"):
        aiohttp = importlib.import_module("aiohttp")
        t = timeout_s()
        timeout = aiohttp.ClientTimeout(total=None, connect=t, sock_connect=t, sock_read=t)
        return fsspec.filesystem("http", block_size=block_size(), client_kwargs={"timeout": timeout, "trust_env": True})
    return fsspec.filesystem(url.scheme)


def _fs_path(url: SlideURL) -> str:
    """The name ``url`` has in its fsspec filesystem: the whole URL for HTTP, bucket/key for object stores."""
    if url.scheme in ("http", "https"):
        return url.url
    return url.url.split("://", 1)[1]


def _cause(err: BaseException) -> BaseException:
    """The innermost cause: fsspec's HTTP filesystem reports every failed HEAD/GET as FileNotFoundError."""
    seen = err
    while seen.__cause__ is not None and seen.__cause__ is not seen:
        seen = seen.__cause__
    return seen


def _failure(url: SlideURL, err: BaseException) -> SlideError:
    """A SlideError naming the redacted URL and what went wrong: the HTTP status, a timeout, or the library's
    message (redacted too)."""
    cause = _cause(err)
    status = getattr(cause, "status", None) or getattr(cause, "code", None)
    if status == 404 or (isinstance(err, FileNotFoundError) and cause is err):
        return SlideError(f"slide {url} not found on the server (HTTP 404): check the URL, or the path column")
    if status == 416:
        return SlideError(
            f"slide {url}: its header points past the end of the object (HTTP 416): the object is truncated or "
            "damaged; upload it again"
        )
    if isinstance(status, int):
        hint = "check the credentials and the access rights" if status in (401, 403) else "check the server"
        tried = f" (after {retries()} retries)" if retryable(err) else ""
        return SlideError(f"slide {url}: the server answered HTTP {status}{tried}: {hint}")
    if isinstance(cause, TimeoutError) or "Timeout" in type(cause).__name__:
        return SlideError(
            f"slide {url}: the server did not answer within {timeout_s():g} s (timeout; $LOUPE_REMOTE_TIMEOUT "
            "sets it): check the server, or raise the timeout"
        )
    what = redact_text(f"{type(cause).__name__}: {cause}".strip())
    tried = f", after {retries()} retries" if retryable(err) else ""
    return SlideError(f"slide {url} could not be read over the network ({what}{tried}): check the URL and the server")


def retryable(err: BaseException) -> bool:
    """Whether a failed request may succeed when repeated: server errors (5xx, 429), refused or dropped
    connections, truncated responses. Not: 404/403 and other refusals, timeouts, malformed data."""
    cause = _cause(err)
    status = getattr(cause, "status", None)
    if isinstance(status, int):
        return status >= 500 or status == 429
    if isinstance(cause, TimeoutError) or "Timeout" in type(cause).__name__:
        return False
    if isinstance(cause, (ConnectionError, EOFError)):
        return True
    name = type(cause).__name__
    module = type(cause).__module__.split(".")[0]
    return (module == "aiohttp" and ("Connection" in name or "Disconnected" in name or "Payload" in name)) or (
        module in ("botocore", "aiobotocore") and "Connection" in name
    )


T = TypeVar("T")


def with_retries(url: SlideURL, what: str, call: Callable[[], T]) -> T:
    """``call()``, repeated after a retryable failure (:func:`retryable`) up to ``$LOUPE_REMOTE_RETRIES`` times
    with doubling backoff; the last failure, or any other, raised as it is."""
    attempts = retries()
    for attempt in range(attempts + 1):
        try:
            return call()
        except Exception as err:
            if attempt == attempts or not retryable(err):
                raise
            wait = BACKOFF_S * 2**attempt
            log.debug("slide %s: %s failed (%s); retrying in %.2g s", url, what, redact_text(str(_cause(err))), wait)
            time.sleep(wait)
    raise AssertionError("unreachable")


class NotCacheable(OSError):
    """The server names no version of the object (neither ETag nor Last-Modified): nothing of it is cached."""


_identities: dict[str, tuple[float, dict[str, Any]]] = {}
_identities_lock = threading.Lock()


def remote_identity(url: SlideURL) -> dict[str, Any]:
    """What identifies the object's bytes: URL without credentials, ETag (else Last-Modified) and size.

    Raises OSError when the server gives neither an ETag nor a Last-Modified (then nothing of it is cached: a
    change could not be told) or cannot be asked.
    """
    if url.is_dicomweb:  # DICOM UIDs name immutable content: the series UID is the identity
        return {"url": url.without_credentials(), "dicomweb": True}
    key = url.url
    now = time.monotonic()
    with _identities_lock:
        hit = _identities.get(key)
    if hit is not None and now - hit[0] < IDENTITY_TTL_S:
        return hit[1]
    try:
        fs = filesystem(url)
        info = with_retries(url, "asking for its size and ETag", lambda: fs.info(_fs_path(url)))
    except Exception as err:
        raise OSError(str(_failure(url, err))) from None
    lower = {str(k).lower(): v for k, v in info.items()}
    etag = lower.get("etag") or lower.get("md5hash") or lower.get("generation")
    modified = lower.get("last-modified") or lower.get("lastmodified") or lower.get("updated") or lower.get("mtime")
    if not etag and not modified:
        raise NotCacheable(f"slide {url}: the server gives neither an ETag nor a Last-Modified; it is not cached")
    ident = {
        "url": url.without_credentials(),
        "etag": str(etag) if etag else None,
        "modified": None if etag else str(modified),
        "size": lower.get("size"),
    }
    with _identities_lock:
        _identities[key] = (now, ident)
    return ident


def forget_identities() -> None:
    """Drop the remembered identities (the next cache look-up asks the server again)."""
    with _identities_lock:
        _identities.clear()


class RemoteTiffReader(TiffSlideReader):
    """A TIFF-family slide read by URL through fsspec and tiffslide; everything else as :class:`TiffSlideReader`.

    tifffile reads the object through a :class:`~loupe.slides.range_file.RangeFile`: block-cached, one request
    per run of missing blocks. With a slide ``cache``, the byte ranges tifffile read while opening are stored in
    it (entry ``tiff-header``, keyed like every entry by the URL and the object's ETag) and served from memory the
    next time the slide is opened: a re-run asks the server only for the patches' tiles.
    """

    def __init__(self, url: SlideURL, mpp: float | None = None, cache: SlideCache | None = None) -> None:
        self._url, self._cache = url, cache
        self._gave_up: tuple[float, Exception] | None = None  # when retrying last stopped, and why
        self._header_hit = False
        super().__init__(url, mpp)
        if cache is None or self._header_hit:  # nothing to store: no recording, no probe of unused levels
            return
        self._first_tiles()
        recorded = self._file.recorded()
        if recorded:
            starts = np.array([start for start, _ in recorded], dtype=np.int64)
            lengths = np.array([len(data) for _, data in recorded], dtype=np.int64)
            data = np.frombuffer(b"".join(data for _, data in recorded), dtype=np.uint8)
            cache.store("tiff-header", url, self._header_params(), {"starts": starts, "lengths": lengths, "data": data})

    def _first_tiles(self) -> None:
        """Have tifffile read what it reads when a level is first read (the first bytes of its first tile, to pick
        the decoder) now, while the header's reads are recorded: else every level's first read on a re-run waits
        for one more request, one after another."""
        try:
            series = self._slide.ts_tifffile.series[int(self._props.get("tiffslide.series-index", 0) or 0)]
            for level in series.levels:
                _ = level.keyframe.decode
        except Exception:  # an unusual layout: the reads happen on first use instead
            log.debug("slide %s: the levels' decoders could not be chosen at open", self._url)

    def _header_params(self) -> dict[str, str]:
        """What the recorded header reads depend on besides the object: the libraries that made them."""
        return {
            name: str(getattr(importlib.import_module(name), "__version__", "?")) for name in ("tifffile", "tiffslide")
        }

    def _fetch(self, spans: list[tuple[int, int]]) -> list[bytes]:
        """The bytes of ``spans`` [(start, end)], one request each, in parallel, retried (:func:`with_retries`).
        Once a fetch has used up its retries, the fetches of the next :data:`GIVE_UP_S` seconds fail at once with
        that error (the rest of the slide's region fails with it, instead of each tile taking as long again)."""
        gave_up = self._gave_up
        if gave_up is not None and time.monotonic() - gave_up[0] < GIVE_UP_S:
            raise gave_up[1]
        path = _fs_path(self._url)

        def once() -> list[bytes]:
            if len(spans) == 1:
                blobs = [self._fs.cat_file(path, start=spans[0][0], end=spans[0][1])]
            else:
                blobs = self._fs.cat_ranges(
                    [path] * len(spans), [a for a, _ in spans], [b for _, b in spans], on_error="raise"
                )
            for (a, b), blob in zip(spans, blobs, strict=True):
                if not isinstance(blob, bytes) or len(blob) != b - a:
                    got = len(blob) if isinstance(blob, bytes) else type(blob).__name__
                    raise ConnectionError(f"the server sent {got} bytes for a range of {b - a} at {a}")
            return list(blobs)

        try:
            return with_retries(self._url, f"reading {len(spans)} byte ranges", once)
        except Exception as err:
            if retryable(err):
                self._gave_up = (time.monotonic(), err)
            raise

    def _open_tiffslide(self, tiffslide: ModuleType) -> Any:
        self._fs = filesystem(self._url)
        size: Any = None
        try:  # the size asked for the cache key already: the open asks the server nothing more
            size = remote_identity(self._url).get("size")
        except NotCacheable:
            pass
        except OSError as err:
            raise SlideError(str(err)) from None
        if not isinstance(size, int) or size <= 0:
            try:
                size = int(with_retries(self._url, "asking for its size", lambda: self._fs.size(_fs_path(self._url))))
            except Exception as err:
                raise _failure(self._url, err) from None
        handle = RangeFile(self._fetch, size, block_size(), MAX_BLOCKS, self._url.name)
        self._file = handle
        if self._cache is not None:
            entry = self._cache.load("tiff-header", self._url, self._header_params())
            if entry is not None:
                data, bounds = entry["data"].tobytes(), np.concatenate(([0], np.cumsum(entry["lengths"]))).tolist()
                starts = entry["starts"].tolist()
                handle.remember([(s, data[a:b]) for s, a, b in zip(starts, bounds[:-1], bounds[1:], strict=True)])
                self._header_hit = True
            else:
                handle.record()  # what tifffile reads while opening: stored in the cache by __init__
        try:
            return tiffslide.TiffSlide(handle)
        except Exception as err:
            handle.close()
            if _is_network_error(err):
                raise _failure(self._url, err) from None
            raise SlideError(
                f"slide {self._url} could not be opened by tiffslide ({redact_text(f'{type(err).__name__}: {err}')}"
                "): by URL loupe reads TIFF-family slides only (SVS, tiled TIFF); check that the object is complete"
            ) from None

    def _tile_ranges(self, level: int, lx0: int, ly0: int, width: int, height: int) -> list[tuple[int, int]]:
        """The byte ranges (start, end) of the tiles under a level region, neighbours merged (:data:`MERGE_GAP`)."""
        series = self._slide.ts_tifffile.series[int(self._props.get("tiffslide.series-index", 0) or 0)]
        page = series.levels[level].keyframe
        if not page.is_tiled or page.planarconfig != 1 or len(series.levels[level].pages) != 1:
            return []
        th, tw = int(page.chunks[0]), int(page.chunks[1])
        rows, cols = int(page.chunked[0]), int(page.chunked[1])
        offsets, counts = page.dataoffsets, page.databytecounts
        spans = []
        for ty in range(max(ly0 // th, 0), min((ly0 + height - 1) // th, rows - 1) + 1):
            for tx in range(max(lx0 // tw, 0), min((lx0 + width - 1) // tw, cols - 1) + 1):
                i = ty * cols + tx
                if counts[i] > 0:
                    spans.append((int(offsets[i]), int(offsets[i]) + int(counts[i])))
        merged: list[list[int]] = []
        for start, end in sorted(spans):
            if merged and start - merged[-1][1] <= MERGE_GAP:
                merged[-1][1] = max(merged[-1][1], end)
            else:
                merged.append([start, end])
        return [(a, b) for a, b in merged]

    def _read_level(self, level: int, lx0: int, ly0: int, width: int, height: int) -> np.ndarray:
        """Fetch the region's tiles at once (parallel, coalesced ranges on reused connections), then decode them
        through tiffslide from memory."""
        lw, lh = self._level_dimensions[level]
        x0, y0 = max(lx0, 0), max(ly0, 0)
        x1, y1 = min(lx0 + width, lw), min(ly0 + height, lh)
        starts: list[int] = []
        if x1 > x0 and y1 > y0:
            try:
                ranges = self._tile_ranges(level, x0, y0, x1 - x0, y1 - y0)
            except Exception:  # an unusual layout: tiffslide reads the tiles itself, through the block cache
                ranges = []
            ranges = [(a, b) for a, b in ranges if not self._file.covered(a, b)]  # e.g. in the header's blocks
            if ranges:
                try:
                    blobs = self._fetch(ranges)
                except Exception as err:
                    raise _failure(self._url, err) from None
                held = {a: blob for (a, _), blob in zip(ranges, blobs, strict=True)}
                self._file.hold(held)
                starts = list(held)
        try:
            return super()._read_level(level, lx0, ly0, width, height)
        finally:
            self._file.release(starts)

    def _read_failure(self, level: int, err: BaseException) -> SlideError:
        if _is_network_error(err):
            return _failure(self._url, err)
        return SlideError(
            f"slide {self._url}: reading level {level} failed ({redact_text(f'{type(err).__name__}: {err}')}); "
            "the object is probably damaged or truncated: check its size on the server against the original"
        )


def _is_network_error(err: BaseException) -> bool:
    network = isinstance(err, (OSError, TimeoutError, EOFError))
    return network or type(err).__module__.split(".")[0] in ("aiohttp", "botocore")


def open_remote(url: SlideURL, backend: str, mpp: float | None, cache: SlideCache | None = None) -> PyramidReader:
    """Open the slide at ``url``: DICOMweb series through wsidicom, TIFF-family slides through tiffslide over
    fsspec (its header ranges kept in ``cache``), anything else refused."""
    if url.is_dicomweb:
        from loupe.slides.dicomweb import DicomWebReader

        return DicomWebReader(url, mpp)
    if backend not in ("auto", "tiffslide") or url.suffix.lower() not in REMOTE_TIFF_SUFFIXES:
        raise needs_local_file(url, backend)
    return RemoteTiffReader(url, mpp, cache)
