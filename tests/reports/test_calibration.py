"""Calibration: the expected calibration error over 10 equal-width bins of the top-class confidence, its
reliability diagram, and the predictive entropy of a prediction."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from loupe.errors import LoupeError
from loupe.reports.metrics import calibration, predictive_entropy, reliability_bins
from loupe.reports.plots import plot_reliability

NAMES = ["a", "b"]
#: Confidence 0.95 (right), 0.85 (wrong), 0.6 (wrong) and 0.65 (right).
Y = np.array([0, 1, 0, 1])
PROBS = np.array([[0.95, 0.05], [0.85, 0.15], [0.4, 0.6], [0.35, 0.65]])


def test_ece_of_a_hand_computed_example():
    # Bins [0.9, 1]: acc 1, conf 0.95; [0.8, 0.9): acc 0, conf 0.85; [0.6, 0.7): acc 1/2, conf 0.625.
    # ECE = 1/4·0.05 + 1/4·0.85 + 2/4·0.125 = 0.2875.
    result = calibration(Y, PROBS, NAMES)
    assert result["bins"] == 10
    assert result["ece"] == pytest.approx(0.2875, abs=1e-12)
    table = result["table"]
    assert [b["count"] for b in table] == [0, 0, 0, 0, 0, 0, 2, 0, 1, 1]
    assert table[6]["accuracy"] == 0.5 and table[6]["confidence"] == pytest.approx(0.625)
    assert table[0]["accuracy"] is None and table[0]["low"] == 0.0 and table[9]["high"] == 1.0


def test_a_perfectly_calibrated_split_has_zero_ece_and_a_confidence_of_one_falls_in_the_last_bin():
    probs = np.array([[1.0, 0.0], [0.0, 1.0]])
    result = calibration(np.array([0, 1]), probs, NAMES)
    assert result["ece"] == 0.0
    assert reliability_bins(np.array([0, 1]), probs, NAMES)[9]["count"] == 2
    assert calibration(np.zeros(0, dtype=int), np.zeros((0, 2)), NAMES)["ece"] is None
    with pytest.raises(LoupeError, match="bin"):
        calibration(Y, PROBS, NAMES, bins=0)


def test_predictive_entropy():
    assert predictive_entropy(np.array([1.0, 0.0])) == 0.0
    assert math.copysign(1.0, predictive_entropy(np.array([1.0, 0.0]))) == 1.0  # not -0.0
    assert predictive_entropy(np.full(4, 0.25)) == pytest.approx(math.log(4))


def test_reliability_diagram_is_a_png(tmp_path: Path):
    rng = np.random.default_rng(0)
    y = rng.integers(0, 3, size=200)
    logits = rng.normal(size=(200, 3)) + 1.5 * np.eye(3)[y]
    probs = np.exp(logits) / np.exp(logits).sum(axis=1, keepdims=True)
    path = plot_reliability(y, probs, ["x", "y", "z"], tmp_path / "reliability.png")
    image = Image.open(path)
    image.load()
    assert image.format == "PNG" and min(image.size) > 300
