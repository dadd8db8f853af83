"""ROC / PR / confusion PNGs: valid images, nothing left open, undefined classes do not crash."""

from __future__ import annotations

from pathlib import Path

import matplotlib.pyplot as plt
import numpy as np
import pytest
from PIL import Image

from loupe.errors import LoupeError
from loupe.reports.plots import plot_confusion, plot_pr, plot_roc

NAMES = ["benign", "in situ", "invasive"]


def _data() -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(0)
    y = rng.integers(0, 3, size=40)
    logits = rng.normal(size=(40, 3)) + 2.0 * np.eye(3)[y]
    probs = np.exp(logits) / np.exp(logits).sum(axis=1, keepdims=True)
    return y, probs


def _assert_png(path: Path, min_size: int = 100) -> Image.Image:
    assert path.is_file() and path.stat().st_size > 0
    image = Image.open(path)
    image.load()
    assert image.format == "PNG"
    assert image.width >= min_size and image.height >= min_size
    return image


@pytest.mark.parametrize("plot", [plot_roc, plot_pr])
def test_curves_write_png(tmp_path: Path, plot) -> None:
    y, probs = _data()
    out = plot(y, probs, NAMES, tmp_path / "figs" / "curve.png")
    assert out == tmp_path / "figs" / "curve.png"
    _assert_png(out)
    assert plt.get_fignums() == []
    assert [p.name for p in (tmp_path / "figs").iterdir()] == ["curve.png"]


@pytest.mark.parametrize("plot", [plot_roc, plot_pr])
def test_curves_with_absent_class(tmp_path: Path, plot) -> None:
    y, probs = _data()
    y = np.where(y == 2, 0, y)  # class "invasive" never occurs
    _assert_png(plot(y, probs, NAMES, tmp_path / "c.png"))


def test_confusion_png_and_shape_check(tmp_path: Path) -> None:
    cm = [[5, 1, 0], [2, 3, 0], [0, 0, 0]]  # last row empty: no division by zero
    _assert_png(plot_confusion(cm, NAMES, tmp_path / "cm.png"))
    with pytest.raises(LoupeError, match="3×3"):
        plot_confusion([[1, 2], [3, 4]], NAMES, tmp_path / "bad.png")
    assert not (tmp_path / "bad.png").exists()
