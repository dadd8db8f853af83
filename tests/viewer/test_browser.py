"""The viewer in a real browser: Debian's headless Chromium driven by Playwright, over the app served on loopback.

Skipped only where Chromium is absent (apt-get install chromium); CI installs it (.ci/run).
"""

from __future__ import annotations

import io
import time
from collections.abc import Callable
from typing import Any

import numpy as np
import pytest
from PIL import Image

from loupe.slides import build_grid

from .cohort_fixture import BANDS, HOT_20X, LABELS, MPP, PATCH, H, W, band_colour

pytestmark = pytest.mark.slow  # a browser: a few seconds in all

VIRIDIS_TOP = (253, 231, 37)


def _ids(page: Any) -> list[str]:
    return page.eval_on_selector_all("#rows tr", "rows => rows.map(r => r.dataset.id)")


def _wait(predicate: Callable[[], bool], timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError("timed out waiting for the page")
        time.sleep(0.05)


def _open_slide(page: Any, url: str, slide_id: str = "alpha", query: str = "") -> None:
    page.goto(f"{url}slide/{slide_id}{query}")
    page.wait_for_selector("body[data-tiles=loaded]")
    page.wait_for_selector("body[data-layers=loaded]")


def _screen_point(page: Any, x0: float, y0: float) -> tuple[int, int]:
    """Page pixel of the level-0 point (x0, y0) of the slide."""
    return tuple(
        page.evaluate(
            """([x, y]) => {
                const v = window.loupeViewer, p = v.world.getItemAt(0).imageToViewerElementCoordinates(
                    new OpenSeadragon.Point(x, y));
                const box = v.element.getBoundingClientRect();
                return [Math.round(box.left + p.x), Math.round(box.top + p.y)];
            }""",
            [x0, y0],
        )
    )


def _pixel(page: Any, point: tuple[int, int]) -> np.ndarray:
    shot = np.asarray(Image.open(io.BytesIO(page.screenshot())).convert("RGB")).astype(int)
    x, y = point
    return shot[y - 2 : y + 3, x - 2 : x + 3].reshape(-1, 3).mean(axis=0)


def _settled(page: Any, point: tuple[int, int], close_to: tuple[int, int, int], tol: float = 25) -> np.ndarray:
    """The pixel at ``point`` once it is within ``tol`` of ``close_to`` (the page redraws on its next frames)."""
    seen: list[np.ndarray] = []

    def near() -> bool:
        seen.append(_pixel(page, point))
        return float(np.abs(seen[-1] - close_to).max()) < tol

    try:
        _wait(near, timeout=5)
    except AssertionError:
        raise AssertionError(f"pixel at {point} is {seen[-1]}, expected about {close_to}") from None
    return seen[-1]


def _set_layer(page: Any, key: str, on: bool) -> None:
    box = page.locator(f"input[data-layer='{key}']")
    if box.is_checked() != on:
        box.click()


def _set_opacity(page: Any, percent: int) -> None:
    page.eval_on_selector(
        "#opacity", "(el, v) => { el.value = v; el.dispatchEvent(new Event('input')); }", str(percent)
    )


def test_cohort_page_lists_the_slides_and_sorts(page, server_url):
    page.goto(server_url)
    page.wait_for_selector("#rows tr")
    assert _ids(page) == ["alpha", "beta", "gone", "broken"]
    assert "not a TIFF" in page.inner_text("#rows tr[data-id=broken]")
    assert "wrong" in page.inner_text("#rows tr[data-id=beta]")
    page.click("th[data-key=probability]")
    _wait(lambda: _ids(page) == ["beta", "gone", "alpha", "broken"])
    page.click("th[data-key=probability]")
    _wait(lambda: _ids(page) == ["alpha", "gone", "beta", "broken"])
    assert "sort=probability" in page.url and "order=desc" in page.url
    page.fill("input[name=f_predicted]", "tum")
    _wait(lambda: _ids(page) == ["alpha", "beta"])


def test_slide_page_paints_the_slide_tiles(page, server_url):
    _open_slide(page, server_url)
    for key in (*LABELS, "cells"):
        _set_layer(page, key, False)
    for i, colour in enumerate(BANDS):
        x0 = (i + 0.5) * W / len(BANDS)
        _settled(page, _screen_point(page, x0, H / 4), colour)
        _settled(page, _screen_point(page, x0, H / 2), (255, 255, 255))  # the white line across


def test_layer_toggle_and_opacity_change_the_pixels_where_attention_is_high(page, server_url):
    _open_slide(page, server_url)
    _set_layer(page, "cells", False)
    row, col = HOT_20X
    hot = _screen_point(page, (col + 0.5) * PATCH, (row + 0.5) * PATCH)
    green = band_colour((col + 0.5) * PATCH)
    assert page.locator("input[data-layer='20x']").is_checked()  # the magnification with most attention
    page.mouse.move(*hot)
    value = page.inner_text("#value")  # every magnification's value under the cursor
    assert "20x 0.909" in value and "10x 0.0000909" in value and f"x {(col * PATCH + PATCH // 2)}" in value, value
    _set_opacity(page, 100)
    _settled(page, hot, VIRIDIS_TOP)
    _set_layer(page, "20x", False)
    _settled(page, hot, green)
    _set_layer(page, "20x", True)
    _settled(page, hot, VIRIDIS_TOP)
    _set_opacity(page, 0)
    _settled(page, hot, green)
    _set_opacity(page, 50)
    half = tuple((np.asarray(VIRIDIS_TOP) + green) / 2)
    _settled(page, hot, half, tol=30)


def test_clicking_a_read_cell_shows_its_patch(page, server_url):
    _open_slide(page, server_url)
    grid = build_grid((W, H), MPP, LABELS, PATCH, "alpha")
    cell = grid.flat_index(2, *HOT_20X)
    page.click(f".cell-outline[data-cell='{cell}']")
    page.wait_for_selector("#patch-box:not([hidden])")
    page.wait_for_function("() => document.getElementById('patch').naturalWidth > 0")
    assert page.evaluate("document.getElementById('patch').naturalWidth") == PATCH
    meta = page.inner_text("#patch-meta")
    assert "20x" in meta and f"{PATCH} × {PATCH} px" in meta
    x, y = col_row_to_xy(*HOT_20X)
    assert f"x {x}, y {y}" in meta and "µm" in meta


def col_row_to_xy(row: int, col: int) -> tuple[int, int]:
    return col * PATCH, row * PATCH


def test_keyboard_steps_through_the_cohort_in_its_current_order(page, server_url):
    _open_slide(page, server_url, query="?sort=probability&order=desc")
    page.wait_for_function("() => document.getElementById('position').textContent === '1 / 4'")
    page.click("#viewer")  # the keys work with the viewer focused too
    page.keyboard.press("n")
    page.wait_for_url("**/slide/gone?*")
    assert "sort=probability" in page.url
    page.wait_for_function("() => document.getElementById('position').textContent === '2 / 4'")
    page.keyboard.press("p")
    page.wait_for_url("**/slide/alpha?*")


def test_the_url_names_the_viewport(page, server_url):
    _open_slide(page, server_url, query="?x=0.3&y=0.2&z=3")
    centre = page.evaluate("(() => { const c = window.loupeViewer.viewport.getCenter(); return [c.x, c.y]; })()")
    assert centre == pytest.approx([0.3, 0.2], abs=1e-3)
    assert page.evaluate("window.loupeViewer.viewport.getZoom()") == pytest.approx(3, rel=1e-3)
    page.evaluate("window.loupeViewer.viewport.zoomBy(2)")
    page.wait_for_function("() => new URLSearchParams(location.search).get('z') === '6.0000'")


def test_a_missing_slide_file_shows_its_error_on_its_page(page, server_url):
    page.goto(f"{server_url}slide/gone")
    page.wait_for_selector("body[data-ready='1']")
    assert "slide not found" in page.inner_text("#errors")
    assert page.inner_text("#prediction").startswith("benign")


def test_unknown_ids_and_traversal_are_404(page, server_url):
    for path in ("slide/nope", "slide/%2e%2e%2fstatus.json", "slide/..%2F..%2Fetc%2Fpasswd", "dz/..%2Fstatus.json"):
        response = page.goto(server_url + path)
        assert response is not None and response.status == 404, path


def test_the_pages_request_nothing_outside_the_server(page, server_url):
    requests: list[str] = []
    page.on("request", lambda request: requests.append(request.url))
    page.goto(server_url)
    page.wait_for_selector("#rows tr")
    page.click("#rows tr[data-id=alpha] a")
    page.wait_for_selector("body[data-tiles=loaded]")
    page.click(".cell-outline >> nth=0")
    page.wait_for_selector("#patch-box:not([hidden])")
    outside = [u for u in requests if not (u.startswith(server_url) or u.startswith("data:"))]
    assert requests and not outside, outside
