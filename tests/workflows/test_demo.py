"""Learning is tested by learning: the demo task must be solved, by looking at the planted magnification.

The test runs the whole demo (generate, train, evaluate, predict) with 12 of the preset's 40 epochs: on a 2-core
CPU that is about 40 s a run instead of 2.5 minutes. Both tasks are solved by epoch 3-5 (validation accuracy 1.0, the
planted magnification's attention over 60% from epoch 3 for 20x and epoch 4 for 5x, 96% for 5x at epoch 12), so 12
epochs still leave a margin; the preset keeps 40 so that the user's demo settles its attention fully.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from loupe.workflows.demo import run_demo

#: Epochs of the test's demo runs (the preset trains 40; see the module docstring).
EPOCHS = 12


@pytest.mark.slow
@pytest.mark.parametrize(("signal", "planted"), [("highest", "20x"), ("lowest", "5x")])
def test_demo_learns_the_task_and_the_planted_magnification(tmp_path: Path, signal: str, planted: str):
    metrics = run_demo(out=tmp_path, signal_magnification=signal, epochs=EPOCHS, progress_bar=False)
    assert metrics["signal_magnification"] == planted
    assert metrics["accuracy"] >= 0.90, metrics
    assert metrics["attention_share"][planted] >= 0.60, metrics["attention_share"]

    saved = json.loads((tmp_path / "metrics.json").read_text())
    assert saved["attention_share"] == metrics["attention_share"]
    report = (tmp_path / "report.md").read_text()
    assert "planted" in report and "overlay.png" in report
    for ref in ("eval/roc.png", "eval/pr.png", "eval/confusion.png"):
        assert (tmp_path / ref).is_file()
    overlays = sorted((tmp_path / "predict" / "slides").glob("*/overlay.png"))
    assert len(overlays) == 4
