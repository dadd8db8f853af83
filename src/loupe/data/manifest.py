"""Slide manifests: a CSV of slides (id, path, label, split, µm/px, patient group), checked up front.

Every problem in a manifest is found before training starts and reported in one :class:`ManifestError` that
names the file, the rows (spreadsheet numbering: row 1 is the header) and the fix.
"""

from __future__ import annotations

import csv
import io
import math
import os
from collections import defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np

from loupe.atomic import write_text
from loupe.errors import ManifestError
from loupe.slides.formats import DICOM_SUFFIXES, SLIDE_SUFFIXES
from loupe.slides.urls import SlideSource, SlideURL, as_source

SPLITS: tuple[str, ...] = ("train", "val", "test")
"""The allowed values of the ``split`` column."""

_SPLIT_ALIASES = {"validation": "val", "valid": "val"}

COLUMNS: tuple[str, ...] = ("slide_id", "path", "label", "split", "mpp", "group")
"""Columns a manifest CSV may have; only ``path`` is required (``patient`` is accepted for ``group``)."""

_EXPECTED = (
    "Expected a CSV with a header row and columns: path (required), slide_id, label, split (train/val/test), "
    "mpp (µm/px), group (or patient)."
)


@dataclass(frozen=True)
class SlideRecord:
    """One slide of a manifest."""

    slide_id: str
    path: SlideSource  # a local Path, or a SlideURL (whose str() is redacted)
    label: str | None = None
    split: str | None = None
    mpp: float | None = None
    group: str | None = None


@dataclass(frozen=True)
class Manifest:
    """An ordered set of slides with the class order used to index their labels."""

    records: tuple[SlideRecord, ...]
    classes: tuple[str, ...] = ()
    source: Path | None = field(default=None)

    def __post_init__(self) -> None:
        object.__setattr__(self, "records", tuple(self.records))
        object.__setattr__(self, "classes", tuple(self.classes))

    def __len__(self) -> int:
        return len(self.records)

    def subset(self, split: str) -> Manifest:
        """The records of one split (``train``, ``val`` or ``test``); ManifestError if there are none."""
        name = _SPLIT_ALIASES.get(split.strip().lower(), split.strip().lower())
        if name not in SPLITS:
            raise ManifestError(f"Unknown split {split!r} for {_where(self.source)}; use one of {', '.join(SPLITS)}.")
        records = tuple(r for r in self.records if r.split == name)
        if not records:
            present = sorted({r.split for r in self.records if r.split is not None})
            have = f"splits present: {', '.join(present)}" if present else "no row has a split"
            raise ManifestError(
                f"{_where(self.source)} has no slides in split {name!r} ({have}). Fill the split column "
                f"with train/val/test, or assign splits automatically (val/test fractions) before training."
            )
        return self.with_records(records)

    def label_indices(self) -> np.ndarray:
        """Index into :attr:`classes` of each record's label (int64); ManifestError if missing/unknown."""
        index = {c: i for i, c in enumerate(self.classes)}
        indices: list[int] = []
        missing: list[str] = []
        unknown: list[str] = []
        for r in self.records:
            if r.label is None:
                missing.append(r.slide_id)
            elif r.label not in index:
                unknown.append(f"{r.slide_id} ({r.label!r})")
            else:
                indices.append(index[r.label])
        if missing or unknown:
            parts = []
            if missing:
                parts.append(f"slides without a label: {_short_list(missing)}")
            if unknown:
                parts.append(f"slides with a label outside the classes {list(self.classes)}: {_short_list(unknown)}")
            raise ManifestError(
                f"{_where(self.source)}: cannot index labels; {'; '.join(parts)}. Fill the label column with "
                f"one of the classes (or add the label to the classes)."
            )
        return np.array(indices, dtype=np.int64)

    def with_records(self, records: Iterable[SlideRecord]) -> Manifest:
        """The same manifest (classes, source) over other records."""
        return replace(self, records=tuple(records))


def _where(source: Path | None) -> str:
    return f"Manifest {source}" if source is not None else "The manifest (built in memory)"


def _short_list(items: Sequence[str], limit: int = 20) -> str:
    shown = ", ".join(items[:limit])
    return shown + (f", … and {len(items) - limit} more" if len(items) > limit else "")


def _rows(rows: Sequence[int]) -> str:
    return ("row " if len(rows) == 1 else "rows ") + ", ".join(str(r) for r in rows)


#: The longest slide id (UTF-8 bytes): it names a folder and files (``ID.json``, ``.ID.partial-…``) in outputs,
#: and file names are limited to 255 bytes.
MAX_ID_BYTES = 200


def unsafe_slide_id(slide_id: str) -> str | None:
    """Why ``slide_id`` cannot name an output folder (None when it can): it would escape the folder (a path
    separator, ``.`` or ``..``), be taken for a hidden or temporary entry (a leading dot), hold control characters,
    or be too long for a file name. Spaces, non-ASCII letters and punctuation are fine."""
    if slide_id in (".", ".."):
        return "is a path step, not a name"
    if "/" in slide_id or "\\" in slide_id:
        return "contains a path separator (/ or \\)"
    if slide_id.startswith("."):
        return "starts with a dot (outputs would be hidden, taken for temporary files)"
    if any(ord(ch) < 32 or ord(ch) == 127 for ch in slide_id):
        return "contains control characters"
    if len(slide_id.encode("utf-8", "surrogatepass")) > MAX_ID_BYTES:
        return f"is longer than {MAX_ID_BYTES} bytes"
    return None


def _windows_hint(raw: str) -> str:
    """A hint for a path written on Windows (drive letter, backslashes), which does not resolve here."""
    if "\\" in raw or (len(raw) > 1 and raw[1] == ":" and raw[0].isalpha()):
        return "  (a Windows path: write it with / as this machine sees the file)"
    return ""


def _default_slide_id(path: SlideSource) -> str:
    """File stem; for a DICOM file (one of many in a slide folder) the folder's name."""
    if path.suffix.lower() in DICOM_SUFFIXES:
        return path.parent.name
    return path.stem if path.suffix else path.name


def _sniff_delimiter(header_line: str) -> str:
    if "," in header_line:
        return ","
    if ";" in header_line:
        return ";"
    if "\t" in header_line:
        return "\t"
    return ","


#: The largest manifest read (bytes): 100,000 slides take ~20 MB; a larger file is not a manifest (a slide or an
#: archive given by mistake) and would be read whole into memory.
MAX_MANIFEST_BYTES = 512 * 2**20


def _read_rows(path: Path) -> tuple[list[str], list[tuple[int, dict[str, str]]]]:
    """Header (normalised names) and the non-blank rows with their spreadsheet row numbers."""
    try:
        size = path.stat().st_size
        if size > MAX_MANIFEST_BYTES:
            raise ManifestError(
                f"Manifest {path} is {size / 2**20:.0f} MB, more than any manifest ({MAX_MANIFEST_BYTES // 2**20} "
                f"MB): is it the right file? {_EXPECTED}"
            )
        text = path.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError as e:
        raise ManifestError(
            f"Manifest {path} is not a UTF-8 text CSV ({e.reason} at byte {e.start}). "
            f"Save it as CSV (UTF-8). {_EXPECTED}"
        ) from e
    except OSError as e:
        raise ManifestError(f"Manifest {path} cannot be read ({e.strerror or e}). {_EXPECTED}") from e
    lines = text.splitlines()
    first = next((ln for ln in lines if ln.strip()), "")
    if not first:
        raise ManifestError(f"Manifest {path} is empty. {_EXPECTED}")
    try:
        reader = csv.reader(lines, delimiter=_sniff_delimiter(first), strict=True)
        table = list(reader)
    except csv.Error as e:
        raise ManifestError(f"Manifest {path} is not a valid CSV ({e}). {_EXPECTED}") from e
    while table and not any(c.strip() for c in table[0]):
        table.pop(0)
    header = [h.strip().lower() for h in table[0]]
    rows = []
    for i, cells in enumerate(table[1:], start=2):
        if not any(c.strip() for c in cells):
            continue
        values = {name: (cells[j].strip() if j < len(cells) else "") for j, name in enumerate(header) if name}
        rows.append((i, values))
    return header, rows


def load_manifest(
    path: str | Path,
    classes: Sequence[str] | None = None,
    *,
    require_labels: bool = True,
    check_files: bool = True,
) -> Manifest:
    """Read and validate a manifest CSV; every problem is reported at once in one ManifestError.

    Relative slide paths are resolved against the CSV's folder. ``classes`` fixes the class order (and rejects
    other labels); by default it is the sorted unique labels. ``check_files`` checks that every slide exists.
    """
    source = Path(os.path.abspath(Path(os.path.expanduser(path))))
    if not source.exists():
        raise ManifestError(
            f"Manifest {source} not found. Check the path (relative paths are taken from the working "
            f"directory {Path.cwd()}). {_EXPECTED}"
        )
    if source.is_dir():
        raise ManifestError(f"Manifest {source} is a folder, not a CSV file. {_EXPECTED}")
    header, rows = _read_rows(source)
    if "path" not in header:
        found = ", ".join(h for h in header if h) or "none"
        raise ManifestError(f"Manifest {source} has no 'path' column (columns found: {found}). {_EXPECTED}")
    dup_cols = sorted({h for h in header if h and header.count(h) > 1})
    if dup_cols:
        raise ManifestError(
            f"Manifest {source} repeats the column(s) {', '.join(dup_cols)}; keep one of each. {_EXPECTED}"
        )
    if not rows:
        raise ManifestError(f"Manifest {source} has a header but no slide rows. {_EXPECTED}")
    if require_labels and "label" not in header:
        raise ManifestError(
            f"Manifest {source} has no 'label' column, but training and evaluation need a label per slide. "
            f"Add a label column. {_EXPECTED}"
        )
    given_classes: tuple[str, ...] | None = None
    if classes is not None:
        given_classes = tuple(str(c).strip() for c in classes)
        repeated = sorted({c for c in given_classes if given_classes.count(c) > 1})
        if repeated or "" in given_classes:
            raise ManifestError(
                f"Classes {list(given_classes)} given for manifest {source} contain repeated or empty names "
                f"({', '.join(repr(c) for c in repeated) or repr('')}); list each class once."
            )

    base = source.parent
    group_col = "group" if "group" in header else ("patient" if "patient" in header else None)
    records: list[SlideRecord] = []
    record_rows: list[int] = []
    no_path: list[int] = []
    missing: list[tuple[int, str, Path]] = []
    empty_label: list[int] = []
    unknown_labels: dict[str, list[int]] = defaultdict(list)
    bad_mpp: list[tuple[int, str]] = []
    bad_split: list[tuple[int, str]] = []
    bad_ids: list[tuple[int, str, str]] = []
    ids: dict[str, list[int]] = defaultdict(list)

    for row, values in rows:
        raw_path = values.get("path", "")
        if not raw_path:
            no_path.append(row)
            continue
        slide_path: SlideSource
        url = as_source(raw_path)  # a URL is taken as it is (and asked for when the slide is opened)
        if url is not None:
            slide_path = url
        else:
            p = Path(os.path.expanduser(raw_path))
            slide_path = Path(os.path.normpath(p if p.is_absolute() else base / p))
            if check_files and not slide_path.exists():
                missing.append((row, raw_path, slide_path))
        slide_id = values.get("slide_id", "") or _default_slide_id(slide_path)
        ids[slide_id].append(row)
        why = unsafe_slide_id(slide_id)
        if why is not None:
            bad_ids.append((row, slide_id, why))

        label = values.get("label", "") or None
        if label is None and require_labels:
            empty_label.append(row)
        if label is not None and given_classes is not None and label not in given_classes:
            unknown_labels[label].append(row)

        split_raw = values.get("split", "")
        split = _SPLIT_ALIASES.get(split_raw.lower(), split_raw.lower()) or None
        if split is not None and split not in SPLITS:
            bad_split.append((row, split_raw))
            split = None

        mpp_raw = values.get("mpp", "")
        mpp: float | None = None
        if mpp_raw:
            try:
                mpp = float(mpp_raw)
            except ValueError:
                mpp = math.nan
            if not (math.isfinite(mpp) and mpp > 0):
                bad_mpp.append((row, mpp_raw))
                mpp = None

        group = (values.get(group_col, "") if group_col else "") or None
        records.append(SlideRecord(slide_id, slide_path, label, split, mpp, group))
        record_rows.append(row)

    problems: list[str] = []
    if no_path:
        problems.append(f"empty path in {_rows(no_path)}: give each slide's file path.")
    if missing:
        listing = "\n".join(
            f"    row {r}: {p}" + (f"  (written as {raw!r})" if raw != str(p) else "") + _windows_hint(raw)
            for r, raw, p in missing
        )
        problems.append(
            f"{len(missing)} of {len(rows)} slide files not found:\n{listing}\n"
            f"  Fix the path column: relative paths are resolved against the manifest's folder {base}."
        )
    if empty_label:
        problems.append(
            f"empty label in {_rows(empty_label)}: every slide needs a label for training/evaluation; "
            f"fill them in or remove those rows."
        )
    if unknown_labels:
        listing = "; ".join(f"{lab!r} ({_rows(rs)})" for lab, rs in sorted(unknown_labels.items()))
        problems.append(
            f"labels not among the classes {list(given_classes or ())}: {listing}. Fix the labels, or add "
            f"them to the classes option."
        )
    dups = {sid: rs for sid, rs in ids.items() if len(rs) > 1}
    if dups:
        listing = "; ".join(f"{sid!r} ({_rows(rs)})" for sid, rs in dups.items())
        problems.append(
            f"duplicate slide_id: {listing}. Each slide needs a unique slide_id (it defaults to the file "
            f"name without extension, so give explicit ids to files with the same name)."
        )
    if bad_ids:
        listing = "; ".join(f"row {r}: {sid!r} {why}" for r, sid, why in bad_ids[:20])
        more = f" (and {len(bad_ids) - 20} more)" if len(bad_ids) > 20 else ""
        problems.append(
            f"slide_id that cannot name an output folder: {listing}{more}. Use plain names (letters, digits, "
            "spaces, - _ . but no / or \\, not starting with a dot); it defaults to the file name."
        )
    if bad_mpp:
        listing = "; ".join(f"row {r}: {v!r}" for r, v in bad_mpp)
        problems.append(f"mpp must be a positive number of µm per pixel (or empty): {listing}.")
    if bad_split:
        listing = "; ".join(f"row {r}: {v!r}" for r, v in bad_split)
        problems.append(f"unknown split value ({listing}); use one of {', '.join(SPLITS)}, or leave it empty.")
    if problems:
        body = "\n".join(f"- {p}" for p in problems)
        raise ManifestError(f"Manifest {source} has {len(problems)} problem(s) (row 1 is the header):\n{body}")

    if given_classes is not None:
        class_order = given_classes
    else:
        class_order = tuple(sorted({r.label for r in records if r.label is not None}))
    return Manifest(tuple(records), class_order, source)


def save_manifest(manifest: Manifest, path: str | Path) -> Path:
    """Write ``manifest`` as a CSV atomically; slide paths inside the CSV's folder are written relative to it.

    The class order is not stored: pass ``classes`` to :func:`load_manifest` to restore a non-sorted order.
    """
    target = Path(os.path.abspath(Path(os.path.expanduser(path))))
    base = target.parent
    buffer = io.StringIO(newline="")
    writer = csv.writer(buffer)
    writer.writerow(COLUMNS)
    for r in manifest.records:
        if isinstance(r.path, SlideURL):
            shown = str(r.path)  # redacted: credentials are never written
        else:
            p = Path(os.path.abspath(r.path))
            shown = p.relative_to(base).as_posix() if p.is_relative_to(base) else str(p)
        mpp = "" if r.mpp is None else repr(float(r.mpp))
        writer.writerow([r.slide_id, shown, r.label or "", r.split or "", mpp, r.group or ""])
    return write_text(target, buffer.getvalue())


def _is_hidden(path: Path, root: Path) -> bool:
    return any(part.startswith(".") for part in path.relative_to(root).parts)


def _expand_folder(folder: Path, exclude: Path | None = None) -> list[Path]:
    """Slide files under ``folder`` (recursively, sorted): one DICOM file per folder, no .vms tile images, nothing
    under ``exclude`` (an output folder placed inside the input folder: its PNGs are not slides)."""
    found: list[Path] = []
    for dirpath, dirnames, filenames in os.walk(folder):
        here = Path(dirpath)
        dirnames[:] = sorted(d for d in dirnames if not d.startswith(".") and here / d != exclude)
        names = sorted(n for n in filenames if not n.startswith(".") and Path(n).suffix.lower() in SLIDE_SUFFIXES)
        suffixes = {Path(n).suffix.lower() for n in names}
        dicom_taken = False
        for n in names:
            suffix = Path(n).suffix.lower()
            if suffix in DICOM_SUFFIXES:
                if dicom_taken:
                    continue
                dicom_taken = True
            elif suffix in (".jpg", ".jpeg") and ".vms" in suffixes:
                continue  # the tiles of a Hamamatsu VMS slide, not slides of their own
            found.append(here / n)
    return sorted(found)


def manifest_from_paths(paths: Sequence[str | Path | SlideURL], exclude: str | Path | None = None) -> Manifest:
    """An unlabelled manifest over slide files and folders (expanded to their slide files, sorted), leaving out
    the folder ``exclude`` (the output folder, when it lies inside an input folder)."""
    skip = Path(os.path.abspath(Path(os.path.expanduser(exclude)))) if exclude is not None else None
    if isinstance(paths, (str, Path)):
        paths = [paths]
    files: list[SlideSource] = []
    missing: list[str] = []
    empty: list[str] = []
    for given in paths:
        url = as_source(given)
        if url is not None:
            files.append(url)
            continue
        assert not isinstance(given, SlideURL)
        p = Path(os.path.abspath(Path(os.path.expanduser(given))))
        if not p.exists():
            missing.append(str(p))
        elif p.is_dir():
            inside = _expand_folder(p, skip)
            if not inside:
                empty.append(str(p))
            files.extend(inside)
        else:
            files.append(p)
    problems = []
    if missing:
        problems.append("not found: " + ", ".join(missing))
    if empty:
        problems.append(f"folder(s) without slide files ({', '.join(SLIDE_SUFFIXES)}): " + ", ".join(empty))
    if not paths:
        problems.append("no paths given")
    if problems:
        raise ManifestError(
            "Cannot build a slide list from the given paths: " + "; ".join(problems) + ". Pass existing "
            "slide files or folders that contain them."
        )
    unique = list(dict.fromkeys(files))
    ids = _unique_ids(unique)
    bad = [(f, sid, why) for f, sid in zip(unique, ids, strict=True) if (why := unsafe_slide_id(sid)) is not None]
    if bad:
        listing = "; ".join(f"{f} ({sid!r} {why})" for f, sid, why in bad[:20])
        raise ManifestError(
            f"slide file names that cannot name an output folder: {listing}. Rename the files, or list them in a "
            "manifest CSV with a slide_id column of plain names."
        )
    records = tuple(SlideRecord(sid, f) for sid, f in zip(ids, unique, strict=True))
    return Manifest(records, (), None)


def _unique_ids(files: Sequence[SlideSource]) -> list[str]:
    """Default slide ids; a name shared by several files gets its folder name prepended, then a number."""
    ids = [_default_slide_id(f) for f in files]
    counts: dict[str, int] = defaultdict(int)
    for sid in ids:
        counts[sid] += 1
    ids = [sid if counts[sid] == 1 else f"{_default_parent(f)}_{sid}" for sid, f in zip(ids, files, strict=True)]
    used: set[str] = set()
    out = []
    for sid in ids:
        candidate, n = sid, 1
        while candidate in used:
            n += 1
            candidate = f"{sid}-{n}"
        used.add(candidate)
        out.append(candidate)
    return out


def _default_parent(path: SlideSource) -> str:
    folder = path.parent.parent if path.suffix.lower() in DICOM_SUFFIXES else path.parent
    return folder.name or "root"
