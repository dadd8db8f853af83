"""Manifest CSV loading, validation messages, saving and building from slide paths."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest

from loupe.data.manifest import Manifest, SlideRecord, load_manifest, manifest_from_paths, save_manifest
from loupe.errors import LoupeError, ManifestError
from loupe.slides.formats import DICOM_SUFFIXES, SLIDE_SUFFIXES


def touch(path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"x")
    return path


def write_csv(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text.lstrip("\n"), encoding="utf-8")
    return path


@pytest.fixture
def dataset(tmp_path: Path) -> Path:
    """A folder with slides/ and a manifest using relative, nested and absolute paths."""
    root = tmp_path / "data"
    for name in ("a.svs", "b.tif", "c.ndpi", "d.svs"):
        touch(root / "slides" / name)
    elsewhere = touch(tmp_path / "other" / "e.svs")
    return write_csv(
        root / "manifest.csv",
        f"""
slide_id,path,label,split,mpp,patient
s1,slides/a.svs,tumor,train,0.25,p1
,slides/b.tif,normal,val,,p1
s3,./slides/../slides/c.ndpi,normal,TEST,  0.5 ,
s4,slides/d.svs,tumor,,,p2
s5,{elsewhere},normal,validation,,
""",
    )


def test_happy_path(dataset: Path) -> None:
    m = load_manifest(dataset)
    root = dataset.parent
    assert len(m) == 5
    assert m.source == dataset
    assert [r.slide_id for r in m.records] == ["s1", "b", "s3", "s4", "s5"]  # slide_id defaults to the stem
    assert m.records[0].path == root / "slides" / "a.svs"
    assert m.records[2].path == root / "slides" / "c.ndpi"  # normalised, absolute
    assert all(r.path.is_absolute() for r in m.records)
    assert m.records[4].path == dataset.parent.parent / "other" / "e.svs"
    assert m.classes == ("normal", "tumor")  # sorted unique labels
    assert [r.mpp for r in m.records] == [0.25, None, 0.5, None, None]
    assert [r.split for r in m.records] == ["train", "val", "test", None, "val"]
    assert [r.group for r in m.records] == ["p1", "p1", None, "p2", None]  # "patient" is an alias of "group"
    np.testing.assert_array_equal(m.label_indices(), [1, 0, 0, 1, 0])
    assert m.label_indices().dtype == np.int64


def test_given_classes_fix_the_order(dataset: Path) -> None:
    m = load_manifest(dataset, classes=["tumor", "normal", "other"])
    assert m.classes == ("tumor", "normal", "other")
    np.testing.assert_array_equal(m.label_indices(), [0, 1, 1, 0, 1])


def test_relative_paths_do_not_depend_on_the_working_directory(
    dataset: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    m = load_manifest(Path("data") / "manifest.csv")
    assert m.source == dataset
    assert m.records[0].path == dataset.parent / "slides" / "a.svs"


def test_semicolon_csv_with_bom_and_group_column(tmp_path: Path) -> None:
    touch(tmp_path / "x.svs")
    path = tmp_path / "m.csv"
    path.write_bytes("\ufeffPath;Label;Group\nx.svs;a;case-1\n\n".encode())
    m = load_manifest(path)
    assert m.records == (SlideRecord("x", tmp_path / "x.svs", "a", None, None, "case-1"),)


def test_missing_manifest_file(tmp_path: Path) -> None:
    with pytest.raises(ManifestError) as e:
        load_manifest(tmp_path / "nope.csv")
    msg = str(e.value)
    assert str(tmp_path / "nope.csv") in msg and "not found" in msg
    assert "path (required)" in msg  # names the expected columns
    assert isinstance(e.value, LoupeError)


def test_missing_path_column(tmp_path: Path) -> None:
    path = write_csv(tmp_path / "m.csv", "slide_id,file,label\na,a.svs,x\n")
    with pytest.raises(ManifestError) as e:
        load_manifest(path)
    msg = str(e.value)
    assert str(path) in msg and "no 'path' column" in msg and "slide_id, file, label" in msg


@pytest.mark.parametrize(
    ("content", "expected"),
    [(b"", "empty"), (b"path,label\n", "no slide rows"), (b"path,label\n\xff\xfe\x00bad,x\n", "UTF-8")],
)
def test_unreadable_or_empty_csv(tmp_path: Path, content: bytes, expected: str) -> None:
    path = tmp_path / "m.csv"
    path.write_bytes(content)
    with pytest.raises(ManifestError) as e:
        load_manifest(path)
    assert str(path) in str(e.value) and expected in str(e.value)


def test_folder_instead_of_csv(tmp_path: Path) -> None:
    with pytest.raises(ManifestError, match="is a folder"):
        load_manifest(tmp_path)


def test_all_missing_slide_files_in_one_error(tmp_path: Path) -> None:
    touch(tmp_path / "ok.svs")
    path = write_csv(
        tmp_path / "m.csv",
        "path,label\nok.svs,a\nmissing1.svs,a\nsub/missing2.svs,b\n/abs/missing3.svs,b\n",
    )
    with pytest.raises(ManifestError) as e:
        load_manifest(path)
    msg = str(e.value)
    assert str(path) in msg
    assert "3 of 4 slide files not found" in msg
    assert f"row 3: {tmp_path / 'missing1.svs'}" in msg
    assert f"row 4: {tmp_path / 'sub' / 'missing2.svs'}" in msg
    assert "row 5: /abs/missing3.svs" in msg
    assert "'sub/missing2.svs'" in msg  # as written in the CSV
    assert "ok.svs" not in msg
    assert f"relative paths are resolved against the manifest's folder {tmp_path}" in msg
    # check_files=False skips the check (e.g. predicting on another machine)
    assert len(load_manifest(path, check_files=False)) == 4


def test_every_problem_is_reported_together(tmp_path: Path) -> None:
    for name in "abcdefg":
        touch(tmp_path / f"{name}.svs")
    path = write_csv(
        tmp_path / "m.csv",
        """
slide_id,path,label,split,mpp
s1,a.svs,tumor,train,0.5
s2,b.svs,tumour,train,
s1,c.svs,normal,tset,
s4,d.svs,,val,-1
s5,e.svs,benign,test,abc
s6,gone.svs,normal,train,
s7,f.svs,tumour,,inf
""",
    )
    with pytest.raises(ManifestError) as e:
        load_manifest(path, classes=["normal", "tumor"])
    msg = str(e.value)
    assert msg.startswith(f"Manifest {path} has 6 problem(s)")
    assert f"row 7: {tmp_path / 'gone.svs'}" in msg
    assert "'tumour' (rows 3, 8)" in msg and "'benign' (row 6)" in msg
    assert "['normal', 'tumor']" in msg  # the known classes
    assert "empty label in row 5" in msg
    assert "'s1' (rows 2, 4)" in msg
    assert "row 5: '-1'" in msg and "row 6: 'abc'" in msg and "row 8: 'inf'" in msg
    assert "row 4: 'tset'" in msg and "train, val, test" in msg


def test_unlabelled_manifest_when_labels_not_required(tmp_path: Path) -> None:
    touch(tmp_path / "a.svs")
    touch(tmp_path / "b.svs")
    path = write_csv(tmp_path / "m.csv", "path,label\na.svs,\nb.svs,x\n")
    with pytest.raises(ManifestError, match=r"empty label in row 2"):
        load_manifest(path)
    m = load_manifest(path, require_labels=False)
    assert [r.label for r in m.records] == [None, "x"]
    assert m.classes == ("x",)
    with pytest.raises(ManifestError, match="without a label: a"):
        m.label_indices()
    no_label_col = write_csv(tmp_path / "n.csv", "path\na.svs\n")
    with pytest.raises(ManifestError, match="no 'label' column"):
        load_manifest(no_label_col)
    assert load_manifest(no_label_col, require_labels=False).classes == ()


def test_repeated_given_classes_rejected(dataset: Path) -> None:
    with pytest.raises(ManifestError, match="repeated or empty"):
        load_manifest(dataset, classes=["tumor", "tumor", "normal"])


def test_subset(dataset: Path) -> None:
    m = load_manifest(dataset)
    val = m.subset("val")
    assert [r.slide_id for r in val.records] == ["b", "s5"]
    assert val.classes == m.classes and val.source == m.source
    assert [r.slide_id for r in m.subset("test").records] == ["s3"]
    unsplit = m.with_records(r for r in m.records if r.split != "test")
    with pytest.raises(ManifestError) as e:
        unsplit.subset("test")
    assert "'test'" in str(e.value) and str(dataset) in str(e.value)
    with pytest.raises(ManifestError, match="Unknown split 'holdout'"):
        m.subset("holdout")


def test_label_indices_reject_labels_outside_classes(dataset: Path) -> None:
    m = load_manifest(dataset)
    narrowed = Manifest(m.records, ("tumor",), m.source)
    with pytest.raises(ManifestError, match="outside the classes"):
        narrowed.label_indices()


def test_save_load_round_trip(dataset: Path, tmp_path: Path) -> None:
    m = load_manifest(dataset, classes=["tumor", "normal"])
    m = m.with_records([*m.records[:2], SlideRecord("odd, id", m.records[2].path, "normal", None, 0.1 + 0.2)])
    out = save_manifest(m, dataset.parent / "copy.csv")
    assert out == dataset.parent / "copy.csv"
    text = out.read_text()
    assert "slides/a.svs" in text and str(dataset.parent) not in text  # relative inside the CSV's folder
    back = load_manifest(out, classes=m.classes)
    assert back.records == m.records
    assert back.classes == m.classes

    # saved elsewhere: paths outside the CSV's folder stay absolute and still resolve
    out2 = save_manifest(m, tmp_path / "runs" / "r1" / "manifest.csv")
    assert load_manifest(out2, classes=m.classes).records == m.records
    assert not list((tmp_path / "runs" / "r1").glob(".*tmp"))  # no temp file left behind


def test_saved_manifest_has_ordinary_permissions(dataset: Path, tmp_path: Path) -> None:
    """The run's manifest.csv is readable like every other output (it used to be 0600, from mkstemp)."""
    m = load_manifest(dataset)
    old = os.umask(0o022)
    try:
        out = save_manifest(m, tmp_path / "run" / "manifest.csv")
    finally:
        os.umask(old)
    assert out.stat().st_mode & 0o777 == 0o644


def test_save_is_atomic_when_writing_fails(dataset: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    m = load_manifest(dataset)
    target = dataset.parent / "out.csv"
    target.write_text("previous\n")

    bad = m.with_records([*m.records, SlideRecord("x", Path("y"), None, None, mpp="oops")])  # type: ignore[arg-type]
    with pytest.raises(ValueError):
        save_manifest(bad, target)
    assert target.read_text() == "previous\n"
    assert sorted(p.name for p in dataset.parent.iterdir()) == ["manifest.csv", "out.csv", "slides"]


def test_manifest_from_paths_over_mixed_folder(tmp_path: Path) -> None:
    root = tmp_path / "in"
    for name in ("b.svs", "a.ndpi", "c.TIF", "notes.txt", "table.csv", ".hidden.svs", "img.png", "x.mrxs"):
        touch(root / name)
    touch(root / "x" / "Data0000.dat")  # MRXS companion data: not a slide
    for name in ("level-1.dcm", "level-0.dcm", "level-2.dcm"):
        touch(root / "case7" / "dicom" / name)
    touch(root / "vms" / "s.vms")
    touch(root / "vms" / "s_0.jpg")  # VMS tiles beside the .vms are not slides of their own
    touch(root / ".cache" / "thumb.png")
    touch(root / "nested" / "b.svs")  # same stem as root/b.svs
    single = touch(tmp_path / "single.jpeg")

    m = manifest_from_paths([root, str(single)])
    assert m.classes == () and m.source is None
    assert all(r.label is None and r.split is None for r in m.records)
    paths = [r.path for r in m.records]
    expected = [
        root / "a.ndpi",
        root / "b.svs",
        root / "c.TIF",
        root / "case7" / "dicom" / "level-0.dcm",
        root / "img.png",
        root / "nested" / "b.svs",
        root / "vms" / "s.vms",
        root / "x.mrxs",
        single,
    ]
    assert paths == expected
    ids = [r.slide_id for r in m.records]
    assert ids == ["a", "in_b", "c", "dicom", "img", "nested_b", "s", "x", "single"]
    assert len(set(ids)) == len(ids)


def test_manifest_from_paths_finds_every_slide_suffix_and_one_file_per_dicom_folder(tmp_path: Path) -> None:
    for i, suffix in enumerate(SLIDE_SUFFIXES):
        folder = tmp_path / f"slide{i:02d}"  # one folder each: JPEGs beside a .vms are its tiles, not slides
        folder.mkdir()
        for level in range(3 if suffix in DICOM_SUFFIXES else 1):
            (folder / f"level{level}{suffix.upper()}").write_bytes(b"x")
    (tmp_path / "notes.txt").write_bytes(b"x")
    found = manifest_from_paths([tmp_path])
    assert [r.path.suffix.lower() for r in found.records] == list(SLIDE_SUFFIXES)
    assert [r.slide_id for r in found.records if r.path.suffix.lower() in DICOM_SUFFIXES] == [
        f"slide{SLIDE_SUFFIXES.index(s):02d}" for s in DICOM_SUFFIXES
    ]  # a DICOM slide is named after its folder


def test_manifest_from_paths_errors_list_all_bad_paths(tmp_path: Path) -> None:
    (tmp_path / "empty").mkdir()
    touch(tmp_path / "empty" / "readme.txt")
    with pytest.raises(ManifestError) as e:
        manifest_from_paths([tmp_path / "gone1.svs", tmp_path / "gone2", tmp_path / "empty"])
    msg = str(e.value)
    assert str(tmp_path / "gone1.svs") in msg and str(tmp_path / "gone2") in msg
    assert "without slide files (.svs" in msg and str(tmp_path / "empty") in msg
