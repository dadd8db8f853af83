"""describe_slide / format_description: what `loupe info` shows."""

from __future__ import annotations

from pathlib import Path

from loupe.slides import describe_slide, format_description


def test_describe_pyramid_with_magnifications(slides_dir: Path) -> None:
    d = describe_slide(
        slides_dir / "cmu-1-small-region-pyramid.svs", magnifications=["1.0", "20x", "ds8"], patch_size=256
    )
    assert d["vendor"] == "aperio" and d["dimensions"] == (2220, 2967)
    assert [lv["dimensions"] for lv in d["levels"]][:2] == [(2220, 2967), (1110, 1483)]
    assert abs(d["mpp"] - 0.499) < 1e-6 and d["objective_power"] == 20.0
    mags = {m["label"]: m for m in d["magnifications"]}
    assert mags["1mpp"]["level"] == 1 and mags["20x"]["level"] == 0 and mags["ds8"]["level"] == 3
    assert mags["ds8"]["grid"] == (2, 2)  # 2967/8 = 371 rows, 2220/8 = 278 cols -> ceil(/256)
    assert d["n_cells"] == sum(m["cells"] for m in d["magnifications"])
    text = format_description(d)
    assert "aperio" in text and "0.499 µm/px" in text and "read from level 1" in text and "grid 2 rows" in text


def test_describe_without_mpp_reports_the_fix(slides_dir: Path) -> None:
    path = slides_dir / "tcga-cr-7395-01a-01-ts1.svs"
    d = describe_slide(path, magnifications=["20x"], patch_size=256)
    assert d["mpp"] is None and "--slide-mpp" in d["magnification_error"]
    assert "--slide-mpp" in format_description(d) and "unknown" in format_description(d)
    d = describe_slide(path, mpp=0.5, magnifications=["10x"], patch_size=256)
    assert d["mpp_source"] == "override" and d["magnifications"][0]["level"] == 1
    assert "magnification_error" not in d


def test_describe_without_magnifications(slides_dir: Path) -> None:
    d = describe_slide(slides_dir / "fluorescence-dapi-40x.ndpi")
    assert "magnifications" not in d and len(d["levels"]) == 7
    assert "hamamatsu" in format_description(d)
