"""Each prediction's Monte-Carlo spread (``std_<class>``, ``entropy``, ``patches_read``) in predictions.csv and
prediction.json, and calibration in ``loupe evaluate``; older slide folders without them still merge."""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path

import pytest

from loupe.data.manifest import SlideRecord
from loupe.reports import write_json
from loupe.workflows.evaluation import evaluate
from loupe.workflows.prediction import predict
from loupe.workflows.run_summary import merge_summary
from loupe.workflows.slide_state import SlideStates

CLASSES = ("horizontal", "vertical")
UNCERTAINTY = {"std_horizontal", "std_vertical", "entropy", "patches_read"}


@pytest.mark.slow
def test_evaluate_reports_calibration_and_each_slides_spread(trained_run: Path, tmp_path: Path):
    m = evaluate(trained_run, split="test", out=tmp_path, inference="mean", samples=4)
    saved = json.loads((tmp_path / "metrics.json").read_text())
    assert 0.0 <= saved["ece"] <= 1.0 and saved["calibration_bins"] == 10
    assert sum(b["count"] for b in saved["reliability"]) == saved["n"] == 4
    assert saved["mean_probability_std"] > 0  # four different draws of 5 cells disagree a little
    assert saved["mean_patches_read"] <= 4 * 5 and m["ece"] == saved["ece"]
    assert (tmp_path / "reliability.png").stat().st_size > 1000
    rows = list(csv.DictReader((tmp_path / "predictions.csv").open()))
    assert set(rows[0]) >= UNCERTAINTY
    assert list(rows[0])[: 3 + len(CLASSES)] == ["slide_id", "label", "predicted", "prob_horizontal", "prob_vertical"]
    for r in rows:
        p = [float(r[f"prob_{c}"]) for c in CLASSES]
        assert float(r["entropy"]) == pytest.approx(-sum(x * math.log(x) for x in p if x > 0), abs=1e-5)
        assert float(r["std_horizontal"]) == pytest.approx(float(r["std_vertical"]), abs=1e-6)  # two classes
        assert 1 <= int(r["patches_read"]) <= 20
    exhaustive = evaluate(trained_run, split="test", out=tmp_path / "all", inference="exhaustive")
    assert exhaustive["mean_probability_std"] == 0.0


@pytest.mark.slow
def test_predict_writes_the_spread_into_prediction_json_and_predictions_csv(
    trained_run: Path, small_manifest: Path, tmp_path: Path
):
    image = sorted((small_manifest.parent / "images").glob("test_*.tif"))[0]
    out = tmp_path / "out"
    predict(trained_run, [image], out=out, workers=0, inference="mean", samples=3)
    info = json.loads((out / "slides" / image.stem / "prediction.json").read_text())
    assert set(info["probability_std"]) == set(CLASSES) and info["probability_std"]["vertical"] >= 0
    assert info["entropy"] > 0 and info["patches_read"] == len({c["cell"] for c in info["cells_read"]})
    (row,) = list(csv.DictReader((out / "predictions.csv").open()))
    assert float(row["std_vertical"]) == pytest.approx(info["probability_std"]["vertical"])
    assert int(row["patches_read"]) == info["patches_read"]


def test_slide_folders_written_before_the_spread_existed_still_merge(tmp_path: Path):
    settings = {"mode": "mean", "k": 5}
    states = SlideStates(tmp_path, settings)
    info = {
        "predicted": "a",
        "probabilities": {"a": 0.7, "b": 0.3},
        "attention_share": {"5x": 1.0},
        "settings": settings,
        "timings_s": {"model": 1.0},
    }
    write_json(states.slides_dir / "old" / "prediction.json", info)
    states.done("old", "/data/old.svs", {"model": 1.0}, "w1")
    merge_summary(tmp_path, [SlideRecord("old", Path("/data/old.svs"))], states, {"run": "r"}, ["a", "b"], ["5x"])
    (row,) = list(csv.DictReader((tmp_path / "predictions.csv").open()))
    assert row["prob_a"] == "0.7" and row["std_a"] == "" and row["entropy"] == "" and row["patches_read"] == ""
