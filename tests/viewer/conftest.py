"""Fixtures of the viewer's tests: a small predict output folder, the app under Starlette's test client, and the
app served on a loopback port with Debian's Chromium driven by Playwright."""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from .cohort_fixture import build_predict_output

#: Why the tests that serve the app skip without the web parts.
NO_EXTRA = "the viewer's web parts are not installed: pip install 'loupe[viewer]'"

CHROMIUM_NAMES = ("chromium", "chromium-browser")


@pytest.fixture(scope="session")
def predict_out(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_predict_output(tmp_path_factory.mktemp("viewer"))


@pytest.fixture(scope="session")
def client(predict_out: Path) -> Iterator[Any]:
    pytest.importorskip("httpx", reason=NO_EXTRA)
    pytest.importorskip("starlette", reason=NO_EXTRA)
    from starlette.testclient import TestClient

    from loupe.viewer.app import create_app
    from loupe.viewer.cohort import open_cohort

    with TestClient(create_app(open_cohort(predict_out)), raise_server_exceptions=False) as test_client:
        yield test_client


def chromium_path() -> str | None:
    for name in CHROMIUM_NAMES:
        found = shutil.which(name)
        if found:
            return found
    return None


@pytest.fixture(scope="session")
def server_url(predict_out: Path) -> Iterator[str]:
    pytest.importorskip("uvicorn", reason=NO_EXTRA)
    from loupe.viewer.server import background_server

    with background_server(predict_out) as url:
        yield url


@pytest.fixture(scope="session")
def browser() -> Iterator[Any]:
    path = chromium_path()
    if path is None:
        pytest.skip("the browser tests need Chromium: apt-get install chromium")
    sync_api = pytest.importorskip("playwright.sync_api", reason="the browser tests need playwright (loupe[dev])")
    with sync_api.sync_playwright() as playwright:
        chromium = playwright.chromium.launch(executable_path=path, args=["--no-sandbox"])
        yield chromium
        chromium.close()


@pytest.fixture
def page(browser: Any, server_url: str) -> Iterator[Any]:
    context = browser.new_context(viewport={"width": 1200, "height": 800})
    pg = context.new_page()
    pg.set_default_timeout(20_000)
    errors: list[str] = []
    pg.on("pageerror", lambda err: errors.append(str(err)))
    pg.loupe_errors = errors
    yield pg
    context.close()
    assert not errors, f"the page raised: {errors}"
