"""Grid geometry: the paper's attention-map sizes, flat indexing, vectorised rectangles, small-image error."""

from __future__ import annotations

import numpy as np
import pytest

from loupe.errors import SlideError
from loupe.slides.grid import build_grid
from loupe.slides.magnification import parse_magnifications


def test_bach_grid_sizes() -> None:
    grid = build_grid((2048, 1536), 0.42, parse_magnifications([1.68, 0.84, 0.42]), 299, "bach.tif")
    # (rows, cols): 2x2, 4x3 and 7x6 as cols x rows
    assert grid.shapes == ((2, 2), (3, 4), (6, 7))
    assert grid.n_cells == 58
    assert grid.offsets == (0, 4, 16)
    assert [g.downsample for g in grid.grids] == pytest.approx([4.0, 2.0, 1.0])


def test_tcga_prad_grid_sizes() -> None:
    grid = build_grid((2000, 2000), 0.42, parse_magnifications([1.68, 0.84, 0.42]), 299, "prad.svs")
    assert grid.shapes == ((2, 2), (4, 4), (7, 7))


def test_ceil_is_guarded_against_float_noise() -> None:
    # 2 * 299 px exactly at a downsample computed with float noise must stay 2 cells, not 3.
    mpp0, mpp = 0.1, 0.3  # 0.3 / 0.1 = 2.9999999999999996
    grid = build_grid(((598 * 3), (299 * 3)), mpp0, parse_magnifications([mpp]), 299, "s")
    assert grid.shapes == ((1, 2),)
    # one pixel more is a new (padded) cell
    grid = build_grid((598 * 3 + 3, 299 * 3), mpp0, parse_magnifications([mpp]), 299, "s")
    assert grid.shapes == ((1, 3),)


def test_downsample_magnifications_need_no_mpp() -> None:
    grid = build_grid((1000, 600), None, parse_magnifications(["ds2", "ds1"]), 100, "s.png")
    assert grid.shapes == ((3, 5), (6, 10))


def test_cell_rect_and_flat_order() -> None:
    grid = build_grid((2048, 1536), 0.42, parse_magnifications([1.68, 0.84, 0.42]), 299, "bach.tif")
    assert grid.cell(0) == (0, 0, 0)
    assert grid.cell(3) == (0, 1, 1)
    assert grid.cell(4) == (1, 0, 0)
    assert grid.cell(4 + 5) == (1, 1, 1)  # 4 columns per row at the middle magnification
    assert grid.cell(57) == (2, 5, 6)
    assert grid.flat_index(1, 1, 1) == 9
    assert grid.grids[1].cell_rect(1, 2) == pytest.approx((2 * 299 * 2.0, 299 * 2.0, 598.0, 598.0))
    with pytest.raises(IndexError):
        grid.cell(58)
    with pytest.raises(IndexError):
        grid.grids[0].cell_rect(2, 0)


def test_cell_rects_vectorised_equals_per_cell() -> None:
    grid = build_grid((2048, 1536), 0.42, parse_magnifications([1.68, 0.84, 0.42]), 299, "bach.tif")
    idx = np.random.default_rng(0).permutation(grid.n_cells)
    rects = grid.cell_rects(idx)
    assert rects.shape == (58, 4)
    expected = []
    for i in idx:
        m, r, c = grid.cell(int(i))
        expected.append(grid.grids[m].cell_rect(r, c))
    np.testing.assert_allclose(rects, np.asarray(expected))
    np.testing.assert_allclose(grid.downsamples(idx), rects[:, 2] / 299)
    mags, rows, cols = grid.cells(idx)
    assert [grid.flat_index(int(m), int(r), int(c)) for m, r, c in zip(mags, rows, cols, strict=True)] == idx.tolist()
    assert grid.cell_rects(np.array([], dtype=np.int64)).shape == (0, 4)


def test_cells_cover_the_image_without_overlap() -> None:
    grid = build_grid((2048, 1536), 0.42, parse_magnifications([1.68, 0.84, 0.42]), 299, "bach.tif")
    for m, g in enumerate(grid.grids):
        idx = np.arange(grid.offsets[m], grid.offsets[m] + g.n_cells)
        r = grid.cell_rects(idx)
        assert r[:, 0].max() < 2048 <= (r[:, 0] + r[:, 2]).max()
        assert r[:, 1].max() < 1536 <= (r[:, 1] + r[:, 3]).max()


def test_image_smaller_than_patch_names_slide_size_and_fix() -> None:
    with pytest.raises(SlideError) as err:
        build_grid((1000, 2000), 0.5, parse_magnifications([2.0]), 299, "/data/small.tif")
    msg = str(err.value)
    assert "/data/small.tif" in msg and "250x500" in msg and "299" in msg
    assert "higher magnification" in msg and "smaller patch_size" in msg


def test_missing_mpp_error_from_grid() -> None:
    with pytest.raises(SlideError, match="--slide-mpp"):
        build_grid((1000, 1000), None, parse_magnifications(["20x"]), 100, "x.svs")
