"""Importer for BACH (ICIAR 2018 Grand Challenge on BreAst Cancer Histology), part A: microscopy images.

The official training set is ``ICIAR2018_BACH_Challenge/Photos/{Normal,Benign,InSitu,Invasive}/*.tif``
(2048×1536 RGB TIFFs at 0.42 µm/px, without resolution metadata) plus ``Photos/microscopy_ground_truth.csv``
with lines such as ``n001.tif,Normal`` (no header). :func:`bach_manifest` turns it into a :class:`Manifest`
and :func:`import_bach` also writes it as a manifest CSV.

Every record gets the µm/px :data:`BACH_MPP`, its file stem as ``slide_id``, and ``group = slide_id``: BACH
publishes no patient ids for the photos, so each image is its own group. Splits are therefore per image, and
images of one patient may land in both train and test (a known limitation of BACH part A).

The class order is the clinical one, :data:`BACH_CLASSES`. A manifest CSV does not store the class order, so
pass ``classes=BACH_CLASSES`` to :func:`load_manifest` (or set ``data.classes``) to keep it when training.
"""

from __future__ import annotations

import csv
import math
import os
import re
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

from loupe.data.manifest import Manifest, SlideRecord, save_manifest
from loupe.data.splits import assign_splits
from loupe.errors import ConfigError, ManifestError
from loupe.slides.formats import TIFF_SUFFIXES

BACH_CLASSES: tuple[str, ...] = ("Normal", "Benign", "InSitu", "Invasive")
"""The four BACH classes, with the official names, in clinical order."""

BACH_MPP: float = 0.42
"""µm per pixel of the BACH microscopy images (not stored in the files)."""

GROUND_TRUTH_NAME = "microscopy_ground_truth.csv"
"""File name of the official ground-truth CSV (looked for in ``Photos/``, then in the dataset root)."""

IMAGE_SUFFIXES: tuple[str, ...] = TIFF_SUFFIXES
"""Suffixes of the images picked up in the class folders (any case; BACH's photos are TIFFs); others are skipped."""

_LAYOUT = (
    "Expected the BACH part A layout: ICIAR2018_BACH_Challenge/Photos/{Normal,Benign,InSitu,Invasive}/*.tif, "
    "optionally with Photos/microscopy_ground_truth.csv; pass the dataset root or the Photos folder."
)


def _key(name: str) -> str:
    """Case- and punctuation-insensitive form of a folder or class name ('In Situ', 'in_situ' -> 'insitu')."""
    return re.sub(r"[^a-z0-9]", "", name.lower())


_CLASS_OF_KEY = {_key(c): c for c in BACH_CLASSES}


@dataclass(frozen=True)
class BachLayout:
    """Where the parts of a BACH dataset were found."""

    photos: Path
    """The folder holding the class folders."""
    class_dirs: dict[str, Path]
    """Official class name -> its folder (whatever its case on disk)."""
    ground_truth: Path | None
    """The ground-truth CSV, or None if there is none."""


def _subdirs(folder: Path) -> list[Path]:
    try:
        return sorted(p for p in folder.iterdir() if p.is_dir() and not p.name.startswith("."))
    except OSError:
        return []


def _class_folders(folder: Path) -> dict[str, list[Path]]:
    """Subfolders of ``folder`` named like a BACH class, per official class name."""
    found: dict[str, list[Path]] = defaultdict(list)
    for d in _subdirs(folder):
        cls = _CLASS_OF_KEY.get(_key(d.name))
        if cls is not None:
            found[cls].append(d)
    return found


def _find_photos(root: Path) -> Path:
    """The folder with the class folders: ``root`` itself, ``root/Photos`` or ``root/*/Photos`` (any case)."""
    candidates = [root]
    candidates += [d for d in _subdirs(root) if _key(d.name) == "photos"]
    candidates += [g for d in _subdirs(root) for g in _subdirs(d) if _key(g.name) == "photos"]
    for folder in candidates:
        if _class_folders(folder):
            return folder
    looked = ", ".join(str(c) for c in candidates)
    raise ManifestError(f"No BACH class folders ({', '.join(BACH_CLASSES)}) found; looked in {looked}. {_LAYOUT}")


def _find_ground_truth(photos: Path, root: Path) -> Path | None:
    for folder in dict.fromkeys((photos, root, photos.parent)):
        try:
            names = sorted(p for p in folder.iterdir() if p.is_file())
        except OSError:
            continue
        for p in names:
            if p.name.lower() == GROUND_TRUTH_NAME:
                return p
    return None


def locate_bach(root: str | Path, ground_truth: str | Path | None = None) -> BachLayout:
    """Find the Photos folder, the four class folders (any case) and the ground-truth CSV under ``root``.

    ``ground_truth`` names the CSV explicitly; by default ``microscopy_ground_truth.csv`` is looked for in the
    Photos folder, then in ``root``. ManifestError if ``root`` or a class folder is missing.
    """
    base = Path(os.path.abspath(Path(root).expanduser()))
    if not base.exists():
        raise ManifestError(f"BACH dataset folder {base} not found. {_LAYOUT}")
    if not base.is_dir():
        raise ManifestError(f"BACH dataset path {base} is a file, not a folder. {_LAYOUT}")
    photos = _find_photos(base)
    found = _class_folders(photos)
    missing = [c for c in BACH_CLASSES if c not in found]
    repeated = {c: ds for c, ds in found.items() if len(ds) > 1}
    if missing or repeated:
        parts = []
        if missing:
            present = ", ".join(d.name for d in _subdirs(photos)) or "none"
            parts.append(f"missing class folder(s) {', '.join(missing)} (folders present: {present})")
        for c, ds in repeated.items():
            parts.append(f"several folders for class {c}: {', '.join(d.name for d in ds)}; keep one")
        raise ManifestError(f"BACH dataset {photos}: {'; '.join(parts)}. {_LAYOUT}")

    if ground_truth is None:
        return BachLayout(photos, {c: found[c][0] for c in BACH_CLASSES}, _find_ground_truth(photos, base))
    gt = Path(os.path.abspath(Path(ground_truth).expanduser()))
    if not gt.is_file():
        what = "is a folder, not a CSV file" if gt.is_dir() else "not found"
        raise ManifestError(f"BACH ground-truth CSV {gt} {what}. Pass the path of {GROUND_TRUTH_NAME}.")
    return BachLayout(photos, {c: found[c][0] for c in BACH_CLASSES}, gt)


def _images(folder: Path) -> list[Path]:
    """The TIFF images directly in ``folder``, sorted; hidden files, subfolders and other files are skipped."""
    return sorted(
        p for p in folder.iterdir() if not p.name.startswith(".") and p.suffix.lower() in IMAGE_SUFFIXES and p.is_file()
    )


def _read_ground_truth(path: Path) -> tuple[list[tuple[int, str, str]], list[str]]:
    """``(row, file name, label as written)`` per CSV line, and the problems of unreadable lines."""
    try:
        text = path.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError as e:
        raise ManifestError(f"BACH ground-truth CSV {path} is not UTF-8 text ({e.reason} at byte {e.start}).") from e
    except OSError as e:
        raise ManifestError(f"BACH ground-truth CSV {path} cannot be read ({e.strerror or e}).") from e
    lines = text.splitlines()
    first = next((ln for ln in lines if ln.strip()), "")
    delimiter = next((d for d in (",", ";", "\t") if d in first), ",")
    entries: list[tuple[int, str, str]] = []
    problems: list[str] = []
    seen_row = False
    for row, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        cells = [c.strip() for c in next(csv.reader([line], delimiter=delimiter))]
        name = cells[0] if cells else ""
        label = cells[1] if len(cells) > 1 else ""
        if not seen_row:
            seen_row = True
            looks_like_header = (
                PurePosixPath(name).suffix.lower() not in IMAGE_SUFFIXES and _key(label) not in _CLASS_OF_KEY
            )
            if looks_like_header:
                continue
        if not name or not label:
            problems.append(f"row {row}: {line.strip()!r} is not 'file name,class' (e.g. n001.tif,Normal)")
            continue
        entries.append((row, PurePosixPath(name.replace("\\", "/")).name, label))
    return entries, problems


def bach_manifest(
    root: str | Path,
    *,
    ground_truth: str | Path | None = None,
    mpp: float = BACH_MPP,
    val_fraction: float = 0.0,
    test_fraction: float = 0.0,
    seed: int = 0,
) -> Manifest:
    """A labelled manifest of the BACH part A images under ``root`` (dataset root or its Photos folder).

    Labels come from the class folders. The ground-truth CSV (``ground_truth``, or the one found beside the
    images) is the authority when present and must agree with the folders: a file filed under another class,
    a CSV row whose file is missing and an image missing from the CSV are all reported in one ManifestError.
    Hidden and non-TIFF files are skipped. Every record gets ``mpp``, ``slide_id`` = file stem and
    ``group`` = ``slide_id`` (no patient ids in BACH). With a positive ``val_fraction`` or ``test_fraction``,
    splits are assigned by :func:`assign_splits` (stratified by class) with ``seed``; otherwise they are empty.
    """
    if isinstance(mpp, bool) or not isinstance(mpp, (int, float)) or not (math.isfinite(mpp) and mpp > 0):
        raise ConfigError(f"mpp={mpp!r} must be a positive number of µm per pixel (BACH: {BACH_MPP}).")
    layout = locate_bach(root, ground_truth)
    problems: list[str] = []

    images = {cls: _images(layout.class_dirs[cls]) for cls in BACH_CLASSES}
    by_key: dict[str, list[tuple[str, Path]]] = defaultdict(list)  # stem (any case) -> (class, file)
    for cls, files in images.items():
        if not files:
            problems.append(f"class folder {layout.class_dirs[cls]} has no {'/'.join(IMAGE_SUFFIXES)} images")
        for p in files:
            by_key[p.stem.lower()].append((cls, p))
    for entries in by_key.values():
        if len(entries) > 1:
            listing = ", ".join(str(p.relative_to(layout.photos)) for _, p in entries)
            problems.append(f"image name used more than once: {listing} (slide ids must be unique)")

    if layout.ground_truth is not None:
        problems += _check_ground_truth(layout, by_key)

    if problems:
        gt = (
            f"ground truth {layout.ground_truth} (rows counted from 1, no header)"
            if layout.ground_truth is not None
            else "no ground-truth CSV"
        )
        body = "\n".join(f"- {p}" for p in problems)
        raise ManifestError(
            f"BACH dataset {layout.photos} ({gt}) has {len(problems)} problem(s):\n{body}\n"
            f"Fix the files or the CSV so that every image lies in the folder of its class and is listed once."
        )

    records = [SlideRecord(p.stem, p, cls, None, float(mpp), p.stem) for cls, files in images.items() for p in files]
    manifest = Manifest(tuple(records), BACH_CLASSES, None)
    if val_fraction or test_fraction:
        manifest = assign_splits(manifest, val_fraction=val_fraction, test_fraction=test_fraction, seed=seed)
    return manifest


def _check_ground_truth(layout: BachLayout, by_key: dict[str, list[tuple[str, Path]]]) -> list[str]:
    """Problems where the ground-truth CSV and the class folders disagree."""
    assert layout.ground_truth is not None
    entries, problems = _read_ground_truth(layout.ground_truth)
    listed: dict[str, int] = {}
    for row, name, label in entries:
        key = PurePosixPath(name).stem.lower()
        cls = _CLASS_OF_KEY.get(_key(label))
        if key in listed:
            problems.append(f"row {row}: {name} is listed again (first in row {listed[key]})")
            continue
        listed[key] = row
        if cls is None:
            problems.append(f"row {row}: {name} has unknown class {label!r} (classes: {', '.join(BACH_CLASSES)})")
            continue
        files = by_key.get(key)
        if not files:
            problems.append(f"row {row}: {name} ({cls}) not found in any class folder of {layout.photos}")
            continue
        for folder_cls, p in files:
            if folder_cls != cls:
                where = p.relative_to(layout.photos)
                problems.append(f"row {row}: {name} is {cls} in the CSV but lies in the {folder_cls} folder ({where})")
    for key, files in by_key.items():
        if key not in listed:
            for _, p in files:
                problems.append(f"{p.relative_to(layout.photos)} is not listed in the ground-truth CSV")
    return problems


def import_bach(
    root: str | Path,
    out_csv: str | Path,
    *,
    ground_truth: str | Path | None = None,
    mpp: float = BACH_MPP,
    val_fraction: float = 0.0,
    test_fraction: float = 0.0,
    seed: int = 0,
) -> Manifest:
    """Build the BACH manifest (see :func:`bach_manifest`) and write it to ``out_csv``; returns it.

    The returned manifest's ``source`` is the written CSV. Reload it with ``load_manifest(out_csv,
    classes=BACH_CLASSES)`` to keep the clinical class order.
    """
    manifest = bach_manifest(
        root, ground_truth=ground_truth, mpp=mpp, val_fraction=val_fraction, test_fraction=test_fraction, seed=seed
    )
    target = save_manifest(manifest, out_csv)
    return Manifest(manifest.records, manifest.classes, target)
