"""Slides read over a network: TIFF-family slides by URL through fsspec + tiffslide (optional extra ``remote``).

Only what is read is fetched: tifffile parses the header (the IFDs and, per level read, its tile table), tiffslide
reads the tiles under each region, and fsspec fetches them as HTTP range requests (S3/GCS ranged GETs) on
reused connections, through a block cache (:data:`BLOCK_SIZE`) that serves neighbouring tiles and the header's
small reads from one request. The object's identity for the slide cache is its URL without credentials plus its
ETag (or Last-Modified and size): :func:`remote_identity`, asked once per :data:`IDENTITY_TTL_S` per process.

Settings (environment, read when a slide is opened): ``LOUPE_REMOTE_TIMEOUT`` (seconds a read may wait for the
server before the slide fails, default 30) and ``LOUPE_REMOTE_BLOCK`` (bytes per block, default 256 KiB).
"""

from __future__ import annotations

import importlib
import os
import threading
import time
from types import ModuleType
from typing import Any

from loupe.errors import ConfigError, SlideError
from loupe.slides.tiffslide_reader import TiffSlideReader
from loupe.slides.urls import REMOTE_TIFF_SUFFIXES, SlideURL, needs_local_file, redact_text

INSTALL_HINT = "pip install 'loupe[remote]'"

#: Bytes fetched per block of the read cache: large enough that a tile table or a row of neighbouring tiles is
#: one request, small enough that a patch's few tiles do not pull in megabytes.
BLOCK_SIZE = 256 * 1024
#: Blocks kept per open slide (the header's and the last regions').
MAX_BLOCKS = 256
#: Seconds a server may take to answer or to send the next bytes before the read fails.
TIMEOUT_S = 30.0
#: Seconds an object's identity (one HEAD request) is reused within a process.
IDENTITY_TTL_S = 60.0

_FS_EXTRA = {"http": "aiohttp", "https": "aiohttp", "s3": "s3fs", "gs": "gcsfs"}


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


def block_size() -> int:
    """``$LOUPE_REMOTE_BLOCK`` or :data:`BLOCK_SIZE`."""
    return int(_env_number("LOUPE_REMOTE_BLOCK", BLOCK_SIZE, 4096))


def _import(module: str, url: SlideURL) -> ModuleType:
    try:
        return importlib.import_module(module)
    except ImportError as err:
        raise ConfigError(
            f"slide {url}: reading {url.scheme}:// slides needs the optional extra ({err.name} is missing): "
            f"{INSTALL_HINT}"
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
    if isinstance(status, int):
        hint = "check the credentials and the access rights" if status in (401, 403) else "check the server"
        return SlideError(f"slide {url}: the server answered HTTP {status}: {hint}")
    if isinstance(cause, TimeoutError) or "Timeout" in type(cause).__name__:
        return SlideError(
            f"slide {url}: the server did not answer within {timeout_s():g} s (timeout; $LOUPE_REMOTE_TIMEOUT "
            "sets it): check the server, or raise the timeout"
        )
    what = redact_text(f"{type(cause).__name__}: {cause}".strip())
    return SlideError(f"slide {url} could not be read over the network ({what}): check the URL and the server")


_identities: dict[str, tuple[float, dict[str, Any]]] = {}
_identities_lock = threading.Lock()


def remote_identity(url: SlideURL) -> dict[str, Any]:
    """What identifies the object's bytes: URL without credentials, ETag (else Last-Modified) and size.

    Raises OSError when the server gives neither an ETag nor a Last-Modified (then nothing of it is cached: a
    change could not be told) or cannot be asked.
    """
    key = url.url
    now = time.monotonic()
    with _identities_lock:
        hit = _identities.get(key)
    if hit is not None and now - hit[0] < IDENTITY_TTL_S:
        return hit[1]
    try:
        info = filesystem(url).info(_fs_path(url))
    except Exception as err:
        raise OSError(str(_failure(url, err))) from None
    lower = {str(k).lower(): v for k, v in info.items()}
    etag = lower.get("etag") or lower.get("md5hash") or lower.get("generation")
    modified = lower.get("last-modified") or lower.get("lastmodified") or lower.get("updated") or lower.get("mtime")
    if not etag and not modified:
        raise OSError(f"slide {url}: the server gives neither an ETag nor a Last-Modified; it is not cached")
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
    """A TIFF-family slide read by URL through fsspec and tiffslide; everything else as :class:`TiffSlideReader`."""

    def __init__(self, url: SlideURL, mpp: float | None = None) -> None:
        self._url = url
        super().__init__(url, mpp)

    def _open_tiffslide(self, tiffslide: ModuleType) -> Any:
        fs = filesystem(self._url)
        try:
            handle = fs.open(
                _fs_path(self._url),
                mode="rb",
                block_size=block_size(),
                cache_type="blockcache",
                cache_options={"maxblocks": MAX_BLOCKS},
            )
        except Exception as err:
            raise _failure(self._url, err) from None
        try:
            return tiffslide.TiffSlide(handle)
        except Exception as err:
            handle.close()
            if isinstance(err, (OSError, TimeoutError)) or type(err).__module__.startswith("aiohttp"):
                raise _failure(self._url, err) from None
            raise SlideError(
                f"slide {self._url} could not be opened by tiffslide ({redact_text(f'{type(err).__name__}: {err}')}"
                "): by URL loupe reads TIFF-family slides only (SVS, tiled TIFF); check that the object is complete"
            ) from None

    def _read_failure(self, level: int, err: BaseException) -> SlideError:
        return _failure(self._url, err) if _is_network_error(err) else super()._read_failure(level, err)


def _is_network_error(err: BaseException) -> bool:
    return isinstance(err, (OSError, TimeoutError)) or type(err).__module__.split(".")[0] in ("aiohttp", "botocore")


def open_remote(url: SlideURL, backend: str, mpp: float | None) -> TiffSlideReader:
    """Open the slide at ``url``: TIFF-family slides through tiffslide over fsspec, anything else refused."""
    if backend not in ("auto", "tiffslide") or url.suffix.lower() not in REMOTE_TIFF_SUFFIXES:
        raise needs_local_file(url, backend)
    return RemoteTiffReader(url, mpp)
