"""SlideCatalog: grids of a generated dataset, lazy readers, and one error listing every unusable slide."""

from __future__ import annotations

import pickle
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from loupe.data.catalog import SlideCatalog
from loupe.data.manifest import SlideRecord, load_manifest
from loupe.datasets.synthetic import SyntheticSpec, generate_dataset, write_tiff
from loupe.errors import LoupeError, SlideError

SPEC = SyntheticSpec(image_size=128, splits={"train": 4, "val": 2, "test": 2})
MAGS = ("2.0", "1.0", "0.5")


@pytest.fixture(scope="module")
def records(tmp_path_factory) -> tuple[SlideRecord, ...]:
    manifest = load_manifest(generate_dataset(tmp_path_factory.mktemp("catalog"), SPEC))
    return manifest.records


def test_grids_follow_the_magnifications(records):
    catalog = SlideCatalog(records, MAGS, SPEC.patch_size)
    assert len(catalog) == 8
    grid = catalog.grid(0)
    assert grid.shapes == ((1, 1), (2, 2), (4, 4))  # 128 px at 0.5 µm/px: 32, 64 and 128 px at 2, 1, 0.5 µm/px
    assert grid.n_cells == 21
    assert catalog.grid(0) is grid  # built once
    assert catalog.reader(3) is catalog.reader(3)  # opened once
    assert catalog.reader(3).path == records[3].path
    assert catalog.check() == []
    catalog.require_all()
    catalog.close()


def test_slide_mpp_fills_in_and_the_manifest_mpp_column_overrides(records, tmp_path):
    # The files say 0.5 µm/px: a run-wide slide_mpp of 1.0 does not replace what a file records...
    catalog = SlideCatalog(records, MAGS, SPEC.patch_size, slide_mpp=1.0)
    assert catalog.grid(0).shapes == ((1, 1), (2, 2), (4, 4))
    # ... a per-slide manifest mpp does ...
    own = [replace(records[0], mpp=1.0), *records[1:]]
    catalog = SlideCatalog(own, MAGS, SPEC.patch_size, slide_mpp=0.25)
    assert catalog.mpp_of(0) == {"override": 1.0, "fallback": 0.25}
    assert catalog.grid(0).shapes == ((2, 2), (4, 4), (8, 8))
    assert catalog.grid(1).shapes == ((1, 1), (2, 2), (4, 4))
    # ... and slide_mpp is used by a file without resolution.
    bare = tmp_path / "bare.png"
    Image.open(records[0].path).convert("RGB").save(bare)
    nompp = [replace(records[0], path=bare, slide_id="bare")]
    assert SlideCatalog(nompp, MAGS, SPEC.patch_size, slide_mpp=1.0).grid(0).shapes == ((2, 2), (4, 4), (8, 8))


def test_require_all_lists_every_unusable_slide_in_one_error(records, tmp_path: Path):
    corrupt = tmp_path / "corrupt.tif"
    corrupt.write_bytes(b"this is not a tiff" * 20)
    small = tmp_path / "small.tif"
    write_tiff(small, np.full((40, 40, 3), 200, np.uint8), mpp=0.5)  # 10 px at 2 µm/px: no 32 px patch fits
    bad = [
        SlideRecord("missing_one", tmp_path / "nowhere.tif", "horizontal"),
        SlideRecord("corrupt_one", corrupt, "vertical"),
        SlideRecord("small_one", small, "vertical"),
    ]
    catalog = SlideCatalog([records[0], bad[0], records[1], bad[1], bad[2]], MAGS, SPEC.patch_size)
    problems = catalog.check()
    assert [p.record.slide_id for p in problems] == ["missing_one", "corrupt_one", "small_one"]
    assert "not found" in problems[0].reason
    assert "smaller than one 32x32 patch" in problems[2].reason

    with pytest.raises(SlideError) as info:
        catalog.require_all()
    message = str(info.value)
    assert message.startswith("3 of 5 slides cannot be used")
    for rec in bad:
        assert rec.slide_id in message and str(rec.path) in message
    assert records[0].slide_id not in message and records[1].slide_id not in message


def test_catalog_pickles_without_open_readers(records):
    catalog = SlideCatalog(records, MAGS, SPEC.patch_size)
    before = catalog.reader(0).read_region(0, 0, (64, 64), (32, 32))
    clone = pickle.loads(pickle.dumps(catalog))
    assert clone._readers == {}
    assert clone.grid(0).shapes == catalog.grid(0).shapes
    assert np.array_equal(clone.reader(0).read_region(0, 0, (64, 64), (32, 32)), before)
    assert clone.reader(0) is not catalog.reader(0)


def test_thumbnail_size_must_be_width_and_height(records):
    catalog = SlideCatalog(records, MAGS, SPEC.patch_size, thumbnail_size=[48.0, 32])
    assert catalog.preparer.settings.thumbnail_size == (48, 32)
    with pytest.raises(LoupeError, match=r"thumbnail_size must be \(width, height\), got \(48, 32, 3\)"):
        SlideCatalog(records, MAGS, SPEC.patch_size, thumbnail_size=(48, 32, 3))
