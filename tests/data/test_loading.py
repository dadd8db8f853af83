"""Feeding the model: thumbnail items, shape-homogeneous batches, and cell patches read from the slides."""

from __future__ import annotations

from collections import Counter

import numpy as np
import pytest
import torch

from loupe.data.catalog import SlideCatalog
from loupe.data.loading import CellReader, ShapeBatchSampler, ThumbnailDataset, make_loader
from loupe.data.manifest import load_manifest
from loupe.datasets.synthetic import SyntheticSpec, generate_dataset
from loupe.models import SlideBatch
from loupe.slides import open_slide

SMALL = SyntheticSpec(image_size=128, splits={"train": 4, "val": 2, "test": 2})
LARGE = SyntheticSpec(image_size=192, splits={"train": 3}, seed=1)  # a second grid shape
MAGS = ("2.0", "1.0", "0.5")
P = 32


@pytest.fixture(scope="module")
def catalog(tmp_path_factory):
    root = tmp_path_factory.mktemp("loading")
    small = load_manifest(generate_dataset(root / "small", SMALL)).records
    large = load_manifest(generate_dataset(root / "large", LARGE)).records
    cat = SlideCatalog([*small, *large], MAGS, P, thumbnail_size=(48, 32))  # items 0-7: 128 px, items 8-10: 192 px
    yield cat
    cat.close()


def test_thumbnail_dataset_items(catalog):
    ds = ThumbnailDataset(catalog, [1, 9, 4], labels=[0, 1, 1])
    assert len(ds) == 3
    item = ds[1]
    assert item.index == 9 and item.label == 1
    assert item.thumbnail.dtype == torch.uint8 and item.thumbnail.shape == (3, 32, 48)
    assert item.shapes == ((2, 2), (3, 3), (6, 6))  # 192 px: ceil(48/32), ceil(96/32), 192/32
    assert ds[0].shapes == ((1, 1), (2, 2), (4, 4))
    expected = catalog.reader(9).thumbnail((48, 32))
    assert np.array_equal(item.thumbnail.permute(1, 2, 0).numpy(), expected)
    assert ds.thumbnail(1) is ds.thumbnail(1)  # cached
    assert item.valid.dtype == torch.bool and item.valid.shape == (4 + 9 + 36,) and bool(item.valid.all())
    assert ThumbnailDataset(catalog, [0], cache=False).thumbnail(0) is not ds.thumbnail(0)
    assert ThumbnailDataset(catalog, [0])[0].label == -1  # unlabelled (prediction)


@pytest.mark.parametrize("shuffle", [False, True])
def test_shape_batch_sampler_groups_equal_shapes_and_covers_each_item_once(shuffle):
    shapes = [((1, 1), (2, 2))] * 7 + [((2, 2), (3, 4))] * 4 + [((1, 1), (2, 3))] * 2
    shapes = [shapes[i] for i in np.random.default_rng(0).permutation(len(shapes))]
    sampler = ShapeBatchSampler(shapes, batch_size=3, shuffle=shuffle, seed=0)
    assert len(sampler) == 3 + 2 + 1
    epochs = []
    for _ in range(3):
        batches = list(sampler)
        assert len(batches) == len(sampler)
        for batch in batches:
            assert 1 <= len(batch) <= 3
            assert len({shapes[i] for i in batch}) == 1
        counts = Counter(i for batch in batches for i in batch)
        assert counts == Counter(range(len(shapes)))
        epochs.append(batches)
    if shuffle:
        assert epochs[0] != epochs[1] or epochs[1] != epochs[2]
        # The same seed gives the same epochs.
        again = ShapeBatchSampler(shapes, batch_size=3, shuffle=True, seed=0)
        assert list(again) == epochs[0]
    else:
        assert epochs[0] == epochs[1] == epochs[2]


SHARDED = [((1, 1), (2, 2))] * 7 + [((2, 2), (3, 4))] * 4 + [((1, 1), (2, 3))] * 2  # 6 batches of ≤ 3


@pytest.mark.parametrize("ranks", [2, 3, 4, 5, 8])
@pytest.mark.parametrize("shuffle", [False, True])
def test_shape_batch_sampler_shards_each_epoch_across_ranks(ranks: int, shuffle: bool):
    """Every rank takes as many steps; together they cover the epoch's batches, each once, except the padding
    that makes the count a multiple of the ranks (repeats of the first batches, fewer than one per rank)."""
    samplers = [ShapeBatchSampler(SHARDED, 3, shuffle, seed=7, num_replicas=ranks, rank=r) for r in range(ranks)]
    whole = ShapeBatchSampler(SHARDED, 3, shuffle, seed=7)
    for epoch in (0, 1, 2):
        for s in [*samplers, whole]:
            s.set_epoch(epoch)
        reference = whole.epoch_batches()
        shards = [list(s) for s in samplers]
        steps = -(-len(reference) // ranks)
        assert [len(s) for s in samplers] == [len(sh) for sh in shards] == [steps] * ranks
        # Interleaved back in rank order, the shards are the epoch's list, then its first batches again.
        merged = [shards[i % ranks][i // ranks] for i in range(steps * ranks)]
        assert merged[: len(reference)] == reference
        assert merged[len(reference) :] == reference[: steps * ranks - len(reference)]
        assert Counter(i for batch in merged[: len(reference)] for i in batch) == Counter(range(len(SHARDED)))


def test_shape_batch_sampler_reshuffles_per_epoch_reproducibly():
    a = ShapeBatchSampler(SHARDED, 3, True, seed=7, num_replicas=2, rank=1)
    b = ShapeBatchSampler(SHARDED, 3, True, seed=7, num_replicas=2, rank=1)
    a.set_epoch(4)
    b.set_epoch(4)
    assert list(a) == list(b)  # a resumed run (Lightning sets the epoch) draws the same shard again
    orders = set()
    for epoch in range(6):
        a.set_epoch(epoch)
        orders.add(tuple(tuple(x) for x in a))
    assert len(orders) > 1


def test_make_loader_yields_shape_homogeneous_batches(catalog):
    ds = ThumbnailDataset(catalog, list(range(11)), labels=[i % 2 for i in range(11)])
    loader = make_loader(ds, batch_size=4, shuffle=True, num_workers=0)
    seen = []
    for batch in loader:
        assert isinstance(batch, SlideBatch)
        shapes = torch.tensor(batch.shapes)
        # the collate refuses mixed shapes, so every batch is one bucket of the sampler
        assert batch.shapes in {((2, 2), (3, 3), (6, 6)), ((1, 1), (2, 2), (4, 4))}
        assert batch.thumbnails.shape[1:] == (3, 32, 48)
        assert batch.valid.shape == (len(batch), int(shapes.prod(-1).sum()))
        seen += batch.slides
    assert sorted(seen) == list(range(11))


def test_cell_reader_returns_the_pixels_of_each_cell(catalog):
    reader = CellReader(catalog, threads=3)
    slides = [2, 9]
    # Slide 2 (21 cells) and slide 9 (4 + 9 + 36 cells): a cell from every magnification, with a repeat.
    cells = torch.tensor([[0, 3, 5, 20, 5], [1, 8, 12, 13, 48]])
    patches = reader(slides, cells)
    assert patches.shape == (2, 5, 3, P, P) and patches.dtype == torch.float32
    assert float(patches.min()) >= 0.0 and float(patches.max()) <= 1.0
    for b, slide in enumerate(slides):
        grid = catalog.grid(slide)
        with open_slide(catalog.records[slide].path) as own:
            for j, rect in enumerate(grid.cell_rects(cells[b].numpy())):
                expected = own.read_region(rect[0], rect[1], (rect[2], rect[3]), (P, P))
                got = (patches[b, j].permute(1, 2, 0) * 255).round().to(torch.uint8).numpy()
                assert np.array_equal(got, expected), (slide, int(cells[b, j]))
            full = own.read_region(0, 0, own.dimensions, own.dimensions)
    # At the base magnification (0.5 µm/px) a cell is a plain slice of the image: cell 48 of slide 9 is
    # flat index 48 - 4 - 9 = 35 of the 6x6 grid, i.e. row 5, col 5.
    got = (patches[1, 4].permute(1, 2, 0) * 255).round().to(torch.uint8).numpy()
    assert np.array_equal(got, full[5 * P : 6 * P, 5 * P : 6 * P])
    # Edge cells are padded with white: cell 1 of slide 9 (2 µm/px, row 0, col 1) covers x = 128..256 of 192 px.
    assert torch.all(patches[1, 0, :, :, P // 2 :] == 1.0)
    assert not torch.all(patches[1, 0, :, :, : P // 2] == 1.0)
    # The same cell read twice gives the same patch.
    assert torch.equal(patches[0, 2], patches[0, 4])
    # Channels-last memory (the backbones' fast layout), and the same patches whatever the number of threads.
    assert patches.flatten(0, 1).is_contiguous(memory_format=torch.channels_last)
    one = CellReader(catalog, threads=1)
    assert torch.equal(one(slides, cells), patches)
    one.close()
    reader.close()
