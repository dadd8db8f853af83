"""The run summary merged from per-slide state files: input order whatever the finishing order, failures and
pending slides, legacy folders, and no slide lost when a worker records one while another merges."""

from __future__ import annotations

import csv
import json
import random
from pathlib import Path

from loupe.data.manifest import SlideRecord
from loupe.reports import write_json
from loupe.workflows.run_summary import merge_summary
from loupe.workflows.slide_state import SlideStates

SETTINGS = {"mode": "mean", "k": 5}
CLASSES, LABELS = ["a", "b"], ["5x", "20x"]


def _finish(states: SlideStates, slide_id: str, p: float, settings: dict = SETTINGS, state: bool = True) -> None:
    """What a worker leaves for a done slide: its folder's prediction.json, then its state."""
    info = {
        "predicted": "a" if p >= 0.5 else "b",
        "probabilities": {"a": p, "b": 1 - p},
        "attention_share": {"5x": 0.25, "20x": 0.75},
        "settings": settings,
        "timings_s": {"open": 0.5, "model": 1.0},
    }
    write_json(states.slides_dir / slide_id / "prediction.json", info)
    if state:
        states.done(slide_id, f"/data/{slide_id}.svs", {"open": 0.5, "model": 1.0, "write": 0.25}, "w1")


def _records(n: int) -> list[SlideRecord]:
    return [SlideRecord(f"s{i:02d}", Path(f"/data/s{i:02d}.svs")) for i in range(n)]


def _merge(out: Path, records: list[SlideRecord], states: SlideStates) -> dict:
    merge_summary(out, records, states, {"run": "r", "settings": SETTINGS}, CLASSES, LABELS)
    return json.loads((out / "status.json").read_text())


def test_rows_follow_the_inputs_whatever_order_slides_finish_in(tmp_path):
    records = _records(12)
    finished = {}
    for order, out in ((list(range(12)), tmp_path / "one"), (random.Random(0).sample(range(12), 12), tmp_path / "two")):
        states = SlideStates(out, SETTINGS)
        for i in order:
            if i == 3:
                states.failed("s03", "/data/s03.svs", "SlideError: unreadable", {"file": None}, "w2")
            elif i != 7:  # s07: still pending
                _finish(states, f"s{i:02d}", p=i / 12)
        status = _merge(out, records, states)
        finished[out.name] = ((out / "predictions.csv").read_text(), status["slides"])
    assert finished["one"] == finished["two"]
    csv_text, slides = finished["one"]
    rows = list(csv.DictReader(csv_text.splitlines()))
    assert [r["slide_id"] for r in rows] == [f"s{i:02d}" for i in range(12) if i not in (3, 7)]
    assert slides["s03"] == {
        "status": "failed",
        "path": "/data/s03.svs",
        "reason": "SlideError: unreadable",
        "fingerprint": {"file": None},
    }
    assert slides["s07"] == {"status": "pending", "path": "/data/s07.svs"}
    assert slides["s00"]["timings_s"]["write"] == 0.25  # the state's timings, which include the write
    timings = list(csv.DictReader((tmp_path / "one" / "timings.csv").open()))
    assert [t["slide_id"] for t in timings] == [r["slide_id"] for r in rows] and float(timings[0]["total"]) == 1.75


def test_other_settings_are_pending_and_a_folder_without_state_is_done(tmp_path):
    states = SlideStates(tmp_path, SETTINGS)
    _finish(states, "s00", 0.9, settings={"mode": "topk", "k": 5})  # made with other settings
    _finish(states, "s01", 0.9, state=False)  # killed between its folder and its state (or loupe ≤ 0.2)
    status = _merge(tmp_path, _records(2), states)
    assert status["slides"]["s00"]["status"] == "pending"
    timings = {"open": 0.5, "model": 1.0}  # prediction.json's, without the write
    assert status["slides"]["s01"] == {"status": "done", "path": "/data/s01.svs", "timings_s": timings}


def test_a_slide_recorded_while_another_worker_merges_is_not_lost(tmp_path):
    """Worker 1 reads the states (s01 pending), worker 2 records s01 and merges, worker 1 writes last: without the
    check after writing, the summary would miss s01."""
    records = _records(2)

    class Racing(SlideStates):
        """Worker 1's view: worker 2 finishes s01 and merges right after worker 1 has read s01."""

        raced = False

        def outcome(self, slide_id, path, fingerprint=None):
            seen = super().outcome(slide_id, path, fingerprint)
            if slide_id == "s01" and not self.raced:
                self.raced = True
                other = SlideStates(tmp_path, SETTINGS)
                _finish(other, "s01", 0.2)
                merge_summary(tmp_path, records, other, {"run": "r", "settings": SETTINGS}, CLASSES, LABELS)
            return seen

    states = Racing(tmp_path, SETTINGS)
    _finish(states, "s00", 0.8)
    status = _merge(tmp_path, records, states)
    assert states.raced
    assert {k: v["status"] for k, v in status["slides"].items()} == {"s00": "done", "s01": "done"}
    rows = list(csv.DictReader((tmp_path / "predictions.csv").open()))
    assert [r["slide_id"] for r in rows] == ["s00", "s01"]


def test_overwrite_counts_only_what_was_finished_since(tmp_path):
    states = SlideStates(tmp_path, SETTINGS)
    _finish(states, "s00", 0.9)
    state = json.loads(states.path("s00").read_text())
    assert states.outcome("s00", "p").status == "done"
    later = SlideStates(tmp_path, SETTINGS, since=state["finished_at"] + 1)
    assert later.outcome("s00", "p").status == "pending"  # finished before this --overwrite run: redo it
    assert SlideStates(tmp_path, SETTINGS, since=state["finished_at"]).outcome("s00", "p").status == "done"
    states.failed("s01", "p", "boom", {"file": 1}, "w")
    assert states.outcome("s01", "p", lambda: {"file": 1}).status == "failed"
    assert states.outcome("s01", "p", lambda: {"file": 2}).status == "pending"  # the file changed: retry it
    assert states.outcome("s01", "p").status == "failed"  # the summary reports the failure as recorded
