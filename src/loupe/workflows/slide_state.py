"""Per-slide state of a prediction run: one small file per finished slide, the only record a worker writes per slide.

``OUT/state/<slide_id>.json`` (the id quoted into one file name) says ``done`` (with the step timings) or
``failed`` (with the reason and the fingerprint of what the failure depended on), when and by which worker. Each is
written atomically (temporary file, rename) after the slide's folder, so the cost of recording a slide does not
grow with the number of slides (the run's ``status.json`` is merged from these files, see :mod:`run_summary`).

Whether a slide is finished is decided as before: ``done`` when its folder's ``prediction.json`` was made with
the same settings (the folder is the result; the state file adds timings), ``failed`` when its state says so and
what it depended on has not changed, else still to do. With ``since`` (``--overwrite``), only what was finished
at or after that time counts: slides finished before are redone.
"""

from __future__ import annotations

import contextlib
import json
import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import quote

from loupe.reports.io import write_json
from loupe.workflows.slide_outputs import PREDICTION_FILE
from loupe.workflows.status import DONE, FAILED, PENDING

#: A file's identity for noticing change: (device, inode, size, mtime); None when absent.
Signature = tuple[int, int, int, int] | None


def _signature(path: Path) -> Signature:
    try:
        st = os.stat(path)
    except OSError:
        return None
    return (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns)


def _read_json(path: Path) -> dict[str, Any] | None:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


@dataclass(frozen=True)
class Outcome:
    """Where a slide stands: its ``status.json`` entry and, when done, its prediction summary."""

    entry: dict[str, Any]
    info: dict[str, Any] | None = None  # prediction.json of a done slide

    @property
    def status(self) -> str:
        return str(self.entry["status"])


class SlideStates:
    """The state files and slide folders of one output folder, judged against one run's settings."""

    def __init__(
        self,
        out: str | Path,
        settings: dict[str, Any],
        *,
        since: float | None = None,
        previous: dict[str, dict] | None = None,
    ) -> None:
        self.out = Path(out)
        self.root = self.out / "state"
        self.slides_dir = self.out / "slides"
        self.settings = json.loads(json.dumps(settings))  # the form it has after a round trip through JSON
        self.since = since
        self.previous = previous or {}  # status.json entries of a run made before state files existed

    def path(self, slide_id: str) -> Path:
        return self.root / f"{quote(slide_id, safe='')}.json"

    def read(self, slide_id: str) -> dict[str, Any] | None:
        """The slide's state (None when it has none, or it is unreadable)."""
        return _read_json(self.path(slide_id))

    def signature(self, slide_id: str) -> tuple[Signature, Signature]:
        """What changes when the slide's state or folder is rewritten."""
        return _signature(self.path(slide_id)), _signature(self.slides_dir / slide_id / PREDICTION_FILE)

    def _recent(self, state: dict[str, Any] | None) -> bool:
        """Whether a state counts under ``since`` (always without it)."""
        if self.since is None:
            return True
        return state is not None and float(state.get("finished_at", 0.0)) >= self.since

    def outcome(self, slide_id: str, path: str, fingerprint: Callable[[], Any] | None = None) -> Outcome:
        """Done, failed or pending, as a ``status.json`` entry. ``fingerprint`` (what a failure depends on) keeps
        a failed slide failed only while unchanged; without it, a recorded failure stands (the run summary)."""
        state = self.read(slide_id)
        if state is None:
            state = self.previous.get(slide_id)
        if self._recent(state):
            info = _read_json(self.slides_dir / slide_id / PREDICTION_FILE)
            if info is not None and info.get("settings") == self.settings:
                timings = (state or {}).get("timings_s") if (state or {}).get("status") == DONE else None
                return Outcome({"status": DONE, "path": path, "timings_s": timings or info.get("timings_s")}, info)
            if state is not None and state.get("status") == FAILED:
                keep = fingerprint is None or state.get("fingerprint") == fingerprint()
                if keep:
                    fields = {k: state.get(k) for k in ("path", "reason", "fingerprint")}
                    return Outcome({"status": FAILED, **fields})
        return Outcome({"status": PENDING, "path": path})

    def forget(self, slide_id: str) -> None:
        """Remove the slide's state before its folder is rewritten: a state never describes an older folder."""
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.path(slide_id))

    def done(self, slide_id: str, path: str, timings: dict[str, float], worker: str) -> None:
        """Record a finished slide (after its folder is in place)."""
        self._write(slide_id, {"status": DONE, "path": path, "timings_s": timings}, worker)

    def failed(self, slide_id: str, path: str, reason: str, fingerprint: Any, worker: str) -> None:
        """Record a failed slide, the reason and what the failure depended on."""
        self._write(slide_id, {"status": FAILED, "path": path, "reason": reason, "fingerprint": fingerprint}, worker)

    def _write(self, slide_id: str, entry: dict[str, Any], worker: str) -> None:
        write_json(
            self.path(slide_id),
            {"slide_id": slide_id, **entry, "finished_at": time.time(), "worker": worker},
            indent=None,
        )

    def sweep(self, older_than_s: float) -> None:
        """Delete temporary files of state writes interrupted (killed) at least ``older_than_s`` ago."""
        now = time.time()
        with contextlib.suppress(OSError), os.scandir(self.root) as entries:
            for entry in entries:
                if entry.name.startswith(".") and entry.name.endswith(".tmp"):
                    with contextlib.suppress(OSError):
                        if now - entry.stat().st_mtime > older_than_s:
                            os.unlink(entry.path)

    def worker_of(self, slide_id: str) -> str | None:
        """The worker that wrote the slide's state (None without one)."""
        state = self.read(slide_id)
        return None if state is None else state.get("worker")
