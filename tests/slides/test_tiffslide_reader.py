"""tiffslide backend (optional extra): a clear error without it, and agreement with OpenSlide on the real slides."""

from __future__ import annotations

import importlib
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from types import ModuleType

import numpy as np
import pytest

from loupe.errors import ConfigError, SlideError
from loupe.slides import BACKENDS, OpenSlideReader, build_grid, choose_backend, open_slide, parse_magnifications
from loupe.slides.tiffslide_reader import TiffSlideReader

PYRAMID = "cmu-1-small-region-pyramid.svs"
# Shared slides tiffslide reads. The NDPI has 4 levels in tiffslide and 7 in OpenSlide (which adds JPEG
# scale-on-decode levels), so only the common ones are compared.
READABLE = [
    "cmu-1-small-region.svs",
    PYRAMID,
    "cmu-1-small-region-pyramid-generic.tif",
    "tcga-cr-7395-01a-01-ts1.svs",
    "fluorescence-dapi-40x.ndpi",
]
pytestmark = pytest.mark.filterwarnings("ignore:hamamatsu-format metadata parsing:UserWarning")
SKIP_REASON = "tiffslide is not installed: pip install 'loupe[tiffslide]' to run the tiffslide backend tests"


@pytest.fixture
def tiffslide() -> ModuleType:
    """The tiffslide module; the test is skipped, with the reason shown, when the extra is not installed."""
    return pytest.importorskip("tiffslide", reason=SKIP_REASON)


# --- without the extra ----------------------------------------------------------------------------------------
def test_missing_tiffslide_is_a_clear_config_error(slides_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "tiffslide", None)  # makes `import tiffslide` fail as if not installed
    path = slides_dir / PYRAMID
    for opener in (lambda: open_slide(path, backend="tiffslide"), lambda: TiffSlideReader(path)):
        with pytest.raises(ConfigError) as err:
            opener()
        msg = str(err.value)
        assert "backend 'tiffslide' needs the optional extra" in msg
        assert "pip install 'loupe[tiffslide]'" in msg
        assert str(path) in msg
        assert err.value.__cause__ is None


def test_broken_tiffslide_install_says_so(slides_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    real_import = importlib.import_module

    def fail(name: str, package: str | None = None) -> ModuleType:
        if name == "tiffslide":  # what tiffslide<2.5.1 does with tifffile>=2025.5.21
            raise ImportError("cannot import name 'ZarrTiffStore' from 'tifffile'", name="tifffile")
        return real_import(name, package)

    monkeypatch.setattr(importlib, "import_module", fail)
    path = slides_dir / PYRAMID
    with pytest.raises(ConfigError, match="installed but cannot be imported") as err:
        TiffSlideReader(path)
    assert "ZarrTiffStore" in str(err.value) and "loupe[tiffslide]" in str(err.value) and str(path) in str(err.value)


def test_tiffslide_is_a_backend_but_never_chosen_automatically(slides_dir: Path) -> None:
    assert "tiffslide" in BACKENDS
    for name in READABLE:
        assert choose_backend(slides_dir / name) == "openslide"
    with open_slide(slides_dir / PYRAMID) as s:
        assert isinstance(s, OpenSlideReader)


# --- with the extra: agreement with OpenSlide on the real files -------------------------------------------------
@pytest.mark.parametrize("name", READABLE)
def test_metadata_matches_openslide(slides_dir: Path, tiffslide: ModuleType, name: str) -> None:
    with open_slide(slides_dir / name, backend="tiffslide") as t, open_slide(slides_dir / name) as o:
        assert isinstance(t, TiffSlideReader)
        assert t.dimensions == o.dimensions
        n = min(t.level_count, o.level_count)
        assert n == (4 if name.endswith(".ndpi") else o.level_count)
        assert t.level_dimensions[:n] == o.level_dimensions[:n]
        assert t.level_downsamples[:n] == pytest.approx(o.level_downsamples[:n], rel=1e-6)
        if o.mpp is None:
            assert t.mpp is None and t.file_mpp is None
        else:
            assert t.mpp == pytest.approx(o.mpp, rel=1e-6)
        assert t.vendor == o.vendor
        assert t.objective_power == o.objective_power
        for ds in (1.0, 2.0, 3.9, 4.0, 8.0, 100.0):
            assert t.best_level(ds) == min(o.best_level(ds), n - 1)


def test_known_values(slides_dir: Path, tiffslide: ModuleType) -> None:
    with open_slide(slides_dir / PYRAMID, backend="tiffslide") as s:
        assert s.level_dimensions == ((2220, 2967), (1110, 1483), (555, 741), (277, 370))
        assert s.mpp == pytest.approx(0.499) and s.objective_power == 20.0 and s.vendor == "aperio"
        assert s.properties["tiffslide.mpp-x"] == "0.499"
    with open_slide(slides_dir / "cmu-1-small-region-pyramid-generic.tif", backend="tiffslide") as s:
        assert s.vendor == "generic-tiff" and s.mpp == pytest.approx(0.499) and s.objective_power is None
    with open_slide(slides_dir / "tcga-cr-7395-01a-01-ts1.svs", backend="tiffslide", mpp=0.25) as s:
        assert s.file_mpp is None and s.mpp == 0.25  # JPEG 2000 tiles, no resolution in the file


def _rects(dims: tuple[int, int]) -> list[tuple[float, float, float, float]]:
    w, h = dims
    return [
        (0, 0, 256, 256),  # level 0, exact
        (300.5, 700.25, 256, 256),  # level 0, sub-pixel origin
        (1000, 1500, 512, 512),  # level 1
        (w - 100, h - 100, 300, 300),  # over the bottom-right edge: white outside
        (-50, 20, 400, 400),  # over the left edge
        (200, 300, 2000, 2000),  # coarse
        (0, 0, w, h),  # the whole slide
    ]


@pytest.mark.parametrize("name", READABLE)
def test_read_region_close_to_openslide(slides_dir: Path, tiffslide: ModuleType, name: str) -> None:
    with open_slide(slides_dir / name, backend="tiffslide") as t, open_slide(slides_dir / name) as o:
        for x, y, w0, h0 in _rects(t.dimensions):
            for out in ((256, 256), (96, 64)):
                a = t.read_region(x, y, (w0, h0), out)
                assert a.shape == (out[1], out[0], 3) and a.dtype == np.uint8
                diff = np.abs(a.astype(np.int16) - o.read_region(x, y, (w0, h0), out).astype(np.int16)).mean()
                # level-0 tiles decode to (nearly) the same pixels; at coarser levels OpenSlide renders a
                # sub-pixel shifted origin (and has extra NDPI levels), so allow a little more
                level0 = t.best_level(min(w0 / out[0], h0 / out[1])) == 0
                assert diff < (1.0 if level0 else 4.0), (name, (x, y, w0, h0), out, diff)


def test_outside_is_white_and_edge_is_padded(slides_dir: Path, tiffslide: ModuleType) -> None:
    with open_slide(slides_dir / "cmu-1-small-region.svs", backend="tiffslide") as s:
        w, h = s.dimensions
        assert (s.read_region(-500, -500, (200, 200), (50, 50)) == 255).all()
        assert (s.read_region(w + 10, 0, (64, 64), (32, 32)) == 255).all()
        half = s.read_region(-100, 1000, (200, 200), (100, 100))
        assert (half[:, :49] == 255).all()
        assert (half[:, 51:] < 250).any()
        corner = s.read_region(w - 10, h - 10, (20, 20), (20, 20))
        assert (corner[10:] == 255).all() and (corner[:, 10:] == 255).all()


def test_level_reads_are_exact_pixels(slides_dir: Path, tiffslide: ModuleType) -> None:
    """A 1:1 read at a level's own scale returns that level's pixels (no off-by-one from the level-0 mapping)."""
    with open_slide(slides_dir / PYRAMID, backend="tiffslide") as s:
        raw = tiffslide.TiffSlide(str(s.path))
        try:
            for level in range(1, s.level_count):
                ds = s.level_downsamples[level]
                lx, ly = 123, 77
                got = s.read_region(lx * ds, ly * ds, (64 * ds, 64 * ds), (64, 64))
                level_pixels = np.asarray(raw.zarr_group[str(level)][ly : ly + 64, lx : lx + 64])
                np.testing.assert_array_equal(got, level_pixels[:, :, :3])
        finally:
            raw.close()


def test_thumbnail_close_to_openslide(slides_dir: Path, tiffslide: ModuleType) -> None:
    for name in READABLE:
        with open_slide(slides_dir / name, backend="tiffslide") as t, open_slide(slides_dir / name) as o:
            thumb = t.thumbnail((299, 224))
            assert thumb.shape == (224, 299, 3) and thumb.dtype == np.uint8
            assert np.abs(thumb.astype(np.int16) - o.thumbnail((299, 224)).astype(np.int16)).mean() < 4.0, name


def test_concurrent_reads_equal_sequential(slides_dir: Path, tiffslide: ModuleType) -> None:
    for name in (PYRAMID, "tcga-cr-7395-01a-01-ts1.svs"):
        with open_slide(slides_dir / name, backend="tiffslide", mpp=0.5) as s:
            grid = build_grid(s.dimensions, s.mpp, parse_magnifications([2.0, 1.0, 0.5]), 128, s.path)
            # an even sample of cells over all magnifications (tiffslide caches no tiles, JPEG 2000 is slow)
            rects = grid.cell_rects(np.linspace(0, grid.n_cells - 1, 160).astype(int))
            sequential = [s.read_region(*r[:2], tuple(r[2:]), (128, 128)) for r in rects]
        # a fresh reader, so that the threads also race on tiffslide's per-thread store creation
        with open_slide(slides_dir / name, backend="tiffslide", mpp=0.5) as s, ThreadPoolExecutor(8) as pool:
            parallel = list(pool.map(lambda r: s.read_region(*r[:2], tuple(r[2:]), (128, 128)), rects))
        for a, b in zip(sequential, parallel, strict=True):
            np.testing.assert_array_equal(a, b)


def test_read_regions_and_closed_reader(slides_dir: Path, tiffslide: ModuleType) -> None:
    s = open_slide(slides_dir / PYRAMID, backend="tiffslide")
    rects = np.array([[0, 0, 512, 512], [1000, 1500, 300, 300]], dtype=float)
    out = s.read_regions(rects, (64, 48))
    assert out.shape == (2, 48, 64, 3)
    s.close()
    s.close()  # idempotent
    with pytest.raises(SlideError, match="closed"):
        s.read_region(0, 0, (10, 10), (10, 10))


# --- files tiffslide cannot read: a SlideError naming the file ------------------------------------------------
@pytest.mark.parametrize(
    "name", ["dicom-cmu-1-small-region", "dicom-cmu-1-small-region/level-4-frames-0-1.dcm"], ids=["folder", "file"]
)
def test_dicom_is_not_readable(slides_dir: Path, tiffslide: ModuleType, name: str) -> None:
    path = slides_dir / name
    for opener in (lambda: open_slide(path, backend="tiffslide"), lambda: TiffSlideReader(path)):
        with pytest.raises(SlideError) as err:
            opener()
        assert str(path) in str(err.value)
        assert "openslide" in str(err.value)  # points at the backend that can
        assert err.value.__cause__ is None


@pytest.mark.parametrize("name", ["broken.svs", "broken.tif", "broken.ndpi"])
def test_corrupt_file_names_the_file(tmp_path: Path, tiffslide: ModuleType, name: str) -> None:
    path = tmp_path / name
    path.write_bytes(np.random.default_rng(0).integers(0, 256, 4096, dtype=np.uint8).tobytes())
    with pytest.raises(SlideError) as err:
        open_slide(path, backend="tiffslide")
    assert str(path) in str(err.value)
    assert err.value.__cause__ is None
