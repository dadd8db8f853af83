"""Whole images for StreamingCLAM: the grid-aligned region of a slide at one magnification, cropped to tissue."""

from __future__ import annotations

import numpy as np
import pytest

from loupe.data.catalog import SlideCatalog
from loupe.data.manifest import load_manifest
from loupe.data.synthetic import SyntheticSpec, generate_dataset
from loupe.data.whole_image import WholeImageReader, tissue_box
from loupe.errors import SlideError

SPEC = SyntheticSpec(image_size=200, splits={"train": 2})  # 200 px: not a multiple of the 32 px cell


@pytest.fixture(scope="module")
def catalog(tmp_path_factory):
    records = load_manifest(generate_dataset(tmp_path_factory.mktemp("whole"), SPEC)).records
    cat = SlideCatalog(records, ("0.5",), 32, thumbnail_size=(32, 32))
    yield cat
    cat.close()


def test_the_whole_grid_is_read_and_padded_white(catalog):
    reader = WholeImageReader(catalog, threads=2, crop_to_tissue=False, chunk_cells=3)  # several chunks
    whole = reader(0)
    assert whole.image.shape == (1, 3, 7 * 32, 7 * 32) and whole.box == (0, 0, 7, 7)
    pixels = whole.image[0].permute(1, 2, 0).numpy()
    expected = catalog.reader(0).read_region(0, 0, (200, 200), (200, 200))
    assert np.array_equal(pixels[:200, :200], expected)
    assert (pixels[200:] == 255).all() and (pixels[:, 200:] == 255).all()
    assert whole.keep.shape == (7, 7) and bool(whole.keep.all())
    assert reader.seconds > 0
    reader.close()


def test_crop_to_the_tissue_box(catalog):
    valid = np.zeros((7, 7), dtype=bool)
    valid[2, 3] = valid[4, 1] = True
    reader = WholeImageReader(catalog, threads=2, crop_to_tissue=True)
    whole = reader(1, valid.reshape(-1))
    assert whole.box == (2, 1, 5, 4)
    assert whole.image.shape == (1, 3, 3 * 32, 3 * 32)
    assert whole.keep.tolist() == valid[2:5, 1:4].tolist()
    full = WholeImageReader(catalog, threads=1, crop_to_tissue=False)(1).image
    assert np.array_equal(whole.image.numpy(), full[:, :, 2 * 32 : 5 * 32, 1 * 32 : 4 * 32].numpy())
    reader.close()


def test_no_tissue_is_a_clear_error():
    with pytest.raises(SlideError, match="no tissue"):
        tissue_box(np.zeros((3, 4), dtype=bool))
