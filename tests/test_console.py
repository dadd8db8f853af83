"""The console: Lightning's messages once per process; long work as sparse lines in a log (a bar on a terminal);
predict over a large cohort logs a line every 30 s and each failure, not one line per slide."""

from __future__ import annotations

import logging
from types import SimpleNamespace

import numpy as np
import pytest

from loupe.console import LOG_INTERVAL_S, Progress, configure_console, duration, progress
from loupe.workflows import prediction


class _Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def test_lightning_repeating_itself_prints_once(capsys: pytest.CaptureFixture[str]) -> None:
    configure_console(with_lightning=False)
    lightning = logging.getLogger("lightning.pytorch.utilities.rank_zero")
    for _ in range(3):  # as three Trainers do
        lightning.info("GPU available: False, used: False (a test of the once-only filter)")
    logging.getLogger("loupe").info("a loupe line (a test)")
    logging.getLogger("loupe").info("a loupe line (a test)")  # loupe's own repeats are meant
    err = capsys.readouterr().err
    assert err.count("GPU available: False, used: False (a test") == 1, err
    assert err.count("loupe: a loupe line (a test)") == 2, err


def test_a_log_gets_a_line_every_interval_and_one_at_the_end(caplog: pytest.LogCaptureFixture) -> None:
    clock = _Clock()
    with (
        caplog.at_level(logging.INFO, logger="loupe"),
        Progress(1000, "cases", label="bench", bar=False, clock=clock) as shown,
    ):
        for i in range(1000):
            clock.now += 0.5  # 500 s in all: a line every 30 s
            shown.advance(failed=int(i == 10))
    lines = [r.getMessage() for r in caplog.records]
    assert len(lines) == int(500 / LOG_INTERVAL_S) + 1, lines
    assert lines[0] == "bench: 60/1000 cases (6.0%), 1 failed; 2.0 cases/s, about 7 min 50 s left"
    assert lines[-1] == "bench: 1000/1000 cases, 1 failed in 8 min 20 s (2.0 cases/s)"


def test_the_helper_is_a_context_manager_closing_once(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.INFO, logger="loupe"):
        with progress(2, "cases", bar=False) as shown:
            shown.advance(2)
        shown.close()
    assert [r.getMessage() for r in caplog.records][-1].startswith("2/2 cases in ")
    assert len(caplog.records) == 1


def test_durations_read_naturally() -> None:
    assert [duration(s) for s in (4.25, 42, 200, 3600, 4700)] == ["4.2 s", "42 s", "3 min 20 s", "1 h", "1 h 18 min"]


def _recorder(total: int, clock: _Clock) -> tuple[prediction._Recorder, Progress]:
    """predict's recorder over ``total`` fake slides (state files and claims stubbed), with a log-mode progress."""
    records = [SimpleNamespace(slide_id=f"slide_{i:05d}", path=f"/slides/{i}.svs") for i in range(total)]
    job = SimpleNamespace(records=records, classes=["a", "b"], fingerprint=lambda i: None)
    states = SimpleNamespace(done=lambda *a: None, failed=lambda *a: None)
    claims = SimpleNamespace(release=lambda slide_id: None, owner=SimpleNamespace(worker="w"))
    shown = Progress(total, "slides", label="predict", bar=False, clock=clock)
    return prediction._Recorder(job, states, claims, total, shown), shown  # type: ignore[arg-type]


def test_predict_over_a_large_cohort_logs_sparse_lines_and_every_failure(caplog: pytest.LogCaptureFixture) -> None:
    clock = _Clock()
    total = 10_000
    recorder, shown = _recorder(total, clock)
    result = SimpleNamespace(timings={"model": 0.3}, probs=np.array([0.2, 0.8]))
    with caplog.at_level(logging.INFO, logger="loupe"):
        for i in range(total):
            clock.now += 0.5  # 2 slides/s: 5000 s in all
            if i % 1000 == 999:
                recorder.fail(i, "corrupt tile", i + 1)
            else:
                recorder.done(i, result, i + 1)  # type: ignore[arg-type]
        shown.close()
    lines = [r.getMessage() for r in caplog.records]
    failures = [line for line in lines if " failed: " in line]
    assert len(failures) == 10 and failures[0] == "[1000/10000] slide_00999 failed: corrupt tile"
    progress_lines = [line for line in lines if line.startswith("predict: ")]
    assert len(progress_lines) == len(lines) - 10 == int(5000 / LOG_INTERVAL_S) + 1  # ~170 lines, not 10,000
    assert progress_lines[-1] == "predict: 10000/10000 slides, 10 failed in 1 h 23 min (2.0 slides/s)"
    assert "about" in progress_lines[0] and "left" in progress_lines[0]


def test_predict_over_a_few_slides_logs_each_slide(caplog: pytest.LogCaptureFixture) -> None:
    clock = _Clock()
    recorder, shown = _recorder(4, clock)
    result = SimpleNamespace(timings={"model": 0.25}, probs=np.array([0.2, 0.8]))
    with caplog.at_level(logging.INFO, logger="loupe"):
        for i in range(4):
            clock.now += 0.5
            recorder.done(i, result, i + 1)  # type: ignore[arg-type]
        shown.close()
    lines = [r.getMessage() for r in caplog.records]
    assert lines == [
        *(f"[{i + 1}/4] slide_{i:05d}: b (0.25 s)" for i in range(4)),
        "predict: 4/4 slides in 2.0 s (2.0 slides/s)",
    ]


@pytest.mark.parametrize("bar", [False, True])
def test_result_lines_print_to_stdout_beside_the_progress(bar: bool, capsys: pytest.CaptureFixture[str]) -> None:
    """A bench's result lines go to stdout whole, with or without a bar on stderr (drawn there, never in them)."""
    with Progress(2, "runs", label="bench", bar=bar) as shown:
        shown.advance()
        shown.print("run 1: accuracy 0.90")
        shown.advance()
        shown.print("run 2: accuracy 0.95")
    out, err = capsys.readouterr()
    assert out.splitlines() == ["run 1: accuracy 0.90", "run 2: accuracy 0.95"]
    assert "2/2" in err and "accuracy" not in err  # the bar (terminal) or the closing line (log)
