"""s3:// slides through fsspec + s3fs, against moto's S3 **server mode** on 127.0.0.1.

No real S3 server is installable here, so moto (a faithful S3 emulator run as an HTTP server on loopback) is the
endpoint; s3fs talks to it over HTTP exactly as to AWS, found through the standard ``AWS_ENDPOINT_URL`` and
credential variables. gs:// goes through the same fsspec code path (gcsfs); without a GCS server here it is tested
for URL handling and redaction (tests/slides/test_urls.py) and the missing-extra message (test_remote.py).
"""

from __future__ import annotations

import numpy as np
import pytest

from loupe.errors import SlideError
from loupe.slides import open_slide
from loupe.slides.cache import cache_key, file_identity
from loupe.slides.remote import _fs_path, forget_identities
from loupe.slides.urls import SlideURL

from ..helpers.nginx import free_port

s3fs = pytest.importorskip("s3fs")
moto_server = pytest.importorskip("moto.server")

NAME = "cmu-1-small-region-pyramid.svs"


@pytest.fixture(scope="module")
def bucket(slides_dir):
    """A moto S3 server on 127.0.0.1 holding one fixture slide at s3://slides/cohort/<NAME>."""
    port = free_port()
    server = moto_server.ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    with pytest.MonkeyPatch.context() as mp:
        for key, value in {
            "AWS_ACCESS_KEY_ID": "testing",
            "AWS_SECRET_ACCESS_KEY": "testing",
            "AWS_DEFAULT_REGION": "us-east-1",
            "AWS_ENDPOINT_URL": f"http://127.0.0.1:{port}",
        }.items():
            mp.setenv(key, value)
        fs = s3fs.S3FileSystem(skip_instance_cache=True)
        fs.mkdir("slides")
        fs.put(str(slides_dir / NAME), f"slides/cohort/{NAME}")
        forget_identities()
        try:
            yield fs
        finally:
            server.stop()
            forget_identities()


def test_an_s3_slide_gives_the_local_files_pixels(bucket, slides_dir):
    with (
        open_slide(f"s3://slides/cohort/{NAME}") as remote,
        open_slide(slides_dir / NAME, backend="tiffslide") as local,
    ):
        assert remote.level_dimensions == local.level_dimensions and remote.mpp == local.mpp
        np.testing.assert_array_equal(
            remote.read_region(700, 900, (598, 598), (299, 299)), local.read_region(700, 900, (598, 598), (299, 299))
        )
        np.testing.assert_array_equal(remote.thumbnail((100, 134)), local.thumbnail((100, 134)))


def test_an_s3_objects_cache_key_follows_its_etag(bucket, slides_dir, tmp_path):
    url = SlideURL(f"s3://slides/cohort/{NAME}")
    forget_identities()
    ident = file_identity(url)
    assert ident["etag"] and ident["size"] == (slides_dir / NAME).stat().st_size
    key = cache_key("header", url, {})
    changed = tmp_path / NAME
    changed.write_bytes((slides_dir / NAME).read_bytes() + b"\0")  # another object under the same key
    bucket.put(str(changed), f"slides/cohort/{NAME}")
    forget_identities()
    try:
        assert cache_key("header", url, {}) != key
    finally:
        bucket.put(str(slides_dir / NAME), f"slides/cohort/{NAME}")
        forget_identities()


def test_a_missing_s3_object_fails_with_its_url_and_404(bucket):
    with pytest.raises(SlideError, match=r"s3://slides/cohort/missing\.svs not found on the server \(HTTP 404\)"):
        open_slide("s3://slides/cohort/missing.svs")


def test_object_store_urls_name_bucket_and_key_for_fsspec():
    assert _fs_path(SlideURL("s3://bucket/a/b.svs")) == "bucket/a/b.svs"
    assert _fs_path(SlideURL("gs://bucket/a/b.svs")) == "bucket/a/b.svs"
    assert _fs_path(SlideURL("https://h/a/b.svs?x=1")) == "https://h/a/b.svs?x=1"
