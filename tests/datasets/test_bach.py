"""BACH (ICIAR 2018, part A microscopy) importer: layout discovery, ground truth checks, manifest output."""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from loupe.data.manifest import load_manifest
from loupe.data.splits import assign_splits
from loupe.datasets.bach import (
    BACH_CLASSES,
    BACH_MPP,
    GROUND_TRUTH_NAME,
    IMAGE_SUFFIXES,
    bach_manifest,
    import_bach,
    locate_bach,
)
from loupe.errors import ConfigError, ManifestError
from loupe.slides import open_slide
from loupe.slides.formats import TIFF_SUFFIXES

PREFIX = {"Normal": "n", "Benign": "b", "InSitu": "is", "Invasive": "iv"}
PER_CLASS = 3
EXPECTED_IDS = [f"{PREFIX[c]}{i:03d}" for c in BACH_CLASSES for i in range(1, PER_CLASS + 1)]
EXPECTED_LABELS = [c for c in BACH_CLASSES for _ in range(PER_CLASS)]


def write_tiff(path: Path, value: int) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.full((48, 64, 3), value, dtype=np.uint8)).save(path, format="TIFF")


def write_gt(path: Path, rows: list[tuple[str, str]]) -> Path:
    path.write_text("".join(f"{name},{label}\n" for name, label in rows), encoding="utf-8")
    return path


def gt_rows() -> list[tuple[str, str]]:
    return [(f"{sid}.tif", label) for sid, label in zip(EXPECTED_IDS, EXPECTED_LABELS, strict=True)]


@pytest.fixture
def bach_root(tmp_path: Path) -> Path:
    """``ICIAR2018_BACH_Challenge/Photos/<class>/*.tif`` with the ground-truth CSV, in the official layout."""
    root = tmp_path / "ICIAR2018_BACH_Challenge"
    photos = root / "Photos"
    for k, (sid, label) in enumerate(zip(EXPECTED_IDS, EXPECTED_LABELS, strict=True)):
        write_tiff(photos / label / f"{sid}.tif", 10 * k)
    write_gt(photos / GROUND_TRUTH_NAME, gt_rows())
    return root


def test_records_from_dataset_root(bach_root: Path) -> None:
    m = bach_manifest(bach_root)
    photos = bach_root / "Photos"
    assert m.classes == ("Normal", "Benign", "InSitu", "Invasive")  # clinical order, official names
    assert [r.slide_id for r in m.records] == EXPECTED_IDS
    assert [r.label for r in m.records] == EXPECTED_LABELS
    pairs = zip(EXPECTED_IDS, EXPECTED_LABELS, strict=True)
    assert [r.path for r in m.records] == [photos / lab / f"{sid}.tif" for sid, lab in pairs]
    assert all(r.path.is_absolute() and r.path.is_file() for r in m.records)
    assert BACH_MPP == 0.42
    assert [r.mpp for r in m.records] == [0.42] * len(EXPECTED_IDS)
    assert [r.group for r in m.records] == EXPECTED_IDS  # no patient ids in BACH: each image is its own group
    assert all(r.split is None for r in m.records)
    np.testing.assert_array_equal(m.label_indices(), np.repeat(np.arange(4), PER_CLASS))


def test_photos_folder_and_parent_folder_entry_points(bach_root: Path) -> None:
    expected = bach_manifest(bach_root).records
    assert bach_manifest(bach_root / "Photos").records == expected
    assert bach_manifest(bach_root.parent).records == expected  # the folder the archive was extracted into
    layout = locate_bach(bach_root / "Photos")
    assert layout.photos == bach_root / "Photos"
    assert layout.ground_truth == bach_root / "Photos" / GROUND_TRUTH_NAME
    assert layout.class_dirs == {c: bach_root / "Photos" / c for c in BACH_CLASSES}


def test_lowercase_folders_keep_official_labels(bach_root: Path) -> None:
    photos = bach_root / "Photos"
    for c in BACH_CLASSES:
        (photos / c).rename(photos / f"{c.lower()}_tmp")
        (photos / f"{c.lower()}_tmp").rename(photos / c.lower())
    (photos / "insitu").rename(photos / "in_situ")  # punctuation is tolerated too
    photos.rename(bach_root / "photos")
    m = bach_manifest(bach_root)
    assert [r.label for r in m.records] == EXPECTED_LABELS
    assert [r.slide_id for r in m.records] == EXPECTED_IDS
    assert m.records[0].path == bach_root / "photos" / "normal" / "n001.tif"
    assert m.records[6].path == bach_root / "photos" / "in_situ" / "is001.tif"
    assert all(r.path.is_file() for r in m.records)


def test_import_writes_a_manifest_that_reloads_identically(bach_root: Path, tmp_path: Path) -> None:
    out = tmp_path / "out" / "manifest.csv"
    m = import_bach(bach_root, out)
    assert m.source == out
    with out.open(newline="", encoding="utf-8") as f:
        rows = list(csv.DictReader(f))
    assert list(rows[0]) == ["slide_id", "path", "label", "split", "mpp", "group"]
    assert [row["mpp"] for row in rows] == ["0.42"] * len(EXPECTED_IDS)
    assert [row["group"] for row in rows] == EXPECTED_IDS
    assert [row["label"] for row in rows] == EXPECTED_LABELS
    back = load_manifest(out, classes=BACH_CLASSES)
    assert back.records == m.records
    assert back.classes == BACH_CLASSES
    # without classes the order is the sorted labels: the CSV does not store the class order
    assert load_manifest(out).classes == ("Benign", "InSitu", "Invasive", "Normal")


def test_written_manifest_is_ready_for_training(bach_root: Path, tmp_path: Path) -> None:
    out = tmp_path / "manifest.csv"
    import_bach(bach_root, out, val_fraction=0.25, test_fraction=0.25, seed=3)
    m = load_manifest(out, classes=BACH_CLASSES, require_labels=True, check_files=True)
    assert {r.split for r in m.records} == {"train", "val", "test"}
    assert sum(len(m.subset(s)) for s in ("train", "val", "test")) == len(EXPECTED_IDS)
    np.testing.assert_array_equal(m.label_indices(), np.repeat(np.arange(4), PER_CLASS))
    assert all(r.mpp == BACH_MPP and r.group == r.slide_id for r in m.records)
    with open_slide(m.records[0].path, mpp=m.records[0].mpp) as reader:  # the images carry no resolution
        assert reader.dimensions == (64, 48)
        assert reader.mpp == pytest.approx(0.42)


def test_splits_come_from_assign_splits(bach_root: Path) -> None:
    a = bach_manifest(bach_root, val_fraction=0.25, test_fraction=0.25, seed=7)
    b = bach_manifest(bach_root, val_fraction=0.25, test_fraction=0.25, seed=7)
    assert a.records == b.records
    assert a.records == assign_splits(bach_manifest(bach_root), 0.25, 0.25, seed=7).records
    assert {r.split for r in a.records} == {"train", "val", "test"}
    for c in BACH_CLASSES:  # stratified: every class has images in train
        assert any(r.split == "train" for r in a.records if r.label == c)
    assert all(r.split is None for r in bach_manifest(bach_root, seed=7).records)  # no fractions: no splits
    with pytest.raises(ConfigError):
        bach_manifest(bach_root, val_fraction=0.6, test_fraction=0.5)


def test_mpp_override_and_validation(bach_root: Path) -> None:
    assert {r.mpp for r in bach_manifest(bach_root, mpp=0.5).records} == {0.5}
    for bad in (0, -0.42, float("nan"), float("inf")):
        with pytest.raises(ConfigError, match="mpp"):
            bach_manifest(bach_root, mpp=bad)


def test_photos_are_the_shared_tiff_suffixes() -> None:
    assert IMAGE_SUFFIXES is TIFF_SUFFIXES  # BACH's photos are TIFFs, whatever else a slide may be


def test_hidden_and_non_tiff_files_are_skipped(bach_root: Path) -> None:
    photos = bach_root / "Photos"
    (photos / "Normal" / ".DS_Store").write_bytes(b"x")
    (photos / "Normal" / "._n001.tif").write_bytes(b"x")  # macOS resource fork
    (photos / "Benign" / "notes.txt").write_text("x")
    (photos / "Benign" / "b001.png").write_bytes(b"x")
    (photos / "InSitu" / "extra").mkdir()
    write_tiff(photos / "InSitu" / "extra" / "is999.tif", 0)  # not directly in the class folder
    (photos / ".hidden").mkdir()
    (photos / "README.txt").write_text("x")
    write_tiff(photos / "Invasive" / "iv004.TIFF", 0)
    with (photos / GROUND_TRUTH_NAME).open("a", encoding="utf-8") as f:
        f.write("iv004.TIFF,Invasive\n")
    m = bach_manifest(bach_root)
    assert [r.slide_id for r in m.records] == [*EXPECTED_IDS, "iv004"]
    assert m.records[-1].label == "Invasive"


def test_folders_alone_without_ground_truth(bach_root: Path) -> None:
    (bach_root / "Photos" / GROUND_TRUTH_NAME).unlink()
    assert locate_bach(bach_root).ground_truth is None
    m = bach_manifest(bach_root)
    assert [r.label for r in m.records] == EXPECTED_LABELS


def test_ground_truth_found_in_root_or_given_explicitly(bach_root: Path, tmp_path: Path) -> None:
    photos = bach_root / "Photos"
    moved = (photos / GROUND_TRUTH_NAME).rename(bach_root / GROUND_TRUTH_NAME.upper())
    assert locate_bach(bach_root).ground_truth == moved
    elsewhere = write_gt(tmp_path / "labels.csv", [("n001.tif", "Benign"), *gt_rows()[1:]])
    with pytest.raises(ManifestError, match=r"row 1: n001.tif is Benign in the CSV but lies in the Normal folder"):
        bach_manifest(photos, ground_truth=elsewhere)
    with pytest.raises(ManifestError, match="not found"):
        bach_manifest(bach_root, ground_truth=tmp_path / "nope.csv")


def test_ground_truth_tolerates_header_bom_and_label_spelling(bach_root: Path) -> None:
    rows = [(name, {"InSitu": "in situ", "Normal": "NORMAL"}.get(lab, lab)) for name, lab in gt_rows()]
    text = "image,label\n" + "".join(f"{n} , {lab}\n\n" for n, lab in rows)
    (bach_root / "Photos" / GROUND_TRUTH_NAME).write_text("\ufeff" + text, encoding="utf-8")
    assert [r.label for r in bach_manifest(bach_root).records] == EXPECTED_LABELS


def test_ground_truth_disagreements_are_all_listed(bach_root: Path) -> None:
    rows = gt_rows()
    rows[4] = ("b002.tif", "Normal")  # row 5: filed under Benign
    rows[7] = ("is002.tif", "Tumour")  # row 8: not a class
    del rows[11]  # iv003.tif missing from the CSV
    rows += [("n999.tif", "Normal"), ("n001.tif", "Normal")]  # rows 12, 13: no such file; listed twice
    write_gt(bach_root / "Photos" / GROUND_TRUTH_NAME, rows)
    with pytest.raises(ManifestError) as info:
        bach_manifest(bach_root)
    msg = str(info.value)
    assert "5 problem(s)" in msg
    assert "row 5: b002.tif is Normal in the CSV but lies in the Benign folder (Benign/b002.tif)" in msg
    assert "row 8: is002.tif has unknown class 'Tumour'" in msg
    assert "row 12: n999.tif (Normal) not found in any class folder" in msg
    assert "row 13: n001.tif is listed again (first in row 1)" in msg
    assert "Invasive/iv003.tif is not listed in the ground-truth CSV" in msg
    assert str(bach_root / "Photos" / GROUND_TRUTH_NAME) in msg


def test_missing_class_folder(bach_root: Path) -> None:
    photos = bach_root / "Photos"
    for p in (photos / "InSitu").iterdir():
        p.unlink()
    (photos / "InSitu").rmdir()
    with pytest.raises(ManifestError, match=r"missing class folder\(s\) InSitu \(folders present: Benign, Invasive"):
        bach_manifest(bach_root)


def test_empty_class_folder_and_duplicate_names(bach_root: Path) -> None:
    photos = bach_root / "Photos"
    (photos / GROUND_TRUTH_NAME).unlink()
    for p in (photos / "Invasive").iterdir():
        p.unlink()
    write_tiff(photos / "Benign" / "n001.tif", 0)
    with pytest.raises(ManifestError) as info:
        bach_manifest(bach_root)
    msg = str(info.value)
    assert "2 problem(s)" in msg
    assert f"class folder {photos / 'Invasive'} has no .tif/.tiff images" in msg
    assert "image name used more than once: Normal/n001.tif, Benign/n001.tif" in msg


def test_no_dataset_found(tmp_path: Path) -> None:
    with pytest.raises(ManifestError, match="not found"):
        bach_manifest(tmp_path / "missing")
    (tmp_path / "Photos" / "other").mkdir(parents=True)
    with pytest.raises(ManifestError, match="No BACH class folders"):
        bach_manifest(tmp_path)
