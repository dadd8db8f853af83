"""Adaptive inference through evaluate and predict: the patches read per slide are recorded, the settings too."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest

from loupe.workflows.evaluation import evaluate
from loupe.workflows.prediction import predict

pytestmark = pytest.mark.slow  # trained_run trains (once per session)


def test_evaluate_and_predict_record_the_patches_read(trained_run: Path, small_manifest: Path, tmp_path: Path):
    m = evaluate(trained_run, split="test", out=tmp_path / "eval", inference="adaptive", epsilon=1e-9, budget=15)
    assert m["inference"] == {"mode": "adaptive", "samples": 1, "k": 5, "epsilon": 1e-9, "budget": 15}
    assert m["mean_patches_read"] == 15  # ε unreachable: the budget, 3 rounds of 5 (every slide has 64 cells)
    rows = list(csv.DictReader((tmp_path / "eval" / "predictions.csv").open()))
    assert [int(r["patches_read"]) for r in rows] == [15] * 4
    image = sorted((small_manifest.parent / "images").glob("test_*.tif"))[0]
    out = tmp_path / "out"
    predict(trained_run, [image], out=out, workers=0, inference="adaptive", epsilon=0.5, budget=40)
    info = json.loads((out / "slides" / image.stem / "prediction.json").read_text())
    assert info["settings"]["mode"] == "adaptive" and info["settings"]["budget"] == 40
    assert info["patches_read"] == 15  # SE < 0.5 after round 2, one more round: 3 × 5
    assert len({c["cell"] for c in info["cells_read"]}) == len(info["cells_read"]) == 15
