"""Synthetic slides: determinism, evidence only at the planted magnification, the written dataset."""

from __future__ import annotations

import json
from collections import Counter

import numpy as np
import pytest

from loupe.data.manifest import load_manifest
from loupe.datasets.synthetic import CLASSES, SyntheticSpec, generate_dataset, magnification_views, render_image
from loupe.slides import open_slide

SMALL = SyntheticSpec(image_size=128, splits={"train": 4, "val": 2, "test": 2})


def _pair(spec: SyntheticSpec, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Class 0 and class 1 images drawn from the same random state."""
    return (
        render_image(spec, 0, np.random.default_rng(seed)).astype(np.float64),
        render_image(spec, 1, np.random.default_rng(seed)).astype(np.float64),
    )


def test_render_is_deterministic_for_a_seed_and_varies_with_it():
    a = render_image(SyntheticSpec(), 1, np.random.default_rng(5))
    b = render_image(SyntheticSpec(), 1, np.random.default_rng(5))
    c = render_image(SyntheticSpec(), 1, np.random.default_rng(6))
    assert a.shape == (256, 256, 3) and a.dtype == np.uint8
    assert np.array_equal(a, b)
    assert not np.array_equal(a, c)


@pytest.mark.parametrize("signal", ["5x", "10x", "20x"])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_class_evidence_exists_only_at_and_above_the_planted_magnification(signal, seed):
    spec = SyntheticSpec(signal=signal)
    planted = spec.signal_index()
    downsamples = [round(m / spec.mpp) for m in spec.magnifications]  # 4, 2, 1 base pixels per pixel
    h0, v0 = _pair(spec, seed)
    assert np.abs(h0 - v0).max() > 0  # the classes differ at full resolution
    views = zip(magnification_views(h0, downsamples), magnification_views(v0, downsamples), strict=True)
    for j, (h, v) in enumerate(views):
        diff = np.abs(h - v).max()
        if spec.magnifications[j] > spec.magnifications[planted]:  # a lower magnification: no evidence
            assert diff <= 1.0, f"class evidence survives at {spec.labels[j]} (planted {signal})"
        elif j == planted:
            assert diff >= 16.0, f"no class evidence at the planted {signal}"


def test_the_marker_is_the_same_in_both_classes_at_thumbnail_scale():
    h0, v0 = _pair(SyntheticSpec(), 3)
    hv, vv = magnification_views(h0, [8])[0], magnification_views(v0, [8])[0]
    assert np.abs(hv - vv).max() <= 1.0
    # ... and the marker is there: some 8x8 blocks are far from the pink background.
    assert (np.abs(hv - np.array([232.0, 196.0, 214.0])).sum(-1) > 100).any()


def test_signal_index_and_its_errors():
    assert SyntheticSpec(signal="highest").signal_index() == 2
    assert SyntheticSpec(signal="lowest").signal_index() == 0
    assert SyntheticSpec(signal="10x").signal_index() == 1
    with pytest.raises(ValueError, match="signal magnification"):
        SyntheticSpec(signal="40x").signal_index()


def test_generate_dataset_writes_a_loadable_manifest_with_balanced_splits(tmp_path):
    manifest_path = generate_dataset(tmp_path / "ds", SMALL)
    assert manifest_path == tmp_path / "ds" / "manifest.csv"
    manifest = load_manifest(manifest_path)
    assert manifest.classes == CLASSES
    assert len(manifest) == 8
    assert len({r.slide_id for r in manifest.records}) == 8
    by_split = Counter((r.split, r.label) for r in manifest.records)
    assert by_split == {
        ("train", "horizontal"): 2,
        ("train", "vertical"): 2,
        ("val", "horizontal"): 1,
        ("val", "vertical"): 1,
        ("test", "horizontal"): 1,
        ("test", "vertical"): 1,
    }
    info = json.loads((tmp_path / "ds" / "dataset.json").read_text())
    assert info["signal_label"] == "20x" and info["classes"] == list(CLASSES)
    for rec in manifest.records[:3]:
        with open_slide(rec.path) as reader:
            assert reader.mpp == pytest.approx(0.5, rel=1e-6)
            assert reader.dimensions == (128, 128)
            region = reader.read_region(0, 0, (128, 128), (128, 128))
            assert region.shape == (128, 128, 3)


def test_generate_dataset_is_deterministic_and_reuses_its_files(tmp_path):
    first = generate_dataset(tmp_path / "a", SMALL)
    other = generate_dataset(tmp_path / "b", SMALL)
    assert first.read_text() == other.read_text()
    for name in ("train_0000", "test_0001"):
        with (
            open_slide(tmp_path / "a" / "images" / f"{name}.tif") as ra,
            open_slide(tmp_path / "b" / "images" / f"{name}.tif") as rb,
        ):
            assert np.array_equal(
                ra.read_region(0, 0, (128, 128), (128, 128)), rb.read_region(0, 0, (128, 128), (128, 128))
            )

    files = sorted((tmp_path / "a").rglob("*"))
    mtimes = {p: p.stat().st_mtime_ns for p in files}
    assert generate_dataset(tmp_path / "a", SMALL) == first
    assert {p: p.stat().st_mtime_ns for p in sorted((tmp_path / "a").rglob("*"))} == mtimes

    # A different spec is regenerated, not silently reused.
    changed = SyntheticSpec(image_size=128, splits={"train": 4, "val": 2, "test": 2}, seed=1)
    generate_dataset(tmp_path / "a", changed)
    assert json.loads((tmp_path / "a" / "dataset.json").read_text())["seed"] == 1
    regenerated = (tmp_path / "a" / "images" / "train_0000.tif").read_bytes()
    assert regenerated != (tmp_path / "b" / "images" / "train_0000.tif").read_bytes()


@pytest.mark.parametrize(("evidence", "size"), [(0.01, 320), (0.005, 480), (0.02, 256)])
def test_sparse_spec_sizes_the_image_so_that_one_cell_is_the_evidence(evidence: float, size: int):
    from loupe.datasets.synthetic import sparse_spec

    spec = sparse_spec(evidence)
    assert spec.image_size == size and spec.lesion_cells(spec.signal_index()) == 1
    assert spec.evidence_fraction() <= evidence + 1e-12
    assert spec.evidence_fraction() == pytest.approx(32**2 / size**2)
    with pytest.raises(ValueError, match="evidence fraction"):
        sparse_spec(0.0)


@pytest.mark.parametrize("seed", [0, 1, 2, 3])
def test_decoys_look_like_evidence_at_other_magnifications_but_carry_no_label(seed: int):
    from loupe.datasets.synthetic import sparse_spec

    spec = sparse_spec(0.01, distractors=2)
    h0, v0 = _pair(spec, seed)
    differs = np.abs(h0 - v0).max(-1) > 0
    rows, cols = np.nonzero(differs)
    # The classes differ inside one 20x cell only: the decoys are the same whatever the label.
    assert rows.max() // 32 == rows.min() // 32 and cols.max() // 32 == cols.min() // 32
    # Decoys are there: one-pixel checkerboards at 10x (2×2 blocks) and at 5x (4×4 blocks) outside that cell.
    outside = h0.copy()
    r0, c0 = (rows.min() // 32) * 32, (cols.min() // 32) * 32
    outside[r0 : r0 + 32, c0 : c0 + 32] = outside[r0, c0 - 1 if c0 else c0 + 32]
    for d, label in ((2, "10x"), (4, "5x")):
        view = magnification_views(outside, [d])[0]
        checker = np.abs(np.diff(view, axis=1)).sum(-1)
        assert (checker > 300).sum() >= 10, f"no decoy evidence at {label}"


def test_dataset_json_records_the_evidence_fraction(tmp_path):
    from loupe.datasets.synthetic import sparse_spec

    spec = sparse_spec(0.01, splits={"train": 2, "val": 1, "test": 1})
    generate_dataset(tmp_path, spec)
    info = json.loads((tmp_path / "dataset.json").read_text())
    assert info["evidence_fraction"] == pytest.approx(0.01) and info["distractors"] == 2
