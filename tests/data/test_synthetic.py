"""Synthetic slides: determinism, evidence only at the planted magnification, the written dataset."""

from __future__ import annotations

import json
from collections import Counter

import numpy as np
import pytest

from loupe.data.manifest import load_manifest
from loupe.data.synthetic import CLASSES, SyntheticSpec, generate_dataset, magnification_views, render_image
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
