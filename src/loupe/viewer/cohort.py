"""The slides a viewer shows: a `loupe predict` output folder read as it is, also while workers still fill it.

A predict folder (see :mod:`loupe.workflows.prediction`) has ``status.json`` and ``predictions.csv`` (merged when a
worker ends), one ``state/<quoted id>.json`` per finished slide and ``slides/<id>/`` folders. The cohort is the
merged summary plus every state file written since it: a slide that finishes appears at the next refresh. Files
are re-read only when their size or mtime changed, so a refresh of 10,000 slides costs one directory scan.

A run folder (``loupe train``) is shown through its evaluated split (``eval-<split>/predictions.csv``, paths from
the run's manifest), with the per-slide outputs of any predict folder inside the run.

Nothing here writes: the viewer is read-only over the folders it shows.
"""

from __future__ import annotations

import csv
import json
import math
import os
import threading
import time
from abc import ABC, abstractmethod
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import unquote

import yaml

from loupe.errors import ConfigError

#: The names loupe predict gives its files (workflows/prediction.py, run_summary.py, slide_outputs.py); repeated
#: here so that the viewer does not import the prediction workflow (and torch) to read them.
STATUS_FILE, PREDICTIONS_FILE, STATE_DIR, SLIDES_DIR = "status.json", "predictions.csv", "state", "slides"
PREDICTION_FILE, CONFIG_FILE = "prediction.json", "config.yaml"
DONE, FAILED, PENDING = "done", "failed", "pending"

#: Columns of the cohort table, in display order: (key, title, numeric).
COLUMNS: tuple[tuple[str, str, bool], ...] = (
    ("slide_id", "slide", False),
    ("status", "status", False),
    ("predicted", "predicted", False),
    ("probability", "probability", True),
    ("label", "true label", False),
    ("correct", "right/wrong", False),
    ("time_s", "time (s)", True),
    ("reason", "reason", False),
)
COLUMN_KEYS = tuple(key for key, _, _ in COLUMNS)
#: How often (seconds) the folder is looked at again at most: a page of requests shares one scan.
REFRESH_S = 1.0

_Signature = tuple[int, int] | None


def _signature(path: Path) -> _Signature:
    try:
        st = path.stat()
    except OSError:
        return None
    return (st.st_mtime_ns, st.st_size)


def _read_json(path: Path) -> dict[str, Any] | None:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def _float(value: Any) -> float | None:
    try:
        number = float(value)
    except (TypeError, ValueError):
        return None
    return number if math.isfinite(number) else None


@dataclass
class SlideRow:
    """One slide of the cohort, as the table shows it."""

    slide_id: str
    status: str
    path: str | None = None
    predicted: str | None = None
    probabilities: dict[str, float] = field(default_factory=dict)
    label: str | None = None
    reason: str | None = None
    attention_share: dict[str, float] = field(default_factory=dict)
    timings_s: dict[str, float] = field(default_factory=dict)

    @property
    def probability(self) -> float | None:
        """The predicted class's probability."""
        return self.probabilities.get(self.predicted) if self.predicted else None

    @property
    def correct(self) -> str | None:
        """Right or wrong against the true label, None without one."""
        if not self.label or not self.predicted:
            return None
        return "right" if self.label == self.predicted else "wrong"

    @property
    def time_s(self) -> float | None:
        values = [v for v in self.timings_s.values() if isinstance(v, (int, float))]
        return round(sum(values), 4) if values else None

    def value(self, key: str) -> Any:
        return getattr(self, key)

    def record(self) -> dict[str, Any]:
        """The JSON form the pages read."""
        return {key: self.value(key) for key in COLUMN_KEYS} | {
            "probabilities": self.probabilities,
            "attention_share": self.attention_share,
            "timings_s": self.timings_s,
        }


@dataclass(frozen=True)
class RunInfo:
    """What the viewer needs from the run that made the predictions (its ``config.yaml``), when it is there."""

    architecture: str | None = None
    magnifications: tuple[str, ...] = ()
    patch_size: int | None = None
    backend: str = "auto"

    @classmethod
    def read(cls, run: Path | None) -> RunInfo:
        if run is None:
            return cls()
        try:
            cfg = yaml.safe_load((run / CONFIG_FILE).read_text())
        except (OSError, yaml.YAMLError):
            return cls()
        if not isinstance(cfg, dict):
            return cls()
        model = cfg.get("model") or {}
        arch = model.get("architecture") if isinstance(model, dict) else None
        mags = model.get("magnifications") if isinstance(model, dict) else None
        section = cfg.get(str(arch)) or {}
        patch = section.get("patch_size") if isinstance(section, dict) else None
        data = cfg.get("data") or {}
        backend = data.get("backend") if isinstance(data, dict) else None
        return cls(
            architecture=str(arch) if arch else None,
            magnifications=tuple(str(m) for m in mags) if isinstance(mags, list) else (),
            patch_size=int(patch) if isinstance(patch, int) and patch > 0 else None,
            backend=str(backend) if isinstance(backend, str) else "auto",
        )


def is_predict_folder(path: Path) -> bool:
    return (path / STATUS_FILE).is_file() or (path / STATE_DIR).is_dir() or (path / SLIDES_DIR).is_dir()


def is_run_folder(path: Path) -> bool:
    return (path / CONFIG_FILE).is_file() and (path / "checkpoints").is_dir()


class Cohort(ABC):
    """The slides of a folder, in their order, refreshed from disk at most every :data:`REFRESH_S` seconds."""

    def __init__(self, root: Path, *, title: str, run: Path | None, slide_roots: Iterable[Path]) -> None:
        self.root = root
        self.title = title
        self.run = run
        self.run_info = RunInfo.read(run)
        self.slide_roots = [p for p in slide_roots if p.is_dir()]
        self.notice: str | None = None
        self._rows: dict[str, SlideRow] = {}
        self._lock = threading.Lock()
        self._checked = -math.inf

    # --- reading --------------------------------------------------------------------------------------
    def refresh(self, force: bool = False) -> None:
        with self._lock:
            now = time.monotonic()
            if force or now - self._checked >= REFRESH_S:
                self._load()
                self._checked = time.monotonic()

    @abstractmethod
    def _load(self) -> None:
        """Bring the rows up to date with the files (called under the lock)."""

    @abstractmethod
    def prediction(self, slide_id: str) -> dict[str, Any] | None:
        """The slide's ``prediction.json``, None when it has no per-slide outputs."""

    def rows(self) -> list[SlideRow]:
        self.refresh()
        return list(self._rows.values())

    def get(self, slide_id: str) -> SlideRow | None:
        self.refresh()
        return self._rows.get(slide_id)

    @property
    def classes(self) -> list[str]:
        seen: dict[str, None] = {}
        for row in self._rows.values():
            seen.update(dict.fromkeys(row.probabilities))
        return list(seen)

    def slide_folder(self, slide_id: str) -> Path | None:
        """The slide's output folder, only when it lies inside the folder shown (no symlink leads out of it)."""
        for base in self.slide_roots:
            folder = base / slide_id
            try:
                real = folder.resolve(strict=True)
            except (OSError, RuntimeError):
                continue
            if real.parent == base.resolve() and real.is_dir():
                return real
        return None

    def slide_path(self, row: SlideRow) -> Path | None:
        """The slide file of a row: as recorded, or relative to the folder shown."""
        if not row.path:
            return None
        path = Path(os.path.expanduser(row.path))
        if not path.is_absolute() and not path.exists() and (self.root / path).exists():
            return self.root / path
        return path


class PredictCohort(Cohort):
    """A `loupe predict` output folder."""

    def __init__(self, root: Path) -> None:
        status = _read_json(root / STATUS_FILE) or {}
        run = Path(status["run"]) if isinstance(status.get("run"), str) else None
        super().__init__(root, title=str(root), run=run, slide_roots=[root / SLIDES_DIR])
        self.slide_roots = [root / SLIDES_DIR]  # also before a worker made it
        self._status_sig: _Signature = None
        self._table_sig: _Signature = None
        self._status: dict[str, dict[str, Any]] = {}
        self._table: dict[str, dict[str, str]] = {}
        self._states: dict[str, tuple[_Signature, dict[str, Any]]] = {}
        self._infos: dict[str, tuple[_Signature, dict[str, Any] | None]] = {}

    def _load(self) -> None:
        """Rows of the slides whose files changed are made again; a new summary remakes them all."""
        remake = False
        sig = _signature(self.root / STATUS_FILE)
        if sig != self._status_sig:
            data = _read_json(self.root / STATUS_FILE) or {}
            slides = data.get("slides")
            self._status = (
                {str(k): v for k, v in slides.items() if isinstance(v, dict)} if isinstance(slides, dict) else {}
            )
            self._status_sig, remake = sig, True
        sig = _signature(self.root / PREDICTIONS_FILE)
        if sig != self._table_sig:
            self._table = _read_table(self.root / PREDICTIONS_FILE)
            self._table_sig, remake = sig, True
        changed = self._scan_states()
        ids = list(self._status)
        ids += sorted((k for k in self._states if k not in self._status), key=self._finished_at)
        old = self._rows
        self._rows = {
            slide_id: old[slide_id]
            if not remake and slide_id in old and slide_id not in changed
            else self._row(slide_id)
            for slide_id in ids
        }

    def _finished_at(self, slide_id: str) -> float:
        return _float(self._states[slide_id][1].get("finished_at")) or 0.0

    def _scan_states(self) -> set[str]:
        """Read the state files written or changed since the last scan (one small JSON file per finished slide);
        returns the slides whose state changed."""
        folder = self.root / STATE_DIR
        seen: set[str] = set()
        changed: set[str] = set()
        try:
            entries = list(os.scandir(folder))
        except OSError:
            entries = []
        for entry in entries:
            if entry.name.startswith(".") or not entry.name.endswith(".json"):
                continue
            slide_id = unquote(entry.name[: -len(".json")])
            seen.add(slide_id)
            try:
                st = entry.stat()
            except OSError:
                continue
            sig = (st.st_mtime_ns, st.st_size)
            known = self._states.get(slide_id)
            if known is not None and known[0] == sig:
                continue
            state = _read_json(Path(entry.path))
            if state is not None:
                self._states[slide_id] = (sig, state)
                changed.add(slide_id)
        for gone in set(self._states) - seen:
            del self._states[gone]
            changed.add(gone)
        return changed

    def _row(self, slide_id: str) -> SlideRow:
        entry = dict(self._status.get(slide_id, {}))
        state = self._states.get(slide_id)
        merged = self._status_sig
        if state is not None and state[0] is not None and (merged is None or state[0][0] > merged[0] or not entry):
            entry = state[1]  # recorded after the summary was merged
        status = str(entry.get("status", PENDING))
        row = SlideRow(slide_id, status, path=entry.get("path"), reason=entry.get("reason"))
        timings = entry.get("timings_s")
        if isinstance(timings, dict):
            row.timings_s = {str(k): v for k, v in timings.items() if _float(v) is not None}
        table = self._table.get(slide_id)
        if table is not None:
            row.label = table.get("label") or None
        if status != DONE:
            return row
        if table is not None and table.get("predicted"):
            _fill_from_table(row, table)
        else:
            info = self.prediction(slide_id)
            if info is not None:
                _fill_from_info(row, info)
        return row

    def prediction(self, slide_id: str) -> dict[str, Any] | None:
        """The slide's ``prediction.json`` (read again only when it changed)."""
        folder = self.slide_folder(slide_id)
        if folder is None:
            return None
        path = folder / PREDICTION_FILE
        sig = _signature(path)
        known = self._infos.get(slide_id)
        if known is not None and known[0] == sig:
            return known[1]
        info = _read_json(path)
        self._infos[slide_id] = (sig, info)
        return info


class EvaluationCohort(Cohort):
    """A run folder's evaluated split: rows from ``eval-<split>/predictions.csv``, paths from the run's manifest,
    per-slide outputs from the predict folders inside the run."""

    def __init__(self, run: Path, table: Path) -> None:
        slide_roots = [p / SLIDES_DIR for p in sorted(run.iterdir()) if p.is_dir() and is_predict_folder(p)]
        super().__init__(run, title=f"{run} ({table.parent.name})", run=run, slide_roots=slide_roots)
        self.table = table
        self._sig: _Signature = None
        if not self.slide_roots:
            self.notice = (
                "this run has no per-slide outputs: `loupe predict "
                f"{run} SLIDES --out {run}/predict` writes the attention maps of each slide"
            )

    def _load(self) -> None:
        sig = _signature(self.table)
        if sig == self._sig:
            return
        paths = {r.get("slide_id", ""): r.get("path", "") for r in _read_rows(self._manifest())}
        rows = {}
        for slide_id, record in _read_table(self.table).items():
            row = SlideRow(slide_id, DONE, path=paths.get(slide_id) or None, label=record.get("label") or None)
            _fill_from_table(row, record)
            rows[slide_id] = row
        self._rows, self._sig = rows, sig

    def _manifest(self) -> Path:
        copied = self.root / "manifest.csv"
        return copied if copied.is_file() else self.root / "__no_manifest__"

    def prediction(self, slide_id: str) -> dict[str, Any] | None:
        folder = self.slide_folder(slide_id)
        return None if folder is None else _read_json(folder / PREDICTION_FILE)


def _read_rows(path: Path) -> list[dict[str, str]]:
    try:
        with path.open(newline="") as handle:
            return list(csv.DictReader(handle))
    except (OSError, csv.Error, UnicodeDecodeError):
        return []


def _read_table(path: Path) -> dict[str, dict[str, str]]:
    """A predictions.csv by slide id."""
    return {row["slide_id"]: row for row in _read_rows(path) if row.get("slide_id")}


def _fill_from_table(row: SlideRow, record: dict[str, str]) -> None:
    row.predicted = record.get("predicted") or None
    for key, value in record.items():
        number = _float(value)
        if key.startswith("prob_") and number is not None:
            row.probabilities[key[len("prob_") :]] = number
        elif key.startswith("attention_") and number is not None:
            row.attention_share[key[len("attention_") :]] = number


def _fill_from_info(row: SlideRow, info: dict[str, Any]) -> None:
    row.predicted = info.get("predicted")
    probs = info.get("probabilities")
    if isinstance(probs, dict):
        row.probabilities = {str(k): v for k, v in probs.items() if _float(v) is not None}
    shares = info.get("attention_share")
    if isinstance(shares, dict):
        row.attention_share = {str(k): v for k, v in shares.items() if _float(v) is not None}


def open_cohort(path: str | Path, split: str | None = None) -> Cohort:
    """The cohort of a predict output folder, or of a run folder's evaluated split (``split``, default test or
    the only one evaluated); a folder that is neither, or a run without an evaluated split, is one message
    naming the command that makes what is missing."""
    root = Path(os.path.expanduser(path))
    if not root.is_dir():
        raise ConfigError(f"{root}: no such folder; pass a `loupe predict` output folder (its --out) or a run folder")
    root = root.resolve()
    if is_predict_folder(root):
        return PredictCohort(root)
    if is_run_folder(root):
        return EvaluationCohort(root, _evaluated_split(root, split))
    raise ConfigError(
        f"{root} is neither a `loupe predict` output folder (status.json, slides/) nor a run folder of "
        "`loupe train` (config.yaml, checkpoints/): pass the folder given to `loupe predict --out`"
    )


def _evaluated_split(run: Path, split: str | None) -> Path:
    tables = {p.parent.name[len("eval-") :]: p for p in sorted(run.glob("eval-*/predictions.csv"))}
    if split is not None:
        if split in tables:
            return tables[split]
        raise ConfigError(
            f"{run}: split {split!r} was not evaluated (evaluated: {', '.join(tables) or 'none'}); "
            f"`loupe evaluate {run} --split {split}` writes it"
        )
    if not tables:
        raise ConfigError(
            f"{run} is a run folder with no evaluated split and no per-slide outputs: `loupe evaluate {run} "
            f"--split test` writes the split's predictions, `loupe predict {run} SLIDES --out {run}/predict` each "
            f"slide's attention maps (then `loupe view {run}/predict`)"
        )
    return tables.get("test") or next(iter(tables.values()))


def query(
    rows: list[SlideRow], *, sort: str | None = None, descending: bool = False, filters: dict[str, str] | None = None
) -> list[SlideRow]:
    """Rows filtered (per column: a case-insensitive substring, or for numbers ``>0.9``, ``<=5``, ``0.5``) and
    sorted by one column (empty values last); the order is the folder's when ``sort`` is None. Unknown columns
    and malformed filters are a :class:`ValueError` (the app answers 400)."""
    selected = rows
    for key, text in (filters or {}).items():
        if key not in COLUMN_KEYS:
            raise ValueError(f"unknown column {key!r}: filter one of {', '.join(COLUMN_KEYS)}")
        text = text.strip()
        if text:
            test = _matcher(key, text)
            selected = [r for r in selected if test(r.value(key))]
    if sort is None:
        return list(selected)
    if sort not in COLUMN_KEYS:
        raise ValueError(f"unknown column {sort!r}: sort by one of {', '.join(COLUMN_KEYS)}")
    present = [r for r in selected if r.value(sort) is not None]
    missing = [r for r in selected if r.value(sort) is None]
    numeric = dict((k, n) for k, _, n in COLUMNS)[sort]
    if numeric:
        ordered = sorted(present, key=lambda r: float(r.value(sort)), reverse=descending)
    else:
        ordered = sorted(present, key=lambda r: str(r.value(sort)).lower(), reverse=descending)
    return ordered + missing


_OPERATORS = (">=", "<=", ">", "<", "=")


def _matcher(key: str, text: str) -> Any:
    numeric = dict((k, n) for k, _, n in COLUMNS)[key]
    if not numeric:
        needle = text.lower()
        return lambda value: value is not None and needle in str(value).lower()
    op = next((o for o in _OPERATORS if text.startswith(o)), "=")
    number = _float(text[len(op) :] if text.startswith(op) else text)
    if number is None:
        raise ValueError(f"filter {key}={text!r}: expected a number, optionally after >, >=, <, <= or =")
    compare = {
        ">=": lambda v: v >= number,
        "<=": lambda v: v <= number,
        ">": lambda v: v > number,
        "<": lambda v: v < number,
        "=": lambda v: math.isclose(v, number, rel_tol=0, abs_tol=5e-4),
    }[op]
    return lambda value: value is not None and compare(float(value))
