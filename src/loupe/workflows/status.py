"""The status file of a batch run: every slide is pending, done or failed (with the reason), with counts.

``loupe predict`` writes it whole, atomically, when a worker ends (merged from the per-slide state files: see
:mod:`loupe.workflows.run_summary`), never once per slide: what an interrupted run left is in the state files, and
any re-run merges them again."""

from __future__ import annotations

from collections import Counter
from pathlib import Path
from typing import Any

from loupe.reports.io import write_json

PENDING, DONE, FAILED = "pending", "done", "failed"


class RunStatus:
    """``status.json`` of a prediction run: settings, per-slide entries and counts."""

    def __init__(self, path: str | Path, header: dict[str, Any], slides: dict[str, dict] | None = None) -> None:
        self.path = Path(path)
        self.header = dict(header)
        self.slides: dict[str, dict] = dict(slides or {})

    @classmethod
    def previous_slides(cls, path: str | Path) -> dict[str, dict]:
        """The slide entries of an earlier run's status file (empty when absent or unreadable)."""
        import json

        try:
            data = json.loads(Path(path).read_text())
            slides = data.get("slides", {})
            return slides if isinstance(slides, dict) else {}
        except (OSError, ValueError):
            return {}

    def set(self, slide_id: str, state: str, save: bool = False, **fields: Any) -> None:
        """Record a slide's state (and fields such as path, reason, timings); with ``save``, write the file."""
        self.slides[slide_id] = {"status": state, **fields}
        if save:
            self.save()

    def counts(self) -> dict[str, int]:
        """Slides per state."""
        c = Counter(entry["status"] for entry in self.slides.values())
        return {state: c.get(state, 0) for state in (DONE, FAILED, PENDING)}

    def failed(self) -> dict[str, dict]:
        """The failed slides' entries."""
        return {k: v for k, v in self.slides.items() if v["status"] == FAILED}

    def save(self) -> Path:
        """Write the whole file atomically."""
        return write_json(self.path, {**self.header, "counts": self.counts(), "slides": self.slides})
