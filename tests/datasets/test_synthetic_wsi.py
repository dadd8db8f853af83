"""Synthetic pyramidal slides: an SVS that OpenSlide opens, with µm/px, consistent levels and the asked-for tissue."""

from __future__ import annotations

import importlib.util
import re
from collections import Counter
from typing import Any

import numpy as np
import pytest
import tifffile

from loupe.cli import main
from loupe.datasets.synthetic_wsi import GLASS, SyntheticWSI, auto_levels, make_pyramidal_slide, write_pyramidal_slide
from loupe.errors import LoupeError
from loupe.slides import open_slide
from loupe.slides.tissue import detect_tissue

W, H = 6000, 4000


@pytest.fixture(scope="module")
def slide(tmp_path_factory) -> SyntheticWSI:
    return make_pyramidal_slide(tmp_path_factory.mktemp("wsi") / "synthetic.svs", W, H, tile=256, seed=0)


def _tissue_mask(reader, size: tuple[int, int]) -> np.ndarray:
    return detect_tissue(reader.thumbnail(size))


def test_openslide_reads_levels_mpp_and_objective(slide):
    assert slide.path.exists() and slide.file_bytes == slide.path.stat().st_size
    assert slide.levels >= 4 and slide.levels == auto_levels(W, H)
    with open_slide(slide.path) as reader:
        assert reader.vendor == "aperio"
        assert reader.level_count == slide.levels >= 4
        assert reader.level_dimensions == slide.level_dimensions
        assert reader.level_dimensions[0] == (W, H)
        for (w0, h0), (w1, h1) in zip(reader.level_dimensions[:-1], reader.level_dimensions[1:], strict=True):
            assert (w1, h1) == (w0 // 2, h0 // 2)
        assert reader.level_downsamples[:3] == pytest.approx((1.0, 2.0, 4.0))
        assert reader.mpp == pytest.approx(0.25)
        assert reader.objective_power == pytest.approx(40.0)
        assert reader.properties["openslide.level[0].tile-width"] == "256"
    assert max(slide.level_dimensions[-1]) <= 1024


def test_file_is_a_tiled_jpeg_svs_with_a_thumbnail_and_shared_glass_tiles(slide):
    with tifffile.TiffFile(slide.path) as tif:
        assert tif.is_svs
        page = tif.pages[0]
        assert page.is_tiled and (page.tilewidth, page.tilelength) == (256, 256)
        assert page.compression == tifffile.COMPRESSION.JPEG
        assert page.photometric == tifffile.PHOTOMETRIC.YCBCR
        names = [s.name for s in tif.series]
        assert names[:2] == ["Baseline", "Thumbnail"]
        assert len(tif.series[0].levels) == slide.levels
        # glass tiles are one encoded tile written many times: the commonest tile size covers most of level 0
        size, count = Counter(page.databytecounts).most_common(1)[0]
        assert count >= 0.4 * len(page.databytecounts) and size < 2000


def test_tissue_is_stained_and_glass_is_near_white(slide):
    with open_slide(slide.path) as reader:
        mask = _tissue_mask(reader, (600, 400))
        # a tissue pixel of the overview far from the edge of the tissue, and a glass corner
        inner = mask.copy()
        for axis in (0, 1):
            for shift in (-8, 8):
                inner &= np.roll(mask, shift, axis=axis)
        ys, xs = np.nonzero(inner)
        assert len(ys) > 0
        cx, cy = xs[len(xs) // 2] * 10, ys[len(ys) // 2] * 10
        tissue = reader.read_region(cx - 128, cy - 128, (256, 256), (256, 256)).astype(np.float64)
        corners = {(0, 0): mask[:20, :20], (W - 256, 0): mask[:20, -20:], (0, H - 256): mask[-20:, :20]}
        (gx, gy), _ = min(corners.items(), key=lambda kv: kv[1].sum())
        glass = reader.read_region(gx, gy, (256, 256), (256, 256)).astype(np.float64)
    # tissue: pink/purple (green well below red and blue), varied, nowhere near glass
    r, g, b = tissue.reshape(-1, 3).mean(axis=0)
    assert g < r - 25 and g < b - 15 and tissue.mean() < 215
    assert tissue.std() > 8
    assert np.abs(glass - np.asarray(GLASS)).max() <= 4 and glass.min() >= 235


def test_levels_agree_where_tissue_and_glass_meet(slide):
    with open_slide(slide.path) as reader:
        mask = _tissue_mask(reader, (600, 400))
        edge = mask & ~np.roll(mask, 5, axis=1)  # tissue pixels with glass a little to their left
        ys, xs = np.nonzero(edge[10:-10, 10:-10])
        cx, cy = (xs[len(xs) // 2] + 10) * 10, (ys[len(ys) // 2] + 10) * 10
        x, y = cx - 512, cy - 512
        fine = reader.read_region(x, y, (1024, 1024), (1024, 1024)).astype(np.float64)
        assert reader.best_level(4.0) == 2
        coarse = reader.read_region(x, y, (1024, 1024), (256, 256)).astype(np.float64)
        shifted = reader.read_region(x + 96, y + 96, (1024, 1024), (256, 256)).astype(np.float64)
    pooled = fine.reshape(256, 4, 256, 4, 3).mean(axis=(1, 3))
    is_tissue = pooled.min(axis=-1) < 225
    assert 0.2 < is_tissue.mean() < 0.95  # the region really straddles the tissue edge
    assert np.abs(pooled - coarse).mean() < 5.0
    assert np.abs(pooled - shifted).mean() > 3 * np.abs(pooled - coarse).mean()  # the comparison can tell


def test_tissue_fraction_matches_the_request(slide, tmp_path):
    assert slide.tissue_fraction == pytest.approx(0.25, abs=0.01)
    with open_slide(slide.path) as reader:
        assert _tissue_mask(reader, (600, 400)).mean() == pytest.approx(0.25, abs=0.04)
    sparse = write_pyramidal_slide(tmp_path / "sparse.svs", 3000, 2000, mpp=0.5, tissue_fraction=0.08, seed=3)
    with open_slide(sparse) as reader:
        assert reader.mpp == pytest.approx(0.5)
        assert reader.objective_power == pytest.approx(20.0)
        assert _tissue_mask(reader, (600, 400)).mean() == pytest.approx(0.08, abs=0.03)


@pytest.mark.parametrize(
    "kwargs",
    [
        {"width": 0},
        {"tile": 250},
        {"mpp": 0.0},
        {"tissue_fraction": 1.0},
        {"quality": 0},
        {"levels": 0},
    ],
)
def test_bad_arguments_are_refused(tmp_path, kwargs):
    args = {"path": tmp_path / "x.svs", "width": 1000, "height": 800} | kwargs
    with pytest.raises(ValueError):
        make_pyramidal_slide(**args)
    assert not (tmp_path / "x.svs").exists()


@pytest.fixture
def without_imagecodecs(monkeypatch: pytest.MonkeyPatch) -> None:
    """imagecodecs looks not installed (a base install: it comes with the `wsi` extra)."""
    real = importlib.util.find_spec

    def find_spec(name: str, *args: Any, **kwargs: Any) -> Any:
        return None if name == "imagecodecs" else real(name, *args, **kwargs)

    monkeypatch.setattr(importlib.util, "find_spec", find_spec)


def test_without_imagecodecs_writing_is_refused_up_front_with_the_extra(tmp_path, without_imagecodecs):
    with pytest.raises(LoupeError, match=re.escape("imagecodecs package, not installed: pip install 'loupe[wsi]'")):
        make_pyramidal_slide(tmp_path / "x.svs", 1000, 800)
    assert not (tmp_path / "x.svs").exists()


def test_bench_wsi_without_imagecodecs_is_one_line_and_exit_2(tmp_path, without_imagecodecs, capsys):
    assert main(["bench", "wsi", "--quick", "--out", str(tmp_path / "bench")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("loupe bench: error: ") and "\n" not in err and "pip install 'loupe[wsi]'" in err
    assert not list((tmp_path / "bench").rglob("*.svs"))
