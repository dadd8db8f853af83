"""Slides read by URL from a real nginx on 127.0.0.1 (HTTP range requests through fsspec + tiffslide)."""

from __future__ import annotations

import os
import shutil

import numpy as np
import pytest

from loupe.data.manifest import load_manifest, save_manifest
from loupe.errors import ConfigError, SlideError
from loupe.slides import describe_slide, open_slide
from loupe.slides.cache import cache_key, file_identity
from loupe.slides.remote import RemoteTiffReader, forget_identities
from loupe.slides.urls import SlideURL

from ..helpers.nginx import Nginx, nginx_available

pytestmark = pytest.mark.skipif(not nginx_available(), reason="nginx is not installed (.ci/run installs it)")
pytest.importorskip("aiohttp")

SLIDES = ("cmu-1-small-region-pyramid.svs", "cmu-1-small-region-pyramid-generic.tif")


@pytest.fixture(scope="module")
def served(slides_dir, tmp_path_factory):
    """nginx serving a private copy of two fixture slides (tests may rewrite the copies)."""
    root = tmp_path_factory.mktemp("www")
    for name in SLIDES:
        shutil.copy(slides_dir / name, root / name)
    with Nginx(root, tmp_path_factory.mktemp("nginx")) as server:
        yield server, root


@pytest.mark.parametrize("name", SLIDES)
def test_a_slide_read_by_url_gives_the_local_files_pixels(served, slides_dir, name):
    server, _ = served
    with open_slide(f"{server.url}/{name}") as remote, open_slide(slides_dir / name, backend="tiffslide") as local:
        assert isinstance(remote, RemoteTiffReader)
        assert remote.level_dimensions == local.level_dimensions and remote.mpp == local.mpp
        assert remote.vendor == local.vendor
        for rect, out in [
            ((500, 600, 600, 600), (300, 300)),
            ((0, 0, 2220, 2967), (111, 148)),
            ((2000, 2800, 400, 400), (64, 64)),
        ]:
            x, y, w, h = rect
            np.testing.assert_array_equal(remote.read_region(x, y, (w, h), out), local.read_region(x, y, (w, h), out))
        np.testing.assert_array_equal(remote.thumbnail((120, 160)), local.thumbnail((120, 160)))


def test_reads_are_ranged_and_fewer_bytes_than_the_file(served, monkeypatch):
    server, root = served
    monkeypatch.setenv("LOUPE_REMOTE_BLOCK", str(16 * 1024))  # blocks in proportion to this 1.7 MB file
    before = len(server.requests())
    with open_slide(f"{server.url}/{SLIDES[0]}") as remote:
        remote.read_region(100, 100, (299, 299), (299, 299))
    new = server.requests()[before:]
    gets = [r for r in new if r[2] == "GET"]
    assert gets and all(r[0] == 206 and r[4].startswith("bytes=") for r in gets)  # never the whole object
    assert sum(r[1] for r in new) < (root / SLIDES[0]).stat().st_size / 8


def test_a_missing_object_fails_naming_the_redacted_url_and_404(served):
    server, _ = served
    url = f"http://alice:hunter2@127.0.0.1:{server.port}/nope.svs"
    with pytest.raises(SlideError) as info:
        open_slide(url)
    message = str(info.value)
    assert "404" in message and f"127.0.0.1:{server.port}/nope.svs" in message
    assert "hunter2" not in message and "alice" not in message


@pytest.mark.parametrize(
    ("name", "backend"), [("a.mrxs", "auto"), ("a.vms", "auto"), ("a.png", "auto"), (SLIDES[0], "openslide")]
)
def test_a_format_or_backend_that_needs_local_files_gets_one_message(served, name, backend):
    server, _ = served
    with pytest.raises(SlideError, match=r"needs a local file.*copy this slide to local disk"):
        open_slide(f"{server.url}/{name}", backend=backend)


def test_cache_key_follows_the_objects_etag_not_the_credentials(served):
    server, root = served
    name = SLIDES[1]
    forget_identities()
    plain = SlideURL(f"{server.url}/{name}")
    with_user = SlideURL(f"http://bob:pw@127.0.0.1:{server.port}/{name}")
    ident = file_identity(plain)
    assert ident["etag"] and ident["size"] == (root / name).stat().st_size
    assert "pw" not in str(file_identity(with_user)) and "bob" not in str(file_identity(with_user))
    key = cache_key("thumbnail", plain, {"size": 64})
    assert cache_key("thumbnail", with_user, {"size": 64}) == key
    st = (root / name).stat()
    os.utime(root / name, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))  # the object changes: nginx's ETag too
    forget_identities()
    assert cache_key("thumbnail", plain, {"size": 64}) != key


def test_info_describes_a_slide_by_url(served):
    server, _ = served
    desc = describe_slide(f"http://u:secret@127.0.0.1:{server.port}/{SLIDES[0]}", magnifications=["5x", "20x"])
    assert desc["dimensions"] == (2220, 2967) and desc["backend"] == "RemoteTiffReader"
    assert "secret" not in desc["path"] and desc["path"].endswith(SLIDES[0])


def test_manifests_take_urls_and_write_them_redacted(tmp_path):
    csv = tmp_path / "cohort.csv"
    csv.write_text("path,label\nhttps://u:pw@h.org/c/TCGA-1.svs,a\ns3://bucket/c/TCGA-2.tif,b\n")
    manifest = load_manifest(csv)  # URLs are not checked for existence when read: the slide's open reports them
    assert [r.slide_id for r in manifest.records] == ["TCGA-1", "TCGA-2"]
    assert all(isinstance(r.path, SlideURL) for r in manifest.records)
    assert manifest.records[0].path.url == "https://u:pw@h.org/c/TCGA-1.svs"
    written = save_manifest(manifest, tmp_path / "copy.csv").read_text()
    assert "pw" not in written and "https://***@h.org/c/TCGA-1.svs" in written and "s3://bucket/c/TCGA-2.tif" in written


def test_a_server_that_stalls_fails_the_slide_after_the_timeout(monkeypatch):
    """A listening socket that never answers: the read gives up after $LOUPE_REMOTE_TIMEOUT, never hangs."""
    import socket
    import time

    monkeypatch.setenv("LOUPE_REMOTE_TIMEOUT", "0.5")
    forget_identities()
    with socket.socket() as stall:
        stall.bind(("127.0.0.1", 0))
        stall.listen(8)  # connections are queued by the kernel, never accepted nor answered
        port = stall.getsockname()[1]
        start = time.monotonic()
        with pytest.raises(SlideError, match=rf"127\.0\.0\.1:{port}/a\.svs: the server did not answer within 0.5 s"):
            open_slide(f"http://u:pw@127.0.0.1:{port}/a.svs")
        assert time.monotonic() - start < 10


def test_a_server_error_fails_the_slide_naming_the_url_and_status(slides_dir, tmp_path, monkeypatch):
    monkeypatch.setenv("LOUPE_REMOTE_RETRIES", "1")  # a 5xx is retried (tests/slides/test_remote_faults.py)
    monkeypatch.setattr("loupe.slides.remote.BACKOFF_S", 0.05)
    extra = "location /broken/ { return 500; } location /denied/ { return 403; }"
    with Nginx(tmp_path, tmp_path / "nginx", extra=extra) as server:
        for where, status in (("broken", "500"), ("denied", "403")):
            with pytest.raises(SlideError) as info:
                open_slide(f"http://u:pw@127.0.0.1:{server.port}/{where}/a.svs")
            assert status in str(info.value) and f"/{where}/a.svs" in str(info.value) and "pw" not in str(info.value)


@pytest.mark.parametrize(("url", "extra"), [("s3://bucket/k/a.svs", "s3"), ("gs://bucket/k/a.svs", "gcs")])
def test_object_store_urls_without_their_filesystem_name_the_extra(url, extra, monkeypatch):
    import sys

    for module in ("s3fs", "gcsfs"):  # as on a machine without them
        monkeypatch.setitem(sys.modules, module, None)
    with pytest.raises(ConfigError, match=rf"{url.split(':')[0]}:// slides needs the optional extra.*loupe\[{extra}\]"):
        open_slide(url)


def test_a_second_open_with_a_slide_cache_asks_the_server_for_no_header_bytes(served, tmp_path):
    """The byte ranges tifffile read while opening are kept in the slide cache (keyed by the URL and ETag): the
    next open asks only for the object's identity, and a region read then asks only for its tiles."""
    from loupe.slides.cache import SlideCache

    server, _ = served
    cache = SlideCache(tmp_path / "cache")
    url = f"{server.url}/{SLIDES[0]}"
    forget_identities()
    with open_slide(url, cache=cache) as first:
        expected = first.read_region(500, 600, (300, 300), (300, 300))
    forget_identities()
    before = len(server.requests())
    with open_slide(url, cache=cache) as again:
        opened = server.requests()[before:]
        np.testing.assert_array_equal(again.read_region(500, 600, (300, 300), (300, 300)), expected)
    assert [r[2] for r in opened] == ["HEAD"]
    assert all(r[2] == "GET" and r[1] < 100_000 for r in server.requests()[before + 1 :])
