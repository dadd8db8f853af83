"""OpenSlide backend on the real shared slide files."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import openslide
import pytest

from loupe.errors import SlideError
from loupe.slides import OpenSlideReader, build_grid, open_slide, parse_magnifications

PYRAMID = "cmu-1-small-region-pyramid.svs"


@pytest.mark.parametrize(
    ("name", "vendor", "levels", "mpp"),
    [
        ("cmu-1-small-region.svs", "aperio", 1, 0.499),
        (PYRAMID, "aperio", 4, 0.499),
        ("cmu-1-small-region-pyramid-generic.tif", "generic-tiff", 4, 0.499),
        ("dicom-cmu-1-small-region", "dicom", 12, 0.499),
        ("dicom-cmu-1-small-region/level-4-frames-0-1.dcm", "dicom", 12, 0.499),
        ("fluorescence-dapi-40x.ndpi", "hamamatsu", 7, 0.228),
        ("tcga-cr-7395-01a-01-ts1.svs", "aperio", 2, None),
    ],
)
def test_real_files_open_and_report_levels(
    slides_dir: Path, name: str, vendor: str, levels: int, mpp: float | None
) -> None:
    with open_slide(slides_dir / name) as s:
        assert isinstance(s, OpenSlideReader)
        assert s.vendor == vendor
        assert len(s.level_dimensions) == levels == len(s.level_downsamples)
        assert s.level_downsamples[0] == 1.0
        assert s.dimensions == s.level_dimensions[0]
        assert all(a > b for a, b in zip(s.level_downsamples[1:], s.level_downsamples[:-1], strict=True))
        if mpp is None:
            assert s.mpp is None
        else:
            assert s.mpp == pytest.approx(mpp, abs=1e-3)


def test_known_dimensions_and_objective(slides_dir: Path) -> None:
    with open_slide(slides_dir / PYRAMID) as s:
        assert s.level_dimensions[0] == (2220, 2967)
        assert s.level_dimensions[-1] == (277, 370)
        assert s.objective_power == 20.0
    with open_slide(slides_dir / "fluorescence-dapi-40x.ndpi") as s:
        assert s.dimensions == (3968, 4864)
        assert s.objective_power == 40.0
        assert s.level_downsamples == (1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0)
    with open_slide(slides_dir / "tcga-cr-7395-01a-01-ts1.svs") as s:
        assert s.level_dimensions == ((4443, 3567), (2221, 1783))
        assert s.objective_power is None


def test_pyramid_region_at_1um_reads_level_1(slides_dir: Path) -> None:
    with open_slide(slides_dir / PYRAMID) as s:
        ds = parse_magnifications([1.0])[0].downsample_for(s.mpp, s.path)
        assert ds == pytest.approx(2.004, abs=1e-3)
        assert s.best_level(ds) == 1
        assert s.best_level(1.0) == 0
        assert s.best_level(2.0) == 1  # level 1 is 2.0003: within tolerance
        assert s.best_level(4.0) == 2
        assert s.best_level(8.0) == 3  # level 3 is 8.017 (odd sizes): within tolerance
        assert s.best_level(3.9) == 1  # but a clearly finer request never reads a coarser level
        assert s.best_level(100.0) == 3
        x, y = 400.0, 600.0
        patch = s.read_region(x, y, (256 * ds, 256 * ds), (256, 256))
        assert patch.shape == (256, 256, 3) and patch.dtype == np.uint8
        lds = s.level_downsamples[1]
        raw = openslide.OpenSlide(str(s.path))
        try:
            direct = np.asarray(raw.read_region((round(x), round(y)), 1, (256, 256)).convert("RGB"), dtype=np.int16)
        finally:
            raw.close()
        assert round(x / lds) == 200
        assert np.abs(patch.astype(np.int16) - direct).mean() < 3.0
        # and it is not simply level 0 pixels: a level-0 read of the same origin differs a lot
        level0_view = s.read_region(x, y, (256, 256), (256, 256)).astype(np.int16)
        assert np.abs(level0_view - direct).mean() > 3 * np.abs(patch.astype(np.int16) - direct).mean()


def test_out_of_bounds_is_white(slides_dir: Path) -> None:
    with open_slide(slides_dir / "cmu-1-small-region.svs") as s:
        w = s.dimensions[0]
        assert (s.read_region(-500, -500, (200, 200), (50, 50)) == 255).all()
        assert (s.read_region(w + 10, 0, (64, 64), (32, 32)) == 255).all()
        half = s.read_region(-100, 1000, (200, 200), (100, 100))
        assert (half[:, :49] == 255).all()
        assert (half[:, 51:] < 250).any()  # tissue/background pixels from inside the slide


def test_read_regions_matches_read_region(slides_dir: Path) -> None:
    with open_slide(slides_dir / PYRAMID) as s:
        rects = np.array([[0, 0, 512, 512], [1000, 1500, 300, 300], [2100, 2900, 400, 400]], dtype=float)
        out = s.read_regions(rects, (64, 48))
        assert out.shape == (3, 48, 64, 3) and out.dtype == np.uint8
        for i, (x, y, w0, h0) in enumerate(rects):
            np.testing.assert_array_equal(out[i], s.read_region(x, y, (w0, h0), (64, 48)))


def test_concurrent_reads_equal_sequential(slides_dir: Path) -> None:
    with open_slide(slides_dir / PYRAMID) as s:
        grid = build_grid(s.dimensions, s.mpp, parse_magnifications([2.0, 1.0]), 128, s.path)
        rects = grid.cell_rects(np.arange(grid.n_cells))
        sequential = [s.read_region(*r[:2], tuple(r[2:]), (128, 128)) for r in rects]
        with ThreadPoolExecutor(8) as pool:
            parallel = list(pool.map(lambda r: s.read_region(*r[:2], tuple(r[2:]), (128, 128)), rects))
        for a, b in zip(sequential, parallel, strict=True):
            np.testing.assert_array_equal(a, b)


def test_thumbnail_exact_size_and_content(slides_dir: Path) -> None:
    with open_slide(slides_dir / PYRAMID) as s:
        assert s._thumbnail_level((299, 224)) == 2  # 555x741 is the smallest level >= 299x224
        assert s._thumbnail_level((300, 400)) == 2
        assert s._thumbnail_level((5000, 5000)) == 0
        thumb = s.thumbnail((299, 224))
        assert thumb.shape == (224, 299, 3) and thumb.dtype == np.uint8
        # the thumbnail agrees with a coarse full-image read
        whole = s.read_region(0, 0, s.dimensions, (299, 224)).astype(np.int16)
        assert np.abs(thumb.astype(np.int16) - whole).mean() < 4.0


def test_tcga_crop_needs_mpp_and_works_with_override(slides_dir: Path) -> None:
    path = slides_dir / "tcga-cr-7395-01a-01-ts1.svs"
    mags = parse_magnifications([1.0, 0.5])
    with open_slide(path) as s, pytest.raises(SlideError) as err:
        build_grid(s.dimensions, s.mpp, mags, 256, s.path)
    assert "--slide-mpp" in str(err.value) and str(path) in str(err.value)
    with open_slide(path, mpp=0.25) as s:
        assert s.mpp == 0.25
        grid = build_grid(s.dimensions, s.mpp, mags, 256, s.path)
        assert [g.downsample for g in grid.grids] == [4.0, 2.0]
        assert s.best_level(4.0) == 1
        patches = s.read_regions(grid.cell_rects(np.array([0, grid.offsets[1]])), (256, 256))
        assert patches.shape == (2, 256, 256, 3)


def test_override_wins_over_file_mpp(slides_dir: Path) -> None:
    with open_slide(slides_dir / PYRAMID, mpp=0.3) as s:
        assert s.mpp == 0.3 and s.file_mpp == pytest.approx(0.499)


def test_closed_reader_raises(slides_dir: Path) -> None:
    s = open_slide(slides_dir / PYRAMID)
    s.close()
    with pytest.raises(SlideError, match="closed"):
        s.read_region(0, 0, (10, 10), (10, 10))
