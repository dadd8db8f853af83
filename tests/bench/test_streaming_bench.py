"""`loupe bench streaming`: a tiny run writes streaming.json with real, consistent measurements."""

from __future__ import annotations

import json

import pytest

from loupe.bench.streaming import streaming_command


@pytest.mark.slow  # ~27 s: one step streamed and ordinary, each in a fresh process
def test_tiny_streaming_bench_writes_measurements(tmp_path):
    out = tmp_path / "bench"
    assert streaming_command(["--size", "128", "--tile", "64", "--out", str(out), "--arch", "resnet18"]) == 0
    data = json.loads((out / "streaming.json").read_text())
    for key in ("peak_mem_streamed_bytes", "peak_mem_ordinary_bytes", "max_rel_grad_diff", "time_streamed_s"):
        assert key in data
    assert (data["size"], data["tile"], data["arch"], data["device"]) == (128, 64, "resnet18", "cpu")
    # Real process peaks, each in its own process: at least what torch itself occupies and what was held before.
    assert data["peak_mem_streamed_bytes"] > 100 * 2**20 and data["peak_mem_ordinary_bytes"] > 100 * 2**20
    runs = data["runs"]
    assert [(r["variant"], r["status"]) for r in runs] == [("streamed", "ok"), ("ordinary", "ok")]
    for run in runs:
        assert run["peak_mem_bytes"] >= run["baseline_bytes"] > 0 and run["time_s"] > 0
    assert data["ordinary_reference"]["size"] == 128
    assert [g["size"] for g in data["streamed_growth"]] == [128]
    # 128 px with 64 px tiles: 2 × 2 tiles, compared against the whole-image step in float32.
    assert data["grad_diff_size"] == 128 and data["grad_diff_tiles"] == 4
    assert 0 <= data["max_rel_grad_diff"] < 1e-4
