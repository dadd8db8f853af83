"""Plain-image backend on files the tests write: resolution tags, box averaging, the per-downsample cache."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
import tifffile
from PIL import Image

from loupe.slides import ImageReader, build_grid, open_slide, parse_magnifications


def _random_rgb(h: int, w: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)


def _write_tiff(path: Path, image: np.ndarray, mpp: float | None = None, unit: str = "CENTIMETER") -> Path:
    kwargs = {}
    if mpp is not None:
        per_unit = (1e4 if unit == "CENTIMETER" else 25400.0) / mpp
        kwargs = {"resolution": (per_unit, per_unit), "resolutionunit": unit}
    tifffile.imwrite(path, image, photometric="rgb" if image.ndim == 3 else "minisblack", **kwargs)
    return path


def test_tiff_resolution_in_cm_and_inch(tmp_path: Path) -> None:
    img = _random_rgb(40, 60)
    with open_slide(_write_tiff(tmp_path / "cm.tif", img, mpp=0.42)) as s:
        assert isinstance(s, ImageReader)
        assert s.mpp == pytest.approx(0.42, rel=1e-6)
        assert s.dimensions == (60, 40)
        assert s.level_dimensions == ((60, 40),) and s.level_downsamples == (1.0,)
        assert s.vendor == "image" and s.objective_power is None
    with open_slide(_write_tiff(tmp_path / "inch.tiff", img, mpp=0.25, unit="INCH")) as s:
        assert s.mpp == pytest.approx(0.25, rel=1e-6)
    with open_slide(_write_tiff(tmp_path / "none.tif", img)) as s:
        assert s.mpp is None
    with open_slide(_write_tiff(tmp_path / "none.tif", img), mpp=0.5) as s:
        assert s.mpp == 0.5


def test_document_dpi_is_not_a_resolution(tmp_path: Path) -> None:
    path = tmp_path / "doc.png"
    Image.fromarray(_random_rgb(20, 20)).save(path, dpi=(72, 72))
    with open_slide(path) as s:
        assert s.mpp is None


def test_png_without_resolution_and_with_dpi(tmp_path: Path) -> None:
    Image.fromarray(_random_rgb(30, 50)).save(tmp_path / "plain.png")
    with open_slide(tmp_path / "plain.png") as s:
        assert s.mpp is None
        assert s.dimensions == (50, 30)
    Image.fromarray(_random_rgb(30, 50)).save(tmp_path / "res.png", dpi=(25400 / 0.5, 25400 / 0.5))
    with open_slide(tmp_path / "res.png") as s:
        assert s.mpp == pytest.approx(0.5, rel=1e-3)


def test_full_resolution_read_is_exact_pixels(tmp_path: Path) -> None:
    img = _random_rgb(50, 70)
    with open_slide(_write_tiff(tmp_path / "a.tif", img)) as s:
        np.testing.assert_array_equal(s.read_region(10, 5, (30, 20), (30, 20)), img[5:25, 10:40])


def test_stripes_average_to_flat_grey_at_ds2(tmp_path: Path) -> None:
    img = np.zeros((64, 64, 3), dtype=np.uint8)
    img[:, ::2] = 255  # 2-px period vertical stripes
    with open_slide(_write_tiff(tmp_path / "stripes.tif", img)) as s:
        patch = s.read_region(0, 0, (64, 64), (32, 32))
        assert patch.min() >= 127 and patch.max() <= 128


def test_integer_downsample_is_exact_block_mean(tmp_path: Path) -> None:
    img = _random_rgb(48, 64, seed=1)
    with open_slide(_write_tiff(tmp_path / "r.tif", img)) as s:
        patch = s.read_region(16, 8, (32, 16), (8, 4))  # ds 4
        blocks = img[8:24, 16:48].reshape(4, 4, 8, 4, 3).astype(float).mean(axis=(1, 3))
        assert np.abs(patch.astype(float) - blocks).max() <= 0.5 + 1e-9


def test_cache_per_downsample_and_slices(tmp_path: Path) -> None:
    img = _random_rgb(120, 90, seed=2)
    with open_slide(_write_tiff(tmp_path / "c.tif", img)) as s:
        assert s.cached_downsamples == ()
        a = s.read_region(0, 0, (40, 40), (20, 20))
        b = s.read_region(40, 20, (40, 40), (20, 20))
        assert s.cached_downsamples == (2.0,)
        scaled = s._scaled(2.0)
        assert scaled.shape == (60, 45, 3)
        np.testing.assert_array_equal(a, scaled[:20, :20])
        np.testing.assert_array_equal(b, scaled[10:30, 20:40])
        s.read_region(0, 0, (30, 30), (10, 10))
        assert s.cached_downsamples == (2.0, 3.0)
        for ds in range(4, 12):
            s.read_region(0, 0, (ds, ds), (1, 1))
        assert len(s.cached_downsamples) == 8 and 2.0 not in s.cached_downsamples  # bounded, oldest dropped


def test_non_integer_downsample_and_edges(tmp_path: Path) -> None:
    img = np.full((30, 45, 3), 100, dtype=np.uint8)
    with open_slide(_write_tiff(tmp_path / "f.tif", img)) as s:
        inside = s.read_region(0, 0, (30, 15), (20, 10))  # ds 1.5 on a flat image stays flat
        assert (inside == 100).all()
        edge = s.read_region(40, 0, (10, 10), (5, 5))  # ds 2; last image column is 44, so half white
        assert (edge[:, :2] == 100).all() and (edge[:, 3:] == 255).all()
        assert 170 <= int(edge[0, 2, 0]) <= 185  # 44: image, 45: white -> mean ~178
        assert (s.read_region(-100, -100, (50, 50), (10, 10)) == 255).all()


def test_grey_rgba_and_16_bit_become_rgb8(tmp_path: Path) -> None:
    grey = np.arange(256, dtype=np.uint8).reshape(16, 16)
    with open_slide(_write_tiff(tmp_path / "g.tif", grey)) as s:
        out = s.read_region(0, 0, (16, 16), (16, 16))
        assert out.shape == (16, 16, 3)
        np.testing.assert_array_equal(out[..., 0], grey)
        np.testing.assert_array_equal(out[..., 2], grey)
    deep = np.full((8, 8, 3), 65535, dtype=np.uint16)
    deep[0, 0] = 0
    deep[0, 1] = 32896  # ~half range
    with open_slide(_write_tiff(tmp_path / "d.tif", deep)) as s:
        out = s.read_region(0, 0, (8, 8), (8, 8))
        assert out[1, 1, 0] == 255 and out[0, 0, 0] == 0 and out[0, 1, 0] == 128
    rgba = np.zeros((8, 8, 4), dtype=np.uint8)
    rgba[..., 3] = 0  # fully transparent black -> white
    rgba[0, 0] = (10, 20, 30, 255)
    Image.fromarray(rgba, "RGBA").save(tmp_path / "a.png")
    with open_slide(tmp_path / "a.png") as s:
        out = s.read_region(0, 0, (8, 8), (8, 8))
        assert tuple(out[0, 0]) == (10, 20, 30) and (out[1:] == 255).all()


def test_jpeg_and_thumbnail(tmp_path: Path) -> None:
    img = np.zeros((60, 80, 3), dtype=np.uint8)
    img[:, 40:] = 200
    Image.fromarray(img).save(tmp_path / "x.jpg", quality=95)
    with open_slide(tmp_path / "x.jpg") as s:
        thumb = s.thumbnail((40, 20))
        assert thumb.shape == (20, 40, 3)
        assert thumb[:, :15].mean() < 10 and thumb[:, 25:].mean() > 190


def test_bach_sized_image_end_to_end(tmp_path: Path) -> None:
    img = _random_rgb(1536, 2048, seed=3)
    with open_slide(_write_tiff(tmp_path / "bach.tif", img, mpp=0.42)) as s:
        assert isinstance(s, ImageReader)
        grid = build_grid(s.dimensions, s.mpp, parse_magnifications([1.68, 0.84, 0.42]), 299, s.path)
        assert grid.n_cells == 58
        idx = np.arange(grid.n_cells)
        patches = s.read_regions(grid.cell_rects(idx), (299, 299))
        assert patches.shape == (58, 299, 299, 3)
        assert s.cached_downsamples == (1.0, 2.0, 4.0)
        np.testing.assert_array_equal(patches[-1][:6, :7], img[1495:1501, 1794:1801])  # cell (5, 6) at ds 1
        assert (patches[-1][41:] == 255).all()  # below the image (1536 - 5 * 299 = 41 rows)
        with ThreadPoolExecutor(8) as pool:
            again = list(pool.map(lambda r: s.read_region(r[0], r[1], (r[2], r[3]), (299, 299)), grid.cell_rects(idx)))
        np.testing.assert_array_equal(np.stack(again), patches)
