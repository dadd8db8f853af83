"""One slide's prediction folder, written to a temporary folder and renamed into place (never half-written).

A slide folder holds:

- ``prediction.json``: predicted class, class probabilities, attention share per magnification, the cells read,
  the inference settings and the per-step wall times; the prediction's Monte-Carlo spread over the inference draws
  (``probability_std``: standard deviation of each class probability over the draws, 0 for deterministic modes;
  ``entropy``: predictive entropy of the probabilities, nats) and ``patches_read`` (distinct patches read);
- ``attention.npz``: one attention map per magnification (rows × cols, by label), the valid-cell maps
  (``valid_<label>``), the flat indices of the cells read (``cells``) and, when tissue detection is on, the tissue
  mask on the overview (``tissue_mask``, rows × cols of the overview, True on tissue);
- ``attention.geojson``: the attended cells as QuPath-importable polygons in level-0 pixel coordinates;

and, with ``heatmaps`` (``loupe predict --heatmaps``; ``loupe view`` draws all of them from ``attention.npz``):

- ``overlay.png``: overview plus one heatmap panel per magnification on a shared scale;
- ``heatmap_<label>.png``: each magnification's heatmap alone over the overview, at the overview's resolution;
- ``tissue.png`` (when tissue detection is on): the overview with the background dimmed.
"""

from __future__ import annotations

import os
import shutil
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from loupe.models.interface import split_by_magnification
from loupe.reports import attention_overlay, heatmap_image, save_attention_npz, save_png, write_json
from loupe.reports.geojson import write_attention_geojson
from loupe.reports.metrics import predictive_entropy
from loupe.slides import SlideGrid

PREDICTION_FILE = "prediction.json"
#: The tissue mask's name in ``attention.npz`` (not a magnification label: those are like "20x").
TISSUE_MASK = "tissue_mask"
OVERLAY_SIDE = 1024
DISPLAY_SIDE = 2048  # heatmap and tissue PNGs; the GeoJSON has the exact cells


@dataclass
class SlideResult:
    """Everything predicted for one slide."""

    slide_id: str
    path: str
    probs: np.ndarray  # (C,)
    attention: np.ndarray  # (N,) flat over all cells
    cells: np.ndarray  # (n,) flat indices of the cells read
    valid: np.ndarray  # (N,) bool
    grid: SlideGrid
    overview: np.ndarray  # (H, W, 3) uint8
    tissue: np.ndarray | None  # (H, W) bool on the overview, or None when detection is off
    timings: dict[str, float] = field(default_factory=dict)
    mpp: float | None = None
    std: np.ndarray | None = None  # (C,) std of the class probabilities over the inference draws; None: 0
    entropy: float | None = None  # predictive entropy of ``probs`` (nats); None: computed from them
    patches_read: int | None = None  # distinct patches read; None: distinct entries of ``cells``

    def maps(self, values: np.ndarray | None = None) -> list[np.ndarray]:
        """A flat per-cell array (default: the attention) as one (rows, cols) map per magnification."""
        flat = self.attention if values is None else values
        return split_by_magnification(np.asarray(flat), [(int(g.shape[0]), int(g.shape[1])) for g in self.grid.grids])


def summary(result: SlideResult, classes: list[str], labels: list[str], settings: dict[str, Any]) -> dict[str, Any]:
    """The content of ``prediction.json``."""
    mags, rows, cols = result.grid.cells(np.asarray(result.cells, dtype=np.int64))
    shares = [float(m.sum()) for m in result.maps()]
    return {
        "slide_id": result.slide_id,
        "path": result.path,
        "predicted": classes[int(np.argmax(result.probs))],
        "probabilities": {c: float(p) for c, p in zip(classes, result.probs, strict=True)},
        "attention_share": dict(zip(labels, shares, strict=True)),
        "cells_read": [
            {"cell": int(c), "magnification": labels[int(m)], "row": int(r), "col": int(k)}
            for c, m, r, k in zip(result.cells, mags, rows, cols, strict=True)
        ],
        "grid": {lab: list(g.shape) for lab, g in zip(labels, result.grid.grids, strict=True)},
        "valid_cells": {lab: int(v.sum()) for lab, v in zip(labels, result.maps(result.valid), strict=True)},
        "dimensions": list(result.grid.dimensions),
        "mpp": result.mpp,
        "settings": settings,
        "timings_s": {k: round(v, 4) for k, v in result.timings.items()},
        **uncertainty(result, classes),
    }


def uncertainty(result: SlideResult, classes: list[str]) -> dict[str, Any]:
    """The prediction's Monte-Carlo spread and cost: ``probability_std`` (by class: the standard deviation of the
    class probability over the inference draws, 0 for a deterministic mode), ``entropy`` (predictive entropy of
    the probabilities, nats) and ``patches_read``."""
    std = np.zeros(len(classes)) if result.std is None else np.asarray(result.std, dtype=np.float64)
    entropy = result.entropy if result.entropy is not None else predictive_entropy(result.probs)
    read = result.patches_read if result.patches_read is not None else len(np.unique(np.asarray(result.cells)))
    return {
        "probability_std": {c: float(v) for c, v in zip(classes, std, strict=True)},
        "entropy": float(entropy),
        "patches_read": int(read),
    }


def _write_contents(
    folder: Path, result: SlideResult, labels: list[str], info: dict[str, Any], *, heatmaps: bool
) -> None:
    maps = result.maps()
    valid_maps = result.maps(result.valid)
    extra = {} if result.tissue is None else {TISSUE_MASK: np.asarray(result.tissue, dtype=bool)}
    save_attention_npz(
        folder / "attention.npz",
        dict(zip(labels, maps, strict=True)),
        cells=np.asarray(result.cells, dtype=np.int64),
        **{f"valid_{lab}": v for lab, v in zip(labels, valid_maps, strict=True)},
        **extra,
    )
    write_attention_geojson(
        folder / "attention.geojson",
        result.grid,
        result.attention,
        labels,
        sampled=np.asarray(result.cells, dtype=np.int64),
        slide_id=result.slide_id,
    )
    if heatmaps:
        _write_pictures(folder, result, labels, maps, info)
    write_json(folder / PREDICTION_FILE, info)  # last: its presence marks a complete folder


def _write_pictures(
    folder: Path, result: SlideResult, labels: list[str], maps: list[np.ndarray], info: dict[str, Any]
) -> None:
    """The PNGs: overlay, one heatmap per magnification, the tissue picture."""
    sampled: list[list[tuple[int, int]]] = [[] for _ in labels]
    mags, rows, cols = result.grid.cells(np.unique(np.asarray(result.cells, dtype=np.int64)))
    for m, r, c in zip(mags, rows, cols, strict=True):
        sampled[int(m)].append((int(r), int(c)))
    title = f"{result.slide_id}: {info['predicted']}"
    small = _downscale(result.overview, OVERLAY_SIDE)  # a figure of several panels: no need for full detail
    attention_overlay(
        small, maps, labels, _extents(result.grid, small), folder / "overlay.png", title=title, sampled=sampled
    )
    display = _downscale(result.overview, DISPLAY_SIDE)
    for lab, m, extent in zip(labels, maps, _extents(result.grid, display), strict=True):
        save_png(folder / f"heatmap_{_safe(lab)}.png", heatmap_image(display, m, extent))
    if result.tissue is not None:
        save_png(folder / "tissue.png", _tissue_image(result.overview, result.tissue, DISPLAY_SIDE))


def _extents(grid: SlideGrid, image: np.ndarray) -> list[tuple[float, float]]:
    """Each magnification's cell size in pixels of ``image`` (which shows the whole level-0 slide)."""
    h, w = image.shape[:2]
    sx, sy = w / grid.dimensions[0], h / grid.dimensions[1]
    return [(g.cell_size0 * sx, g.cell_size0 * sy) for g in grid.grids]


def _downscale(image: np.ndarray, max_side: int) -> np.ndarray:
    h, w = image.shape[:2]
    if max(h, w) <= max_side:
        return image
    scale = max_side / max(h, w)
    size = (max(1, round(w * scale)), max(1, round(h * scale)))
    return np.asarray(Image.fromarray(np.ascontiguousarray(image[..., :3])).resize(size, Image.Resampling.BOX))


def _safe(label: str) -> str:
    return "".join(ch if ch.isalnum() or ch in "-_." else "_" for ch in label)


def _tissue_image(overview: np.ndarray, mask: np.ndarray, max_side: int) -> np.ndarray:
    """The overview with the background dimmed, so the detected tissue stands out."""
    image = _downscale(overview, max_side)
    h, w = image.shape[:2]
    keep = np.asarray(Image.fromarray(mask.astype(np.uint8) * 255).resize((w, h), Image.Resampling.NEAREST)) > 0
    out = image[..., :3].copy()
    out[~keep] = (out[~keep].astype(np.uint16) * 90 // 256).astype(np.uint8)
    return out


def write_slide_folder(
    target: str | Path,
    result: SlideResult,
    classes: list[str],
    labels: list[str],
    settings: dict[str, Any],
    *,
    heatmaps: bool = False,
) -> dict[str, Any]:
    """Write the slide's folder atomically (temporary sibling, then rename); returns the prediction summary.
    ``heatmaps``: with its PNG pictures too.

    An existing folder (``--overwrite``) is replaced only once the new one is complete.
    """
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.parent / f".{target.name}.partial-{uuid.uuid4().hex[:8]}"
    tmp.mkdir()
    try:
        info = summary(result, classes, labels, settings)
        _write_contents(tmp, result, labels, info, heatmaps=heatmaps)
        if target.exists():
            old = target.parent / f".{target.name}.old-{uuid.uuid4().hex[:8]}"
            os.replace(target, old)
            os.replace(tmp, target)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return info


def clean_partials(folder: str | Path, busy: Callable[[str], bool] | None = None) -> None:
    """Remove leftovers of interrupted writes (``.ID.partial-*`` / ``.ID.old-*``) in a slides folder, except those
    of slides for which ``busy(ID)`` is true (another worker may be writing them right now)."""
    root = Path(folder)
    if not root.is_dir():
        return
    for entry in root.iterdir():
        slide_id = _leftover_of(entry.name)
        if slide_id is not None and not (busy is not None and busy(slide_id)):
            shutil.rmtree(entry, ignore_errors=True)


def _leftover_of(name: str) -> str | None:
    """The slide id of a temporary folder name made by :func:`write_slide_folder` (None for other names)."""
    if not name.startswith("."):
        return None
    for marker in (".partial-", ".old-"):
        if marker in name:
            return name[1 : name.rindex(marker)]
    return None
