"""Learning is tested by learning: the demo task must be solved, by looking at the planted magnification.

Each run takes about 1.5-2 minutes on a 2-core CPU (the whole demo: generate, train, evaluate, predict).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from loupe.workflows.demo import run_demo


@pytest.mark.slow
@pytest.mark.parametrize(("signal", "planted"), [("highest", "20x"), ("lowest", "5x")])
def test_demo_learns_the_task_and_the_planted_magnification(tmp_path: Path, signal: str, planted: str):
    metrics = run_demo(out=tmp_path, signal_magnification=signal, progress_bar=False)
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
