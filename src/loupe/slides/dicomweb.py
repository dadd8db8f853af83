"""DICOM whole slides served over DICOMweb (how IDC and hospital archives serve them), through wsidicom with
dicomweb-client (optional extra ``dicomweb``).

URL form: ``dicomweb+https://host[:port]/<service root>/studies/<StudyInstanceUID>/series/<SeriesInstanceUID>``
(``dicomweb+http`` for plain HTTP); a user and password in the URL become HTTP basic authentication. wsidicom
asks the server for the series' metadata, then fetches only the frames (tiles) under each region. Requests reuse
one session; a 5xx or lost connection is retried with backoff (``LOUPE_REMOTE_RETRIES``), a server that stalls
fails after ``LOUPE_REMOTE_TIMEOUT`` seconds; every failure is one :class:`SlideError` naming the redacted URL.
"""

from __future__ import annotations

import importlib
import threading
from typing import Any

import numpy as np

from loupe.errors import ConfigError, SlideError
from loupe.slides.pyramid import PyramidReader
from loupe.slides.resample import to_rgb8, white
from loupe.slides.urls import SlideURL, redact_text

INSTALL_HINT = "pip install 'loupe[dicomweb]'"


def _imports(url: SlideURL) -> tuple[Any, Any, Any]:
    try:
        requests = importlib.import_module("requests")
        dicomweb_client = importlib.import_module("dicomweb_client.api")
        wsidicom = importlib.import_module("wsidicom")
    except ImportError as err:
        raise ConfigError(
            f"slide {url}: reading DICOMweb slides needs the optional extra ({err.name} is missing): {INSTALL_HINT}"
        ) from None
    return requests, dicomweb_client, wsidicom


def _session(requests: Any, url: SlideURL, timeout_s: float, retries: int, backoff_s: float) -> Any:
    """A requests session with basic auth from the URL, a timeout on every request and bounded retries."""
    from urllib.parse import unquote, urlsplit

    from urllib3.util.retry import Retry

    class _Adapter(requests.adapters.HTTPAdapter):
        def send(self, request: Any, **kwargs: Any) -> Any:
            kwargs["timeout"] = kwargs.get("timeout") or timeout_s
            return super().send(request, **kwargs)

    retry = Retry(
        total=retries,
        connect=retries,
        read=0,  # a read that timed out is a stalled server: not retried (it would only multiply the wait)
        status=retries,
        backoff_factor=backoff_s,
        status_forcelist=(429, 500, 502, 503, 504),
        allowed_methods=None,
        raise_on_status=False,
    )
    session = requests.Session()
    adapter = _Adapter(max_retries=retry)
    session.mount("http://", adapter)
    session.mount("https://", adapter)
    parts = urlsplit(url.url)
    if parts.username:
        session.auth = (unquote(parts.username), unquote(parts.password or ""))
    return session


def _failure(url: SlideURL, err: BaseException) -> SlideError:
    response = getattr(err, "response", None)
    status = getattr(response, "status_code", None)
    if isinstance(status, int):
        return SlideError(f"slide {url}: the DICOMweb server answered HTTP {status}: check the URL and the access")
    what = redact_text(f"{type(err).__name__}: {err}")
    if "Timeout" in type(err).__name__:
        return SlideError(f"slide {url}: the DICOMweb server did not answer in time ({what}); $LOUPE_REMOTE_TIMEOUT")
    return SlideError(f"slide {url} could not be read over DICOMweb ({what}): check the URL and the server")


class DicomWebReader(PyramidReader):
    """A DICOM WSI series read over DICOMweb by wsidicom; levels are the series' pyramid levels."""

    def __init__(self, url: SlideURL, mpp: float | None = None) -> None:
        from loupe.slides.remote import BACKOFF_S, retries, timeout_s  # the remote settings, read at open

        super().__init__(url, mpp)
        self._url = url
        parts = url.dicomweb_parts
        if parts is None:
            raise SlideError(f"slide {url}: not a DICOMweb series URL")
        root, study, series = parts
        requests, api, wsidicom = _imports(url)
        self._lock = threading.Lock()
        try:
            session = _session(requests, url, timeout_s(), retries(), BACKOFF_S)
            client = wsidicom.WsiDicomWebClient(api.DICOMwebClient(root, session=session))
            self._slide = wsidicom.WsiDicom.open_web(client, study, series)
        except Exception as err:
            if getattr(getattr(err, "response", None), "status_code", None) or "Timeout" in type(err).__name__:
                raise _failure(url, err) from None
            if isinstance(err, (OSError, requests.RequestException)):
                raise _failure(url, err) from None
            raise SlideError(
                f"slide {url}: no DICOM whole-slide series {series} in study {study} on this server "
                f"({redact_text(f'{type(err).__name__}: {err}')}): check the study and series UIDs"
            ) from None
        levels = list(self._slide.levels)
        if not levels:
            self._slide.close()
            raise SlideError(f"slide {url}: the series has no pyramid levels")
        self._numbers = [int(level.level) for level in levels]
        self._level_dimensions = tuple((int(lv.size.width), int(lv.size.height)) for lv in levels)
        w0 = self._level_dimensions[0][0]
        self._level_downsamples = tuple(w0 / w for w, _ in self._level_dimensions)
        try:
            mpp0 = float(levels[0].mpp.width)
        except (AttributeError, TypeError, ValueError):
            mpp0 = float("nan")
        self._file_mpp = mpp0 if mpp0 > 0 else None
        self._props = {"dicom.study_uid": study, "dicom.series_uid": series}

    @property
    def file_mpp(self) -> float | None:
        return self._file_mpp

    @property
    def vendor(self) -> str:
        return "dicom"

    @property
    def objective_power(self) -> float | None:
        return None

    @property
    def properties(self) -> dict[str, str]:
        return dict(self._props)

    def _read_level(self, level: int, lx0: int, ly0: int, width: int, height: int) -> np.ndarray:
        lw, lh = self._level_dimensions[level]
        sx0, sy0 = max(lx0, 0), max(ly0, 0)
        sx1, sy1 = min(lx0 + width, lw), min(ly0 + height, lh)
        out = white(height, width)
        if sx1 <= sx0 or sy1 <= sy0:
            return out
        try:
            with self._lock:
                self._check_open()
                image = self._slide.read_region((sx0, sy0), self._numbers[level], (sx1 - sx0, sy1 - sy0))
        except SlideError:
            raise
        except Exception as err:
            raise _failure(self._url, err) from None
        out[sy0 - ly0 : sy1 - ly0, sx0 - lx0 : sx1 - lx0] = to_rgb8(np.asarray(image))
        return out

    def close(self) -> None:
        with self._lock:
            if not self._closed:
                self._slide.close()
            super().close()
