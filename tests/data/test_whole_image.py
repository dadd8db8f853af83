"""Whole images for StreamingCLAM: the grid-aligned region of a slide at one magnification, cropped to tissue, held
in memory or (above a size) read crop by crop through a bounded cache."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from loupe.config import Config, ModelConfig, StreamingCLAMConfig
from loupe.data.catalog import SlideCatalog
from loupe.data.manifest import SlideRecord, load_manifest
from loupe.data.pixels import SlidePixels
from loupe.data.whole_image import REGION_CACHE_BYTES, SlideRegions, WholeImageReader, tissue_box
from loupe.datasets.synthetic import SyntheticSpec, generate_dataset
from loupe.errors import SlideError, SlideReadError
from loupe.models import SlideBatch, build_model
from loupe.models.interface import read_crop
from loupe.workflows.inference import make_pixels

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


# --- images read per tile (SlideRegions) -----------------------------------------------------------------------


@pytest.fixture(scope="module")
def real(slides_dir):
    """A real pyramidal SVS at 1 µm/px: level 1 (0.998 µm/px) resampled, so each chunk's pixels depend on its
    rectangle: crops equal the in-memory image only if they are read in the same chunks."""
    record = SlideRecord("cmu", slides_dir / "cmu-1-small-region-pyramid.svs")
    cat = SlideCatalog([record], ("1.0",), 32, thumbnail_size=(32, 32))
    yield cat
    cat.close()


def _regions(catalog, valid=None, cache_bytes=REGION_CACHE_BYTES, **kw):
    """The in-memory image and the same image as SlideRegions (chunks of 5 cells: many chunks, some partial)."""
    kw = {"threads": 2, "chunk_cells": 5, "crop_to_tissue": valid is not None, **kw}
    whole = WholeImageReader(catalog, **kw)(0, valid)
    reader = WholeImageReader(catalog, max_image_bytes=0, cache_bytes=cache_bytes, **kw)
    regions = reader(0, valid)
    assert isinstance(whole.image, torch.Tensor) and isinstance(regions.image, SlideRegions)
    assert regions.box == whole.box and torch.equal(regions.keep, whole.keep)
    return whole.image, regions.image, reader


def test_regions_crops_are_the_in_memory_images_crops_byte_for_byte(real):
    image, regions, reader = _regions(real)
    assert regions.shape == tuple(image.shape) == (1, 3, 47 * 32, 35 * 32)
    h, w = regions.shape[2:]
    rng = np.random.default_rng(0)
    spans = [((0, h), (0, w)), ((5, 6), (7, 8)), ((159, 161), (159, 321))]  # all; one pixel; across chunk seams
    spans += [((h - 300, h), (w - 1, w)), ((0, 1), (0, w))]  # the last row and column of chunks (partial ones)
    for _ in range(40):
        y0, x0 = int(rng.integers(0, h)), int(rng.integers(0, w))
        spans.append(((y0, min(h, y0 + int(rng.integers(1, 500)))), (x0, min(w, x0 + int(rng.integers(1, 500))))))
    for (y0, y1), (x0, x1) in spans:
        crop = regions.crop(slice(y0, y1), slice(x0, x1))
        assert crop.dtype == torch.uint8 and torch.equal(crop, image[..., y0:y1, x0:x1]), (y0, y1, x0, x1)
        assert torch.equal(read_crop(regions, slice(y0, y1), slice(x0, x1)), crop)
    # Slices reaching past the image are clipped (as tensor indexing is); open ends read to the edge.
    assert torch.equal(regions.crop(slice(h - 40, h + 100), slice(None, 64)), image[..., h - 40 :, :64])
    assert regions.crop(slice(10, 10), slice(0, w)).shape == (1, 3, 0, w)
    with pytest.raises(ValueError, match="step 1"):
        regions.crop(slice(0, h, 2), slice(0, w))
    assert reader.seconds > 0 and reader.patches == 47 * 35  # crops count in the reader's reading time
    reader.close()


def test_regions_of_a_tissue_box_and_white_beyond_the_slide_edge(catalog):
    valid = np.zeros((7, 7), dtype=bool)
    valid[2, 3] = valid[6, 6] = True  # the box reaches the last (partial) row and column: white past the edge
    image, regions, reader = _regions(catalog, valid.reshape(-1), chunk_cells=2)
    assert regions.box == (2, 3, 7, 7) and regions.shape == (1, 3, 5 * 32, 4 * 32)
    assert torch.equal(regions.crop(slice(0, 160), slice(0, 128)), image)
    edge = regions.crop(slice(100, 160), slice(70, 128))  # slide pixels end at 200 - 2·32 = 136, 200 - 3·32 = 104
    assert (edge[..., 36:, :] == 255).all() and (edge[..., :, 34:] == 255).all()
    assert torch.equal(edge, image[..., 100:160, 70:128])
    reader.close()


def test_the_cache_never_holds_more_than_its_budget_and_one_crop(real):
    """Tiles row-major as streaming reads them (a 64-px block with 40 px of context each side), forward then
    backward: bytes held stay under the budget plus one crop, and the cache saves most chunk reads."""
    chunk = 5 * 32 * 5 * 32 * 3
    budget = 8 * chunk  # four chunks of a crop and four more: less than a row of the 7 × 9 chunks
    image, regions, reader = _regions(real, cache_bytes=budget)
    h, w = regions.shape[2:]
    spans = [
        (slice(max(0, y - 40), min(h, y + 104)), slice(max(0, x - 40), min(w, x + 104)))
        for y in range(0, h, 64)
        for x in range(0, w, 64)
    ]
    biggest = 0
    for rows, cols in spans + spans:  # forward, then the backward's recompute
        crop = regions.crop(rows, cols)
        assert torch.equal(crop, image[..., rows, cols])
        biggest = max(biggest, crop.numel())
        assert regions.cached_bytes <= budget
    assert 0 < regions.peak_bytes <= budget + biggest
    # 70 chunks (47 × 35 cells in 5-cell chunks); read per crop: 3102 reads; least-recently-used eviction with the
    # same budget: 654; the optimum (Belady's, knowing the future): 396.
    assert regions.chunk_reads <= 436
    reader.close()


def test_a_cache_holding_the_image_reads_each_chunk_once_and_none_reads_them_per_crop(real):
    _, regions, reader = _regions(real, cache_bytes=10**9)
    h, w = regions.shape[2:]
    for y in range(0, h, 100):
        regions.crop(slice(y, min(h, y + 250)), slice(0, w))
    assert regions.chunk_reads == 7 * 10 and regions.cached_bytes == h * w * 3
    _, regions, reader0 = _regions(real, cache_bytes=0)
    regions.crop(slice(0, 100), slice(0, 100))
    regions.crop(slice(0, 100), slice(0, 100))
    assert regions.chunk_reads == 2 and regions.cached_bytes == 0
    reader.close()
    reader0.close()


def test_images_above_the_threshold_are_read_per_tile(catalog):
    size = 7 * 32 * 7 * 32 * 3  # the whole 7 × 7 grid, uint8 RGB
    at = WholeImageReader(catalog, threads=1, crop_to_tissue=False, max_image_bytes=size)
    above = WholeImageReader(catalog, threads=1, crop_to_tissue=False, max_image_bytes=size - 1)
    assert isinstance(at(0).image, torch.Tensor)
    assert isinstance(above(0).image, SlideRegions)
    for reader in (at, above):
        reader.close()
    always = SlidePixels(catalog, threads=1, crop_to_tissue=False, max_image_mb=0)
    never = SlidePixels(catalog, threads=1, crop_to_tissue=False)
    assert isinstance(always.whole(0, None).image, SlideRegions)
    assert isinstance(never.whole(0, None).image, torch.Tensor)
    always.close()
    never.close()


def test_the_setting_reaches_the_pixel_source(catalog):
    cfg = Config(
        model=ModelConfig(architecture="streamingclam", magnifications=["0.5"], patch_backbone="tiny"),
        streamingclam=StreamingCLAMConfig(max_image_in_memory_mb=0),
    )
    with make_pixels(catalog, cfg) as pixels:
        assert pixels.max_image_mb == 0 and isinstance(pixels.whole(0, None).image, SlideRegions)
    assert Config().streamingclam.max_image_in_memory_mb == 2048


class _FailingReader:
    """A slide reader whose ``read_region`` fails from its ``fail_from``-th call on."""

    def __init__(self, reader, fail_from: int) -> None:
        self.reader, self.fail_from, self.calls = reader, fail_from, 0

    def read_region(self, *args):
        self.calls += 1
        if self.calls >= self.fail_from:
            raise OSError("corrupt tile")
        return self.reader.read_region(*args)


def test_a_failing_crop_raises_a_slide_read_error_naming_the_slide(catalog, monkeypatch):
    reader = WholeImageReader(catalog, threads=2, crop_to_tissue=False, chunk_cells=2, max_image_bytes=0)
    regions = reader(1).image  # nothing is read yet
    assert isinstance(regions, SlideRegions)
    failing = _FailingReader(catalog.reader(1), fail_from=2)
    monkeypatch.setattr(catalog, "reader", lambda i: failing)
    regions.crop(slice(0, 10), slice(0, 10))  # one chunk: the first read succeeds
    with pytest.raises(SlideReadError, match=r"pixels \[0:100, 0:100\].*OSError: corrupt tile") as err:
        regions.crop(slice(0, 100), slice(0, 100))  # the three chunks beside it: read, and fail
    assert err.value.index == 1
    assert regions.crop(slice(0, 10), slice(0, 10)).shape == (1, 3, 10, 10)  # what is cached still serves
    reader.close()


class _Whole:
    """A pixel source of whole images only, from ``reader``."""

    def __init__(self, reader: WholeImageReader) -> None:
        self.reader = reader

    embeddings = None  # the pixel source interface: no cached embeddings

    def cells(self, slides, cells):
        raise AssertionError("StreamingCLAM reads whole images")

    def whole(self, slide, valid):
        return self.reader(slide, valid)


def test_streamingclam_gives_the_same_output_and_gradients_reading_per_tile(tmp_path):
    """End to end: the streamed trunk reads each tile's crop (forward, then again in the backward) from the slide
    in several chunks through a cache smaller than the image; logits and gradients are the in-memory image's."""
    records = load_manifest(generate_dataset(tmp_path, SyntheticSpec(image_size=300, splits={"train": 1}))).records
    cat = SlideCatalog(records, ("0.5",), 16, thumbnail_size=(32, 32))  # the tiny trunk's stride: 16 px per cell
    cfg = Config(
        model=ModelConfig(architecture="streamingclam", magnifications=["0.5"], patch_backbone="tiny"),
        streamingclam=StreamingCLAMConfig(tile_size=64),
    )
    rows, cols = cat.grid(0).grids[0].shape
    batch = SlideBatch(
        torch.zeros(1, 3, 8, 8, dtype=torch.uint8), torch.ones(1, rows * cols, dtype=torch.bool),
        torch.tensor([1]), torch.tensor([0]), ((rows, cols),),
    )  # fmt: skip
    results = []
    for limit in (None, 0):
        torch.manual_seed(0)
        model = build_model(cfg, 2)
        model.begin_epoch(cfg.streamingclam.freeze_encoder_epochs)  # the whole network trains
        reader = WholeImageReader(cat, threads=2, crop_to_tissue=False, chunk_cells=6, max_image_bytes=limit)
        reader.cache_bytes = 4 * 96 * 96 * 3  # four of the 4 × 4 chunks (96² px each)
        out = model(batch, _Whole(reader), None, batch.labels)
        assert out.loss is not None
        out.loss.sum().backward()
        results.append((out.logits.detach(), [p.grad for p in model.parameters() if p.requires_grad]))
        reader.close()
    (logits, grads), (logits_regions, grads_regions) = results
    assert torch.equal(logits, logits_regions)
    assert grads and all(g is not None for g in grads)
    assert all(torch.equal(a, b) for a, b in zip(grads, grads_regions, strict=True))
    cat.close()
