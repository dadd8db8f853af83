"""The viewer's ASGI application (Starlette): the cohort and slide pages, their JSON, Deep Zoom tiles and layers.

Every route names a slide by its id in the folder shown; none takes a file path. An id the cohort does not list
(``..``, an absolute path, anything encoded) is a 404, and so is a tile or cell outside the slide's pyramid or
grids; a malformed query parameter is a 400. Slide reads, tile encoding and file parsing run in a thread pool
(``anyio.to_thread``), never on the event loop; encoded tiles and layers are kept in a byte-bounded cache.
The app writes nothing anywhere: a missing or broken slide file is an error shown on that slide's page.
"""

from __future__ import annotations

import io
import os
import re
import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from functools import partial
from importlib import resources
from pathlib import Path
from typing import Any, TypeVar

import anyio
import numpy as np
from PIL import Image
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import FileResponse, JSONResponse, Response
from starlette.routing import Mount, Route
from starlette.staticfiles import StaticFiles

from loupe.errors import LoupeError, describe_error
from loupe.slides.open import open_slide
from loupe.slides.reader import SlideReader
from loupe.viewer.cohort import COLUMNS, PREDICTION_FILE, Cohort, SlideRow, query
from loupe.viewer.deepzoom import DeepZoom, TileCache, TileError
from loupe.viewer.layers import attention_png, colormap_stops, tissue_png
from loupe.viewer.slide_data import SlideData, SlideDataError, load_slide_data

T = TypeVar("T")

STATIC = Path(str(resources.files("loupe.viewer") / "static"))
#: Default memory for encoded tiles and layer images.
CACHE_BYTES = 256 * 2**20
#: Rows per page of the cohort table at most.
MAX_PAGE = 1000
#: Slides kept open at once (a reader holds file handles and a little cache).
OPEN_SLIDES = 16
#: How long a slide file that failed to open is not tried again (seconds).
RETRY_S = 5.0
#: The largest patch side the cell route renders (pixels).
MAX_PATCH_PX = 2048
#: Files of a slide folder the pages link to (its QuPath GeoJSON, heatmaps, overlay, tissue image, summary).
SLIDE_FILES = re.compile(
    r"^(attention\.geojson|attention\.npz|prediction\.json|overlay\.png|tissue\.png|heatmap_[\w.-]+\.png)$"
)
#: The pages load only what the server sends: no other origin, no inline script.
SECURITY_HEADERS = {
    "Content-Security-Policy": "default-src 'self'; img-src 'self' data: blob:; style-src 'self' 'unsafe-inline'; "
    "script-src 'self'; connect-src 'self'; object-src 'none'; base-uri 'none'; frame-ancestors 'none'",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
}


class _Opened:
    """A slide's reader and pyramid, or why its file could not be opened."""

    def __init__(self, reader: SlideReader | None, error: str | None, identity: tuple[int, int] | None) -> None:
        self.reader, self.error, self.identity = reader, error, identity
        self.zoom = DeepZoom(reader.dimensions) if reader is not None else None
        self.at = time.monotonic()


class Viewer:
    """What the routes share: the cohort, open slides, parsed slide folders and the tile cache."""

    def __init__(self, cohort: Cohort, cache_bytes: int = CACHE_BYTES, threads: int | None = None) -> None:
        self.cohort = cohort
        self.cache = TileCache(cache_bytes)
        self.limiter = anyio.CapacityLimiter(threads or max(4, 2 * (os.cpu_count() or 1)))
        self._slides: OrderedDict[str, _Opened] = OrderedDict()
        self._data: OrderedDict[str, tuple[tuple[int, int] | None, SlideData | str]] = OrderedDict()
        self._lock = threading.Lock()
        self._making: dict[tuple[Any, ...], threading.Lock] = {}

    def cached(self, key: tuple[Any, ...], make: Callable[[], bytes]) -> bytes:
        """``make()``'s bytes through the cache; requests for a key being made wait for it (several tabs asking
        for the same tile or layer at once make it once)."""
        data = self.cache.get(key)
        if data is not None:
            return data
        with self._lock:
            lock = self._making.setdefault(key, threading.Lock())
        try:
            with lock:
                data = self.cache.get(key)
                if data is None:
                    data = make()
                    self.cache.put(key, data)
        finally:
            with self._lock:
                self._making.pop(key, None)
        return data

    async def run(self, fn: Callable[..., T], *args: Any) -> T:
        """``fn(*args)`` in the thread pool."""
        return await anyio.to_thread.run_sync(partial(fn, *args), limiter=self.limiter)

    # --- lookups (blocking: call through run) ----------------------------------------------------------
    def row(self, slide_id: str) -> SlideRow:
        row = self.cohort.get(slide_id)
        if row is None:
            raise HTTPException(404, f"no slide {slide_id!r} in this folder")
        return row

    def opened(self, slide_id: str) -> _Opened:
        """The slide's open reader (opened on first use), or its error."""
        row = self.row(slide_id)
        path = self.cohort.slide_path(row)
        identity = _identity(path)
        with self._lock:
            known = self._slides.get(slide_id)
            if (
                known is not None
                and known.identity == identity
                and (known.reader is not None or time.monotonic() - known.at < RETRY_S)
            ):
                self._slides.move_to_end(slide_id)
                return known
        if path is None:
            opened = _Opened(None, "the folder records no file for this slide", None)
        else:
            try:
                reader = open_slide(path, backend=self.cohort.run_info.backend)
                opened = _Opened(reader, None, identity)
            except (LoupeError, OSError, ValueError) as err:
                opened = _Opened(None, describe_error(err), identity)
        with self._lock:
            self._slides[slide_id] = opened
            while len(self._slides) > OPEN_SLIDES:  # dropped, not closed: a request may still be reading it
                self._slides.popitem(last=False)
        return opened

    def slide_data(self, slide_id: str) -> SlideData | str:
        """The slide folder's outputs, or why there are none (a message for the page)."""
        row = self.row(slide_id)
        folder = self.cohort.slide_folder(slide_id)
        if folder is None:
            if row.status == "failed":
                return f"prediction failed: {row.reason}"
            return self.cohort.notice or "no outputs for this slide yet (not predicted, or still being predicted)"
        identity = _identity(folder / PREDICTION_FILE)
        with self._lock:
            known = self._data.get(slide_id)
            if known is not None and known[0] == identity:
                self._data.move_to_end(slide_id)
                return known[1]
        try:
            data: SlideData | str = load_slide_data(slide_id, folder, self.cohort.run_info)
        except SlideDataError as err:
            data = str(err)
        with self._lock:
            self._data[slide_id] = (identity, data)
            while len(self._data) > OPEN_SLIDES * 4:  # the slides looked at last
                self._data.popitem(last=False)
        return data

    def describe(self, slide_id: str) -> dict[str, Any]:
        row = self.row(slide_id)
        opened = self.opened(slide_id)
        data = self.slide_data(slide_id)
        out: dict[str, Any] = {"row": row.record(), "slide_error": opened.error, "colormap": colormap_stops()}
        if opened.reader is not None:
            r = opened.reader
            out["slide"] = {
                "dimensions": list(r.dimensions),
                "mpp": r.mpp,
                "vendor": r.vendor,
                "levels": r.level_count,
                "path": str(r.path),
            }
        if isinstance(data, str):
            out["outputs_error"] = data
        else:
            out["outputs"] = data.describe()
            folder = self.cohort.slide_folder(slide_id)
            names = sorted(p.name for p in folder.iterdir() if SLIDE_FILES.match(p.name)) if folder else []
            out["files"] = names
        return out

    def tile(self, slide_id: str, level: int, col: int, row: int) -> bytes:
        opened = self.opened(slide_id)
        if opened.reader is None or opened.zoom is None:
            raise HTTPException(404, opened.error or "slide unavailable")
        reader, zoom = opened.reader, opened.zoom

        def make() -> bytes:
            try:
                return zoom.tile(reader, level, col, row)
            except TileError as err:
                raise HTTPException(404, str(err)) from err
            except (LoupeError, OSError) as err:
                raise HTTPException(404, f"slide {slide_id}: {describe_error(err)}") from err

        return self.cached(("tile", slide_id, opened.identity, level, col, row), make)

    def dzi(self, slide_id: str) -> str:
        opened = self.opened(slide_id)
        if opened.zoom is None:
            raise HTTPException(404, opened.error or "slide unavailable")
        return opened.zoom.dzi()

    def _outputs_identity(self, slide_id: str) -> tuple[int, int] | None:
        """What a slide's layer images depend on: its ``prediction.json`` as it is now (rewritten last)."""
        folder = self.cohort.slide_folder(slide_id)
        return None if folder is None else _identity(folder / PREDICTION_FILE)

    def _data_or_404(self, slide_id: str) -> SlideData:
        data = self.slide_data(slide_id)
        if isinstance(data, str):
            raise HTTPException(404, data)
        return data

    def layer(self, slide_id: str, index: int) -> bytes:
        data = self._data_or_404(slide_id)
        if not 0 <= index < len(data.layers):
            raise HTTPException(404, f"layer {index} outside 0..{len(data.layers) - 1}")
        lay = data.layers[index]
        key = ("layer", slide_id, self._outputs_identity(slide_id), index)
        return self.cached(key, lambda: attention_png(lay.values, lay.valid, data.vmax))

    def tissue(self, slide_id: str) -> bytes:
        data = self._data_or_404(slide_id)
        layer = data.tissue()
        if layer is None:
            raise HTTPException(404, "no tissue mask: tissue detection was off for this prediction")
        key = ("tissue", slide_id, self._outputs_identity(slide_id))
        return self.cached(key, lambda: tissue_png(layer[0]))

    def patch(self, slide_id: str, cell: int) -> bytes:
        """The cell's patch as the model read it: its level-0 square resampled to the patch side."""
        data = self._data_or_404(slide_id)
        try:
            x, y, w, h = data.cell_rect(cell)
            j, _, _ = data.locate(cell)
        except IndexError as err:
            raise HTTPException(404, str(err)) from err
        opened = self.opened(slide_id)
        if opened.reader is None:
            raise HTTPException(404, opened.error or "slide unavailable")
        side = min(MAX_PATCH_PX, data.layers[j].patch_px)
        try:
            pixels = opened.reader.read_region(x, y, (w, h), (side, side))
        except (LoupeError, OSError, ValueError) as err:
            raise HTTPException(404, f"slide {slide_id}: {describe_error(err)}") from err
        buffer = io.BytesIO()
        Image.fromarray(np.ascontiguousarray(pixels)).save(buffer, format="PNG", compress_level=1)
        return buffer.getvalue()

    def slide_file(self, slide_id: str, name: str) -> Path:
        self.row(slide_id)
        folder = self.cohort.slide_folder(slide_id)
        if folder is None or not SLIDE_FILES.match(name):
            raise HTTPException(404, f"no file {name!r} for slide {slide_id!r}")
        path = folder / name
        try:
            real = path.resolve(strict=True)
        except (OSError, RuntimeError) as err:
            raise HTTPException(404, f"no file {name!r} for slide {slide_id!r}") from err
        if real.parent != folder or not real.is_file():  # a symlink leading out of the slide folder
            raise HTTPException(404, f"no file {name!r} for slide {slide_id!r}")
        return real

    def cohort_page(self, params: dict[str, str]) -> dict[str, Any]:
        sort, descending, filters = _order(params)
        offset = _int(params, "offset", 0, 0, 10**9)
        limit = _int(params, "limit", 100, 1, MAX_PAGE)
        rows = self.cohort.rows()
        try:
            selected = query(rows, sort=sort, descending=descending, filters=filters)
        except ValueError as err:
            raise HTTPException(400, str(err)) from err
        counts: dict[str, int] = {}
        for r in rows:
            counts[r.status] = counts.get(r.status, 0) + 1
        return {
            "title": self.cohort.title,
            "notice": self.cohort.notice,
            "columns": [{"key": k, "title": t, "numeric": n} for k, t, n in COLUMNS],
            "total": len(rows),
            "matched": len(selected),
            "offset": offset,
            "counts": counts,
            "rows": [r.record() for r in selected[offset : offset + limit]],
        }

    def neighbours(self, slide_id: str, params: dict[str, str]) -> dict[str, Any]:
        self.row(slide_id)
        sort, descending, filters = _order(params)
        try:
            ids = [r.slide_id for r in query(self.cohort.rows(), sort=sort, descending=descending, filters=filters)]
        except ValueError as err:
            raise HTTPException(400, str(err)) from err
        if slide_id not in ids:  # filtered out: step through the whole cohort
            ids = [r.slide_id for r in self.cohort.rows()]
        i = ids.index(slide_id)
        return {
            "previous": ids[i - 1] if i > 0 else None,
            "next": ids[i + 1] if i + 1 < len(ids) else None,
            "position": i + 1,
            "total": len(ids),
        }


def _identity(path: Path | None) -> tuple[int, int] | None:
    if path is None:
        return None
    try:
        st = path.stat()
    except OSError:
        return None
    return (st.st_mtime_ns, st.st_size)


def _int(params: dict[str, str], name: str, default: int, low: int, high: int) -> int:
    text = params.get(name)
    if text is None or text == "":
        return default
    try:
        value = int(text)
    except ValueError as err:
        raise HTTPException(400, f"{name}={text!r}: expected an integer") from err
    if not low <= value <= high:
        raise HTTPException(400, f"{name}={value}: expected {low}..{high}")
    return value


def _order(params: dict[str, str]) -> tuple[str | None, bool, dict[str, str]]:
    """sort, descending and the column filters (``f_<column>``) of a query string."""
    sort = params.get("sort") or None
    order = params.get("order", "asc")
    if order not in ("asc", "desc"):
        raise HTTPException(400, f"order={order!r}: expected asc or desc")
    filters = {k[2:]: v for k, v in params.items() if k.startswith("f_")}
    known = {k for k, _, _ in COLUMNS}
    for key in [sort, *filters]:
        if key is not None and key not in known:
            raise HTTPException(400, f"unknown column {key!r}: expected one of {', '.join(sorted(known))}")
    return sort, order == "desc", filters


def create_app(cohort: Cohort, *, cache_bytes: int = CACHE_BYTES, threads: int | None = None) -> Starlette:
    """The viewer of ``cohort`` as an ASGI application."""
    viewer = Viewer(cohort, cache_bytes=cache_bytes, threads=threads)

    def page(name: str) -> Response:
        return FileResponse(STATIC / name, media_type="text/html", headers=SECURITY_HEADERS)

    async def index(request: Request) -> Response:
        return page("cohort.html")

    async def slide_page(request: Request) -> Response:
        await viewer.run(viewer.row, request.path_params["slide_id"])
        return page("slide.html")

    async def cohort_api(request: Request) -> Response:
        return JSONResponse(await viewer.run(viewer.cohort_page, dict(request.query_params)))

    async def neighbours_api(request: Request) -> Response:
        slide_id = request.path_params["slide_id"]
        return JSONResponse(await viewer.run(viewer.neighbours, slide_id, dict(request.query_params)))

    async def slide_api(request: Request) -> Response:
        return JSONResponse(await viewer.run(viewer.describe, request.path_params["slide_id"]))

    async def dzi(request: Request) -> Response:
        text = await viewer.run(viewer.dzi, request.path_params["slide_id"])
        return Response(text, media_type="application/xml")

    async def tile(request: Request) -> Response:
        p = request.path_params
        data = await viewer.run(viewer.tile, p["slide_id"], p["level"], p["col"], p["row"])
        return Response(data, media_type="image/jpeg", headers={"Cache-Control": "private, max-age=3600"})

    async def layer(request: Request) -> Response:
        p = request.path_params
        return Response(await viewer.run(viewer.layer, p["slide_id"], p["index"]), media_type="image/png")

    async def tissue(request: Request) -> Response:
        return Response(await viewer.run(viewer.tissue, request.path_params["slide_id"]), media_type="image/png")

    async def patch(request: Request) -> Response:
        p = request.path_params
        return Response(await viewer.run(viewer.patch, p["slide_id"], p["cell"]), media_type="image/png")

    async def slide_file(request: Request) -> Response:
        p = request.path_params
        path = await viewer.run(viewer.slide_file, p["slide_id"], p["name"])
        return FileResponse(path)

    async def http_error(request: Request, exc: Exception) -> Response:
        assert isinstance(exc, HTTPException)
        if request.url.path.startswith(("/api/", "/dz/", "/files/")):
            return JSONResponse({"error": exc.detail}, status_code=exc.status_code)
        return Response(f"{exc.status_code}: {exc.detail}\n", status_code=exc.status_code, media_type="text/plain")

    routes = [
        Route("/", index),
        Route("/slide/{slide_id}", slide_page),
        Route("/api/cohort", cohort_api),
        Route("/api/cohort/neighbours/{slide_id}", neighbours_api),
        Route("/api/slides/{slide_id}", slide_api),
        Route("/api/slides/{slide_id}/layers/{index:int}.png", layer),
        Route("/api/slides/{slide_id}/tissue.png", tissue),
        Route("/api/slides/{slide_id}/cells/{cell:int}.png", patch),
        Route("/dz/{slide_id}.dzi", dzi),
        Route("/dz/{slide_id}_files/{level:int}/{col:int}_{row:int}.jpeg", tile),
        Route("/files/{slide_id}/{name}", slide_file),
        Mount("/static", StaticFiles(directory=STATIC), name="static"),
    ]
    app = Starlette(routes=routes, exception_handlers={HTTPException: http_error})
    app.state.viewer = viewer
    return app
