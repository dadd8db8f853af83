"""Test fixtures for the whole suite: the real slide files kept in tests/fixtures/slides."""

from __future__ import annotations

from pathlib import Path

import pytest

SLIDES_DIR = Path(__file__).resolve().parent / "fixtures" / "slides"


@pytest.fixture(scope="session")
def slides_dir() -> Path:
    """Folder of small real slide files (SVS, TIFF, DICOM, NDPI); fails loudly if absent."""
    assert SLIDES_DIR.is_dir(), f"real test slides not found at {SLIDES_DIR} (they are part of the repository)"
    return SLIDES_DIR


@pytest.fixture(autouse=True, scope="session")
def _private_slide_cache(tmp_path_factory):
    """Keep the per-slide disk cache of the whole test session in a temporary folder, not ~/.cache/loupe."""
    import os

    old = os.environ.get("LOUPE_CACHE_DIR")
    os.environ["LOUPE_CACHE_DIR"] = str(tmp_path_factory.mktemp("slide-cache"))
    yield
    if old is None:
        os.environ.pop("LOUPE_CACHE_DIR", None)
    else:
        os.environ["LOUPE_CACHE_DIR"] = old
