"""Per-slide preparation through the catalog: tissue → valid cells per magnification, cached and never stale."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from loupe.data.catalog import SlideCatalog
from loupe.data.loading import PreparedSlides, ThumbnailDataset
from loupe.data.manifest import SlideRecord
from loupe.errors import SlideError
from loupe.slides import parse_magnifications
from loupe.slides.cache import SlideCache
from loupe.slides.image_reader import ImageReader
from loupe.slides.tissue import TissueSettings

MAGS = parse_magnifications(["2.0", "1.0", "0.5"])
P = 64


def _slide(path: Path, tissue_box: tuple[int, int, int, int] | None, size=(1200, 900), seed=0) -> Path:
    """White glass with an H&E-pink textured rectangle (x0, y0, x1, y1) in level-0 pixels."""
    w, h = size
    rng = np.random.default_rng(seed)
    img = np.full((h, w, 3), 242, np.uint8) + rng.integers(0, 6, (h, w, 3), dtype=np.uint8)
    if tissue_box is not None:
        x0, y0, x1, y1 = tissue_box
        pink = np.array([205, 120, 170], np.float64) + rng.normal(0, 12, (y1 - y0, x1 - x0, 3))
        img[y0:y1, x0:x1] = np.clip(pink, 0, 255).astype(np.uint8)
    Image.fromarray(img).save(path)
    return path


def _catalog(paths, cache_dir: Path, tissue=TissueSettings(), **kw) -> SlideCatalog:  # noqa: B008
    records = [SlideRecord(slide_id=p.stem, path=p, label=None, mpp=0.5) for p in paths]
    return SlideCatalog(records, MAGS, P, thumbnail_size=(64, 48), tissue=tissue, cache=SlideCache(cache_dir), **kw)


def _expected_valid(catalog: SlideCatalog, box) -> list[np.ndarray]:
    """Cells whose level-0 rectangle overlaps the tissue box by at least 5% of the cell's in-image area."""
    x0, y0, x1, y1 = box
    grid = catalog.grid(0)
    W, H = grid.dimensions
    out = []
    for g in grid.grids:
        s = g.cell_size0
        valid = np.zeros(g.shape, bool)
        for r in range(g.rows):
            for c in range(g.cols):
                cx0, cy0, cx1, cy1 = c * s, r * s, min((c + 1) * s, W), min((r + 1) * s, H)
                inter = max(0, min(cx1, x1) - max(cx0, x0)) * max(0, min(cy1, y1) - max(cy0, y0))
                valid[r, c] = inter / ((cx1 - cx0) * (cy1 - cy0)) >= 0.05
        out.append(valid)
    return out


def test_valid_cells_follow_the_tissue_at_every_magnification(tmp_path):
    box = (512, 256, 1024, 768)  # on cell edges of every grid (cells of 256, 128 and 64 level-0 px)
    catalog = _catalog([_slide(tmp_path / "a.png", box)], tmp_path / "cache")
    valid = catalog.valid(0)
    grid = catalog.grid(0)
    assert grid.shapes == ((4, 5), (8, 10), (15, 19))
    parts = np.split(valid, np.cumsum([g.n_cells for g in grid.grids])[:-1])
    for part, g, expected in zip(parts, grid.grids, _expected_valid(catalog, box), strict=True):
        assert np.array_equal(part.reshape(g.shape), expected), g.magnification.label
    assert [int(p.sum()) for p in parts] == [4, 16, 64]
    item = ThumbnailDataset(catalog, [0])[0]
    assert np.array_equal(item.valid.numpy(), valid)


def test_tissue_off_makes_every_cell_valid(tmp_path):
    catalog = _catalog([_slide(tmp_path / "a.png", (0, 0, 100, 100))], tmp_path / "cache", tissue=None)
    assert catalog.valid(0).all() and catalog.valid(0).shape == (catalog.grid(0).n_cells,)
    assert catalog.tissue_and_valid(0)[0] is None


def test_a_rerun_reads_the_cache_and_a_changed_setting_recomputes(tmp_path, monkeypatch):
    path = _slide(tmp_path / "a.png", (100, 100, 700, 500))
    reads = []
    original = ImageReader.thumbnail
    monkeypatch.setattr(ImageReader, "thumbnail", lambda self, size: reads.append(tuple(size)) or original(self, size))
    import loupe.data.preparation as prep

    detections = []
    monkeypatch.setattr(prep, "detect_tissue", lambda img, s: detections.append(1) or original_detect(img, s))
    from loupe.slides.tissue import detect_tissue as original_detect

    first = _catalog([path], tmp_path / "cache")
    v1, t1 = first.valid(0), first.thumbnail(0)
    assert len(reads) == 2 and len(detections) == 1  # overview + thumbnail, one detection

    again = _catalog([path], tmp_path / "cache")  # a new run: nothing is read or detected again
    assert np.array_equal(again.valid(0), v1) and np.array_equal(again.thumbnail(0), t1)
    assert again.grid(0).shapes == first.grid(0).shapes
    assert len(reads) == 2 and len(detections) == 1
    assert again._readers == {}  # not even opened: the header came from the cache

    stricter = _catalog([path], tmp_path / "cache", tissue=TissueSettings(min_cell_fraction=0.9))
    v2 = stricter.valid(0)
    assert len(reads) == 2 and len(detections) == 2  # same overview (cached), new detection entry
    assert v2.sum() < v1.sum() and not (v2 & ~v1).any()

    bigger = SlideCatalog(first.records, MAGS, P, thumbnail_size=(32, 32), cache=SlideCache(tmp_path / "cache"))
    assert bigger.thumbnail(0).shape == (32, 32, 3) and len(reads) == 3


def test_a_slide_without_tissue_is_reported_by_check(tmp_path):
    good = _slide(tmp_path / "good.png", (100, 100, 700, 500))
    blank = _slide(tmp_path / "blank.png", None)
    catalog = _catalog([good, blank], tmp_path / "cache")
    with pytest.raises(SlideError, match=r"no tissue found in slide .*blank\.png.*data\.tissue: false"):
        catalog.valid(1)
    problems = catalog.check()
    assert [p.record.slide_id for p in problems] == ["blank"]


def test_prepared_slides_return_errors_as_values_and_time_each_step(tmp_path):
    good = _slide(tmp_path / "good.png", (100, 100, 700, 500))
    broken = tmp_path / "broken.png"
    broken.write_bytes(b"no image here")
    catalog = _catalog([good, broken], tmp_path / "cache")
    ds = PreparedSlides(catalog, [0, 1])
    item, bad = ds[0], ds[1]
    assert item.error is None and item.item is not None
    assert item.item.thumbnail.shape == (3, 48, 64) and item.item.valid.dtype == torch.bool
    assert item.overview is not None and item.tissue is not None and item.overview.shape[:2] == item.tissue.shape
    assert set(item.timings) == {"open", "thumbnail", "overview", "tissue"}
    assert bad.index == 1 and bad.item is None and bad.error is not None and "broken.png" in bad.error
