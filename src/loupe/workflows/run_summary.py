"""The run summary of a prediction folder (``status.json``, ``predictions.csv``, ``timings.csv``), merged from the
per-slide state files and slide folders (:mod:`slide_state`).

Every worker merges when it ends, and so does a re-run; each merge reads every slide of the request and writes the
three files atomically, rows in the order of the inputs, so that the result does not depend on which worker
finished first or how many there were. Two merges can overlap: the one whose files land last may have read before
another worker recorded a slide. So after writing, a merge checks that no state or slide folder it read has changed
since it read it, and merges again if one has: whichever merge writes last then has seen every slide recorded
before it checked, and a slide recorded after that check is merged again by the worker that recorded it. A worker
killed between recording a slide and merging leaves the summary one slide behind until the next merge (any
re-run, which skips all finished work).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from loupe.data.manifest import SlideRecord
from loupe.reports import write_csv
from loupe.workflows.common import prediction_columns
from loupe.workflows.slide_state import Outcome, SlideStates
from loupe.workflows.status import DONE, RunStatus

log = logging.getLogger("loupe")

TIMING_STEPS = ("open", "thumbnail", "overview", "tissue", "patches", "model", "write")
#: Merges in a row that found a change (other workers still finishing slides) before giving up to them.
MAX_MERGES = 5


def merge_summary(
    out: str | Path,
    records: Sequence[SlideRecord],
    states: SlideStates,
    header: dict[str, Any],
    classes: list[str],
    labels: list[str],
) -> RunStatus:
    """Write ``status.json``, ``predictions.csv`` and ``timings.csv`` of ``records`` from their slide states and
    folders; returns the status written."""
    out_dir = Path(out)
    status = RunStatus(out_dir / "status.json", header)
    for _ in range(MAX_MERGES):
        seen = {r.slide_id: states.signature(r.slide_id) for r in records}
        outcomes = {r.slide_id: states.outcome(r.slide_id, str(r.path)) for r in records}
        status = RunStatus(out_dir / "status.json", header, {k: o.entry for k, o in outcomes.items()})
        status.save()
        _write_tables(out_dir, records, outcomes, classes, labels)
        changed = [r.slide_id for r in records if states.signature(r.slide_id) != seen[r.slide_id]]
        if not changed:
            break
        log.debug("%d slides were recorded while merging (%s...): merging again", len(changed), changed[0])
    return status


def _write_tables(
    out_dir: Path, records: Sequence[SlideRecord], outcomes: dict[str, Outcome], classes: list[str], labels: list[str]
) -> None:
    """predictions.csv and timings.csv over every finished slide of the request, in input order."""
    with_label = any(r.label for r in records)
    fields = ["slide_id", "path", *(["label"] if with_label else [])]
    columns = prediction_columns(fields, classes, labels)
    rows, timing_rows = [], []
    for rec in records:
        outcome = outcomes[rec.slide_id]
        info = outcome.info
        if outcome.status != DONE or info is None:
            continue
        row: dict[str, Any] = {"slide_id": rec.slide_id, "path": str(rec.path), "predicted": info["predicted"]}
        if with_label:
            row["label"] = rec.label or ""
        row |= {f"prob_{c}": info["probabilities"].get(c) for c in classes}
        row |= {f"attention_{m}": info["attention_share"].get(m) for m in labels}
        # Slide folders written before these fields existed leave their cells empty.
        row |= {f"std_{c}": (info.get("probability_std") or {}).get(c) for c in classes}
        row |= {"entropy": info.get("entropy"), "patches_read": info.get("patches_read")}
        rows.append(row)
        t = outcome.entry.get("timings_s") or {}
        timing_rows.append({"slide_id": rec.slide_id, **t, "total": round(sum(t.values()), 4)})
    write_csv(out_dir / "predictions.csv", rows, columns)
    write_csv(out_dir / "timings.csv", timing_rows, ["slide_id", *TIMING_STEPS, "total"])
