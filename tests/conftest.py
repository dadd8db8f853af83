"""Shared test fixtures: the real slide files beside the project (../shared/data/slides)."""

from __future__ import annotations

from pathlib import Path

import pytest

PROJECT_ROOT = Path(__file__).resolve().parents[1]
SLIDES_DIR = PROJECT_ROOT.parent / "shared" / "data" / "slides"


@pytest.fixture(scope="session")
def slides_dir() -> Path:
    """Folder of small real slide files (SVS, TIFF, DICOM, NDPI); fails loudly if absent."""
    assert SLIDES_DIR.is_dir(), f"real test slides not found at {SLIDES_DIR}"
    return SLIDES_DIR
