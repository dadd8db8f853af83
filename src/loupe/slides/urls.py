"""Slides named by URL: which strings are URLs, and their redacted form (no credentials) for every output.

A :class:`SlideURL` stands where a local :class:`~pathlib.Path` stands (manifests, readers, caches, outputs) and
answers the few questions loupe asks of a path (``name``, ``stem``, ``suffix``, ``parent.name``). Its ``str`` is
the **redacted** URL: a user and password in the URL, and query values that carry a credential (pre-signed S3 and
GCS URLs, SAS tokens, API keys) become ``***``. So a URL printed in a log, written to a status file, a summary, a
GeoJSON or shown by the viewer through ``str()`` or an f-string never shows them; only the readers ask for
:attr:`SlideURL.url`, the URL as given.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from urllib.parse import parse_qsl, quote, unquote, urlencode, urlsplit, urlunsplit

from loupe.errors import SlideError

#: URL schemes read through fsspec (``gcs`` is gcsfs's other name for ``gs``).
FSSPEC_SCHEMES: tuple[str, ...] = ("http", "https", "s3", "gs", "gcs")
#: DICOMweb: ``dicomweb+http(s)://host[:port]/<service root>/studies/<StudyInstanceUID>/series/<SeriesInstanceUID>``,
#: read through wsidicom + dicomweb-client (:mod:`loupe.slides.dicomweb`).
DICOMWEB_SCHEMES: tuple[str, ...] = ("dicomweb+http", "dicomweb+https")
#: Every scheme a slide may be named with.
SCHEMES: tuple[str, ...] = FSSPEC_SCHEMES + DICOMWEB_SCHEMES
DICOMWEB_FORM = "dicomweb+https://host/dicom-web/studies/<StudyInstanceUID>/series/<SeriesInstanceUID>"

#: Slide suffixes tiffslide reads from a byte stream (what is opened by URL). Other formats need local files.
REMOTE_TIFF_SUFFIXES: tuple[str, ...] = (".svs", ".tif", ".tiff", ".ndpi", ".scn", ".bif")

#: What replaces a credential in a shown URL.
MASK = "***"

#: Query parameters whose values are credentials: AWS/GCS pre-signed URLs (X-Amz-Signature, X-Amz-Credential,
#: X-Amz-Security-Token, X-Goog-Signature, X-Goog-Credential), Azure SAS (sig), and the usual token/key names.
_SECRET_QUERY = re.compile(
    r"(signature|credential|token|secret|password|passwd|pwd|sig|key|auth|session)", re.IGNORECASE
)
_URL_IN_TEXT = re.compile(r"\b(?:dicomweb\+https?|https?|s3|gs|gcs)://[^\s'\"<>)\]]+", re.IGNORECASE)


def looks_like_url(text: str | object) -> bool:
    """Whether ``text`` names a slide by URL (a known scheme followed by ``://``)."""
    if not isinstance(text, str):
        return False
    scheme, sep, _ = text.partition("://")
    return bool(sep) and scheme.lower() in SCHEMES


def redact(url: str) -> str:
    """``url`` without its credentials: user:password@ and credential-bearing query values become ``***``."""
    try:
        parts = urlsplit(url)
    except ValueError:
        return MASK
    netloc = parts.netloc
    if "@" in netloc:
        netloc = f"{MASK}@{netloc.rpartition('@')[2]}"
    query = parts.query
    if query:
        pairs = parse_qsl(query, keep_blank_values=True)
        query = urlencode([(k, MASK if _SECRET_QUERY.search(k) else v) for k, v in pairs], safe="*")
    return urlunsplit((parts.scheme, netloc, parts.path, query, parts.fragment))


def redact_text(text: str) -> str:
    """``text`` with every URL in it redacted (error messages of HTTP libraries repeat the URL they fetched)."""
    return _URL_IN_TEXT.sub(lambda m: redact(m.group(0)), text)


@dataclass(frozen=True)
class SlideURL:
    """A slide named by URL. ``url`` is the URL as given (credentials included); ``str()`` is redacted."""

    url: str

    def __post_init__(self) -> None:
        if not looks_like_url(self.url):
            raise SlideError(
                f"{redact(self.url)!r} is not a slide URL: expected one of {', '.join(s + '://' for s in SCHEMES)}"
            )
        parts = urlsplit(self.url)
        if not parts.netloc or parts.netloc.endswith("@"):
            raise SlideError(f"slide URL {redact(self.url)} names no host or bucket: write scheme://host/path")
        if not unquote(parts.path).strip("/"):
            raise SlideError(f"slide URL {redact(self.url)} names no object: write scheme://host/path/to/slide.svs")
        if self.is_dicomweb and self.dicomweb_parts is None:
            raise SlideError(f"DICOMweb slide URL {redact(self.url)} names no study and series: write {DICOMWEB_FORM}")

    @property
    def scheme(self) -> str:
        """Lower-case scheme: http, https, s3, gs (gcs is given as gs)."""
        scheme = urlsplit(self.url).scheme.lower()
        return "gs" if scheme == "gcs" else scheme

    @property
    def is_dicomweb(self) -> bool:
        return self.scheme in DICOMWEB_SCHEMES

    @property
    def dicomweb_parts(self) -> tuple[str, str, str] | None:
        """(service root URL as given, with its credentials; study UID; series UID) of a DICOMweb URL, else None."""
        parts = urlsplit(self.url)
        steps = parts.path.rstrip("/").split("/")
        if len(steps) < 5 or steps[-4] != "studies" or steps[-2] != "series" or not steps[-3] or not steps[-1]:
            return None
        root = urlunsplit((parts.scheme.split("+", 1)[1], parts.netloc, "/".join(steps[:-4]), "", ""))
        return root, unquote(steps[-3]), unquote(steps[-1])

    @property
    def host(self) -> str:
        """Host (and port) or bucket, without credentials."""
        return urlsplit(self.url).netloc.rpartition("@")[2]

    @property
    def _posix(self) -> PurePosixPath:
        return PurePosixPath(unquote(urlsplit(self.url).path))

    @property
    def name(self) -> str:
        """The object's file name (the last step of the URL's path, unquoted)."""
        return self._posix.name

    @property
    def stem(self) -> str:
        return self.name if self.is_dicomweb else self._posix.stem  # a series UID's dots are not a suffix

    @property
    def suffix(self) -> str:
        return "" if self.is_dicomweb else self._posix.suffix

    @property
    def parent(self) -> PurePosixPath:
        """The URL's path without its last step (a DICOM slide's default id is its folder's name)."""
        return self._posix.parent

    @property
    def redacted(self) -> str:
        return redact(self.url)

    def without_credentials(self) -> str:
        """The URL with user, password and credential query values removed: what identifies the object."""
        parts = urlsplit(self.url)
        pairs = [(k, v) for k, v in parse_qsl(parts.query, keep_blank_values=True) if not _SECRET_QUERY.search(k)]
        query = urlencode(pairs, quote_via=quote)
        return urlunsplit((parts.scheme.lower(), self.host, parts.path, query, ""))

    def __str__(self) -> str:
        return self.redacted

    def __repr__(self) -> str:
        return f"SlideURL({self.redacted!r})"


def as_source(given: str | object) -> SlideURL | None:
    """``given`` as a :class:`SlideURL` when it is a URL string (or one already), else None (a local path)."""
    if isinstance(given, SlideURL):
        return given
    if looks_like_url(given):
        return SlideURL(str(given))
    return None


def needs_local_file(url: SlideURL, backend: str) -> SlideError:
    """The one message for a slide that cannot be read by URL (a format or backend that needs local files)."""
    return SlideError(
        f"slide {url}: {'its format (' + url.suffix + ')' if backend == 'auto' else 'backend ' + repr(backend)} "
        f"needs a local file; by URL loupe reads TIFF-family slides ({', '.join(REMOTE_TIFF_SUFFIXES)}) through "
        "tiffslide and DICOM series over DICOMweb (dicomweb+https://…/studies/<uid>/series/<uid>): copy this "
        "slide to local disk (for MRXS and other OpenSlide-only formats) or convert it to a pyramidal TIFF, and use "
        "backend 'auto' or 'tiffslide' for URLs"
    )


def local_only(path: Path | SlideURL, backend: str) -> Path:
    """``path`` when it is local; the one needs-a-local-file message when it is a URL."""
    if isinstance(path, SlideURL):
        raise needs_local_file(path, backend)
    return path


#: Where a slide's bytes are: a local file or folder, or a URL.
SlideSource = Path | SlideURL
