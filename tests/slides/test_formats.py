"""The one list of slide suffixes, in groups, and the backend choice made by it."""

from __future__ import annotations

from pathlib import Path

import pytest

from loupe.slides import choose_backend, formats, image_reader, openslide_reader
from loupe.slides import open as open_module

GROUPS = {
    "WSI": formats.WSI_SUFFIXES,
    "TIFF": formats.TIFF_SUFFIXES,
    "DICOM": formats.DICOM_SUFFIXES,
    "IMAGE": formats.IMAGE_SUFFIXES,
}


def test_groups_are_disjoint_lower_case_and_their_union_is_the_slide_suffixes() -> None:
    every = [s for group in GROUPS.values() for s in group]
    assert len(every) == len(set(every))
    assert all(s.startswith(".") and s == s.lower() and len(s) > 1 for s in every)
    assert tuple(every) == formats.SLIDE_SUFFIXES
    assert {".svs", ".ndpi", ".mrxs", ".tif", ".dcm", ".png", ".jpg"} <= set(formats.SLIDE_SUFFIXES)


def test_every_user_takes_the_shared_groups() -> None:
    assert open_module.IMAGE_SUFFIXES is formats.IMAGE_SUFFIXES
    assert open_module.TIFF_SUFFIXES is formats.TIFF_SUFFIXES
    assert image_reader.TIFF_SUFFIXES is formats.TIFF_SUFFIXES
    assert openslide_reader.DICOM_SUFFIXES is formats.DICOM_SUFFIXES


@pytest.mark.parametrize("suffix", formats.IMAGE_SUFFIXES)
def test_plain_images_go_to_the_image_reader(suffix: str) -> None:
    assert choose_backend(Path("x" + suffix.upper())) == "image"


@pytest.mark.parametrize("suffix", formats.WSI_SUFFIXES + formats.DICOM_SUFFIXES)
def test_whole_slide_formats_go_to_openslide(suffix: str) -> None:
    assert choose_backend(Path("x" + suffix)) == "openslide"
