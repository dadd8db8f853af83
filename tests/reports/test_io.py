"""Atomic writers: complete files or none, JSON null for NaN, round-trips."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from loupe.atomic import atomic_write
from loupe.errors import LoupeError
from loupe.reports.io import (
    save_attention_npz,
    save_png,
    write_csv,
    write_json,
    write_text,
)


def test_write_json_converts_numpy_paths_and_nan(tmp_path: Path) -> None:
    obj = {
        "acc": np.float32(0.5),
        "n": np.int64(7),
        "auc": float("nan"),
        "inf": np.float64("inf"),
        "arr": np.array([[1, 2], [3, 4]]),
        "vals": np.array([0.25, np.nan]),
        "where": Path("/a/b"),
        "flag": np.bool_(True),
        3: "int key",
    }
    out = write_json(tmp_path / "sub" / "m.json", obj)
    assert out == tmp_path / "sub" / "m.json"
    text = out.read_text()
    assert "NaN" not in text and "Infinity" not in text
    loaded = json.loads(text)
    assert loaded == {
        "acc": 0.5,
        "n": 7,
        "auc": None,
        "inf": None,
        "arr": [[1, 2], [3, 4]],
        "vals": [0.25, None],
        "where": "/a/b",
        "flag": True,
        "3": "int key",
    }
    assert sorted(p.name for p in (tmp_path / "sub").iterdir()) == ["m.json"]


def test_write_json_unknown_type_fails_before_touching_the_file(tmp_path: Path) -> None:
    target = write_json(tmp_path / "m.json", {"ok": 1})
    with pytest.raises(LoupeError, match="object"):
        write_json(target, {"bad": object()})
    assert json.loads(target.read_text()) == {"ok": 1}
    assert [p.name for p in tmp_path.iterdir()] == ["m.json"]


def test_failed_write_keeps_old_file_and_leaves_no_temp(tmp_path: Path) -> None:
    target = write_text(tmp_path / "report.txt", "old")

    def crash(handle) -> None:
        handle.write(b"half of the new cont")
        raise RuntimeError("disk gone")

    with pytest.raises(RuntimeError):
        atomic_write(target, crash)
    assert target.read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["report.txt"]


def test_write_csv_columns_order_and_empty_cells(tmp_path: Path) -> None:
    rows = [
        {"slide": "s1", "prob": np.float32(0.25), "label": "tumour", "extra": "dropped"},
        {"slide": "s2", "prob": float("nan"), "label": None},
        {"slide": "s3", "label": "benign"},
    ]
    out = write_csv(tmp_path / "p.csv", rows, ["slide", "label", "prob"])
    with out.open(newline="") as handle:
        table = list(csv.reader(handle))
    assert table == [
        ["slide", "label", "prob"],
        ["s1", "tumour", "0.25"],
        ["s2", "", ""],
        ["s3", "benign", ""],
    ]
    assert [p.name for p in tmp_path.iterdir()] == ["p.csv"]


def test_attention_npz_round_trip(tmp_path: Path) -> None:
    maps = {"50X": np.random.default_rng(0).random((2, 2)), "200X": np.arange(42.0).reshape(7, 6)}
    out = save_attention_npz(tmp_path / "maps" / "slide1.npz", maps, sampled=np.array([[0, 1, 2]]))
    with np.load(out) as data:
        assert set(data.files) == {"50X", "200X", "sampled"}
        np.testing.assert_array_equal(data["50X"], maps["50X"])
        np.testing.assert_array_equal(data["200X"], maps["200X"])
        np.testing.assert_array_equal(data["sampled"], [[0, 1, 2]])
    assert [p.name for p in (tmp_path / "maps").iterdir()] == ["slide1.npz"]
    with pytest.raises(LoupeError, match="clash"):
        save_attention_npz(tmp_path / "x.npz", {"a": np.zeros(1)}, a=np.ones(1))


def test_save_png_round_trip(tmp_path: Path) -> None:
    image = np.random.default_rng(1).integers(0, 256, size=(5, 7, 3), dtype=np.uint8)
    out = save_png(tmp_path / "img.png", image)
    np.testing.assert_array_equal(np.asarray(Image.open(out)), image)
    with pytest.raises(LoupeError, match="uint8"):
        save_png(tmp_path / "bad.png", image.astype(np.float32))
    assert [p.name for p in tmp_path.iterdir()] == ["img.png"]


def test_written_files_get_ordinary_permissions(tmp_path: Path) -> None:
    reference = tmp_path / "plain.txt"
    reference.write_text("x")
    out = write_text(tmp_path / "atomic.txt", "x")
    assert out.stat().st_mode & 0o777 == reference.stat().st_mode & 0o777
