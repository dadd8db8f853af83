"""Slide URLs: which strings are URLs, what a URL's name is, and that credentials never show."""

from __future__ import annotations

from pathlib import Path

import pytest

from loupe.errors import SlideError
from loupe.slides.urls import SlideURL, as_source, local_only, looks_like_url, redact, redact_text


@pytest.mark.parametrize(
    "text", ["http://h/a.svs", "HTTPS://h/a.svs", "s3://bucket/key/a.svs", "gs://bucket/a.tif", "gcs://b/a.tif"]
)
def test_urls_are_told_from_paths(text):
    assert looks_like_url(text)
    assert isinstance(as_source(text), SlideURL)


@pytest.mark.parametrize("text", ["slides/a.svs", "/abs/a.svs", "C:/a.svs", "ftp://h/a.svs", "http:/h/a.svs", ""])
def test_paths_and_other_schemes_are_not_urls(text):
    assert not looks_like_url(text)
    assert as_source(text) is None


def test_a_url_answers_what_loupe_asks_of_a_path():
    u = SlideURL("https://user:pw@example.org:8443/cohort/TCGA%20A.svs?X-Amz-Signature=abc&v=2")
    assert (u.name, u.stem, u.suffix, u.parent.name) == ("TCGA A.svs", "TCGA A", ".svs", "cohort")
    assert u.scheme == "https" and u.host == "example.org:8443"
    assert SlideURL("gcs://bucket/a.tif").scheme == "gs"


@pytest.mark.parametrize(
    ("url", "secret"),
    [
        ("https://alice:hunter2@example.org/a.svs", "hunter2"),
        ("https://alice:hunter2@example.org/a.svs", "alice"),
        ("https://b.s3.amazonaws.com/a.svs?X-Amz-Credential=AKIAXYZ&X-Amz-Signature=deadbeef", "deadbeef"),
        ("https://b.s3.amazonaws.com/a.svs?X-Amz-Credential=AKIAXYZ&X-Amz-Signature=deadbeef", "AKIAXYZ"),
        ("https://storage.googleapis.com/b/a.svs?X-Goog-Signature=0badc0de", "0badc0de"),
        ("https://acct.blob.core.windows.net/c/a.svs?sv=2020&sig=s3cr3t", "s3cr3t"),
        ("https://h/a.svs?token=tok123&access_key=ak99", "tok123"),
        ("https://h/a.svs?token=tok123&access_key=ak99", "ak99"),
    ],
)
def test_credentials_are_redacted_in_every_shown_form(url, secret):
    u = SlideURL(url)
    for shown in (str(u), repr(u), f"{u}", redact(url), redact_text(f"error fetching {url}: 500"), u.redacted):
        assert secret not in shown
    assert secret not in u.without_credentials()
    assert secret in u.url  # the readers still get the URL as given


def test_redaction_keeps_what_names_the_object():
    u = SlideURL("https://alice:pw@example.org/x/a.svs?v=2&token=t")
    assert str(u) == "https://***@example.org/x/a.svs?v=2&token=***"
    assert u.without_credentials() == "https://example.org/x/a.svs?v=2"
    assert str(SlideURL("s3://bucket/k/a.svs")) == "s3://bucket/k/a.svs"


@pytest.mark.parametrize("bad", ["http://", "http:///a.svs", "s3://bucket", "s3://bucket/", "https://u:p@/a.svs"])
def test_a_url_without_host_or_object_is_refused_with_its_form(bad):
    with pytest.raises(SlideError, match="scheme://"):
        SlideURL(bad)


def test_formats_that_need_local_files_get_one_message():
    with pytest.raises(SlideError, match=r"needs a local file.*copy this slide to local disk"):
        local_only(SlideURL("https://h/a.mrxs"), "auto")
    assert local_only(Path("a.svs"), "auto") == Path("a.svs")
