"""Faults injected at a real nginx on 127.0.0.1: a server that goes away and comes back, one answering 502 for a
while, one gone for good, a truncated object. Retried ones recover; the others fail the slide in bounded time."""

from __future__ import annotations

import shutil
import threading
import time

import numpy as np
import pytest

from loupe.errors import SlideError
from loupe.slides import open_slide
from loupe.slides.remote import forget_identities

from ..helpers.nginx import Nginx, nginx_available

pytestmark = pytest.mark.skipif(not nginx_available(), reason="nginx is not installed (.ci/run installs it)")
pytest.importorskip("aiohttp")

NAME = "cmu-1-small-region-pyramid.svs"
REGION = (1200, 900, (299, 299), (299, 299))


@pytest.fixture
def www(slides_dir, tmp_path, monkeypatch):
    monkeypatch.setenv("LOUPE_REMOTE_BLOCK", str(16 * 1024))  # small blocks: the region's tiles are fetched later
    monkeypatch.setattr("loupe.slides.remote.BACKOFF_S", 0.1)
    forget_identities()
    root = tmp_path / "www"
    root.mkdir()
    shutil.copy(slides_dir / NAME, root / NAME)
    return root


def _expected(slides_dir):
    with open_slide(slides_dir / NAME, backend="tiffslide") as local:
        return local.read_region(*REGION)


def test_a_server_that_goes_away_and_comes_back_is_retried(www, slides_dir, tmp_path):
    server = Nginx(www, tmp_path / "nginx").start()
    try:
        with open_slide(f"{server.url}/{NAME}") as remote:
            server.stop()  # the kept-alive connection drops, new ones are refused...
            threading.Timer(0.3, server.start).start()  # ...until it is back, within the retries' backoff
            np.testing.assert_array_equal(remote.read_region(*REGION), _expected(slides_dir))
    finally:
        time.sleep(0.4)
        server.stop()


def test_server_errors_are_retried_until_the_server_recovers(www, slides_dir, tmp_path):
    good = Nginx(www, tmp_path / "good").start()
    port = good.port
    with open_slide(f"{good.url}/{NAME}") as remote:
        good.stop()
        bad = Nginx(www, tmp_path / "bad", extra="location / { return 502; }", port=port).start()

        def recover() -> None:
            bad.stop()
            good.start()

        threading.Timer(0.3, recover).start()
        try:
            np.testing.assert_array_equal(remote.read_region(*REGION), _expected(slides_dir))
            assert any(r[0] == 502 for r in bad.requests())  # it did answer 502 first
        finally:
            time.sleep(0.4)
            good.stop()


def test_a_server_gone_for_good_fails_the_slide_after_bounded_retries(www, tmp_path, monkeypatch):
    monkeypatch.setenv("LOUPE_REMOTE_RETRIES", "2")
    server = Nginx(www, tmp_path / "nginx").start()
    with open_slide(f"http://u:pw@127.0.0.1:{server.port}/{NAME}") as remote:
        server.stop()
        start = time.monotonic()
        with pytest.raises(SlideError, match=r"could not be read over the network .*after 2 retries") as info:
            remote.read_region(*REGION)
        assert time.monotonic() - start < 5  # 0.1 + 0.2 s of backoff, and the region's other tiles fail at once
    assert f"127.0.0.1:{server.port}/{NAME}" in str(info.value) and "pw" not in str(info.value)


def test_a_truncated_object_fails_the_slide_with_a_message(www, tmp_path):
    data = (www / NAME).read_bytes()
    (www / "truncated.svs").write_bytes(data[: len(data) // 3])  # the header is whole, most tiles are missing
    match = r"truncated\.svs: .*(truncated or damaged|damaged or truncated)"
    with Nginx(www, tmp_path / "nginx") as server:
        remote = open_slide(f"{server.url}/truncated.svs")
        try:
            with pytest.raises(SlideError, match=match):
                remote.read_region(1500, 2500, (600, 400), (300, 200))
        finally:
            remote.close()
