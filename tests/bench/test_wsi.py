"""`loupe bench wsi` on a small generated slide: both pipelines run through predict, the counts are the pipelines'
(k patches for loupe, every tissue tile at 20x for patch-everything) and the table and ratios are written."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from loupe.bench.wsi import Settings, run_wsi_bench


@pytest.mark.slow
def test_both_pipelines_are_measured_and_compared(tmp_path: Path):
    result = run_wsi_bench(out=tmp_path, settings=Settings(encoder="tiny", k=3, sizes=((4096, 3072),)), log=str)
    by = {r["pipeline"]: r for r in result["rows"]}
    assert by["loupe"]["patches_embedded"] == by["loupe"]["patches_read"] == 3
    tiles = by["patch_everything"]["valid_cells"]["20x"]
    assert by["patch_everything"]["patches_embedded"] == by["patch_everything"]["patches_read"] == tiles > 3
    for row in by.values():
        assert set(row["timings_s"]) >= {"open", "tissue", "patches", "encoder", "head", "write"}
        assert row["encoder_gflops"] > 0 and row["to_prediction_s"] <= row["total_s"]
    assert by["patch_everything"]["encoder_gflops"] > by["loupe"]["encoder_gflops"]
    saved = json.loads((tmp_path / "bench.json").read_text())
    assert set(saved["patch_everything_over_loupe"]) == {"4096x3072"}
    assert "patch everything ÷ loupe" in (tmp_path / "bench.md").read_text()
