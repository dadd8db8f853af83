"""Report outputs (JSON, CSV, PNG, attention maps), each written atomically through :mod:`loupe.atomic`.

A crash or a kill never leaves a half-written file behind: readers (and a resumed run that skips finished work)
only ever see complete files. ``write_bytes`` and ``write_text`` are re-exported from :mod:`loupe.atomic`.
"""

from __future__ import annotations

import csv
import dataclasses
import io
import json
import math
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from loupe.atomic import atomic_write, write_bytes, write_text
from loupe.errors import LoupeError

__all__ = ["save_attention_npz", "save_png", "write_bytes", "write_csv", "write_json", "write_text"]


def _jsonable(obj: Any) -> Any:
    """Convert numpy values, paths, dataclasses and non-finite floats into plain JSON (NaN/inf → None)."""
    if obj is None or isinstance(obj, (bool, str)):
        return obj
    if isinstance(obj, (np.bool_,)):
        return bool(obj)
    if isinstance(obj, (int, np.integer)):
        return int(obj)
    if isinstance(obj, (float, np.floating)):
        value = float(obj)
        return value if math.isfinite(value) else None
    if isinstance(obj, np.ndarray):
        return _jsonable(obj.tolist())
    if isinstance(obj, np.generic):
        return _jsonable(obj.item())
    if isinstance(obj, os.PathLike):
        return os.fspath(obj)
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return _jsonable(dataclasses.asdict(obj))
    if isinstance(obj, Mapping):
        return {str(_jsonable(key)): _jsonable(value) for key, value in obj.items()}
    if isinstance(obj, (list, tuple, set, frozenset)):
        return [_jsonable(value) for value in obj]
    raise LoupeError(f"cannot write a value of type {type(obj).__name__} to JSON: convert it to a plain type first")


def write_json(path: str | os.PathLike[str], obj: Any, indent: int | None = 2) -> Path:
    """Write ``obj`` as JSON (indented, or compact with ``indent=None`` for large files); numpy values and paths
    are converted, NaN and inf become null."""
    separators = (",", ":") if indent is None else None
    text = json.dumps(_jsonable(obj), indent=indent, separators=separators, allow_nan=False, ensure_ascii=False)
    return write_text(path, text + "\n")


def _csv_cell(value: object) -> object:
    """One CSV cell: numpy scalars unwrapped, None and non-finite floats written as empty cells."""
    if isinstance(value, np.generic):
        value = value.item()
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return ""
    if isinstance(value, os.PathLike):
        return os.fspath(value)
    return value


def write_csv(path: str | os.PathLike[str], rows: Sequence[Mapping[str, object]], columns: Sequence[str]) -> Path:
    """Write ``rows`` as CSV with a header of ``columns`` (in that order); keys not listed are left out."""
    columns = list(columns)
    if not columns:
        raise LoupeError(f"write_csv({os.fspath(path)!r}): no columns given")
    if len(set(columns)) != len(columns):
        raise LoupeError(f"write_csv({os.fspath(path)!r}): duplicate column names in {columns}")
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(columns)
    for row in rows:
        writer.writerow([_csv_cell(row.get(column)) for column in columns])
    return write_text(path, buffer.getvalue())


def save_attention_npz(
    path: str | os.PathLike[str], maps: Mapping[str, np.ndarray], **extra_arrays: np.ndarray
) -> Path:
    """Save attention maps keyed by magnification label (plus any extra arrays) as a compressed .npz."""
    clash = set(maps) & set(extra_arrays)
    if clash:
        raise LoupeError(f"save_attention_npz: extra array names {sorted(clash)} clash with magnification labels")
    # Any, not ndarray: np.savez_compressed's stub would match a dict of arrays against its allow_pickle: bool
    arrays: dict[str, Any] = {str(label): np.asarray(value) for label, value in maps.items()}
    arrays.update({name: np.asarray(value) for name, value in extra_arrays.items()})
    return atomic_write(path, lambda handle: np.savez_compressed(handle, **arrays))


def save_png(path: str | os.PathLike[str], image: np.ndarray) -> Path:
    """Save a uint8 image (H,W), (H,W,3) or (H,W,4) as a PNG."""
    from PIL import Image

    image = np.asarray(image)
    if image.dtype != np.uint8:
        raise LoupeError(f"save_png({os.fspath(path)!r}): expected a uint8 image, got dtype {image.dtype}")
    if not (image.ndim == 2 or (image.ndim == 3 and image.shape[2] in (3, 4))):
        raise LoupeError(f"save_png({os.fspath(path)!r}): expected shape (H,W), (H,W,3) or (H,W,4), got {image.shape}")
    buffer = io.BytesIO()
    # Fast zlib level: heatmaps of a few megapixels encode ~3x faster than at the default, ~20% larger.
    Image.fromarray(np.ascontiguousarray(image)).save(buffer, format="PNG", compress_level=2)
    return write_bytes(path, buffer.getvalue())
