"""One slide's outputs as the slide page shows them: the attention maps of ``attention.npz``, the cells read and
where each magnification's cells lie in level-0 pixels.

A cell of magnification j is a square of ``p · ds_j`` level-0 pixels (p: the patch side the model reads, ds_j the
magnification's downsample on this slide), read by the model at p × p pixels. ds_j comes from the magnification
(the run's ``model.magnifications``, else the label) and the slide's µm/px; p from the run's config, else from the
cells of ``attention.geojson`` (exact level-0 rectangles of the attended cells, which always include those read).
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from loupe.errors import LoupeError
from loupe.slides.magnification import parse_magnification
from loupe.viewer.cohort import PREDICTION_FILE, RunInfo

ATTENTION_FILE, GEOJSON_FILE = "attention.npz", "attention.geojson"
#: The tissue mask on the overview in ``attention.npz`` (slide_outputs.TISSUE_MASK), when detection was on.
TISSUE_MASK = "tissue_mask"
#: The architectures whose attention is over instances of one feature map, not over sampled patches.
INSTANCE_ARCHITECTURES = {"streamingclam": "StreamingCLAM"}


class SlideDataError(LoupeError):
    """A slide folder whose outputs cannot be read (shown on that slide's page only)."""


@dataclass(frozen=True)
class Layer:
    """One magnification's attention map and its cells' geometry."""

    label: str
    values: np.ndarray  # (rows, cols) float64
    valid: np.ndarray | None  # (rows, cols) bool: the cells the model could attend (tissue, inside the image)
    cell_size0: float  # side of a cell in level-0 pixels
    patch_px: int  # side of the patch the model read for a cell, in pixels
    exact: bool  # False when the geometry had to be estimated from the grid alone

    @property
    def shape(self) -> tuple[int, int]:
        return (int(self.values.shape[0]), int(self.values.shape[1]))


@dataclass(frozen=True)
class SlideData:
    """A slide's prediction, attention layers and cells read."""

    slide_id: str
    info: dict[str, Any]
    dimensions: tuple[int, int]
    mpp: float | None
    layers: tuple[Layer, ...]
    cells: np.ndarray  # (n,) flat indices of the cells read, with repeats (draws)
    architecture: str | None
    tissue_mask: np.ndarray | None = None  # (h, w) bool over the whole level-0 image, True on tissue

    def tissue(self) -> tuple[np.ndarray, float] | None:
        """The tissue layer: a mask (True on tissue) and the level-0 width it spans. The mask of the overview
        when predict recorded it, else the cells of the finest grid the model could attend."""
        if self.tissue_mask is not None:
            return self.tissue_mask, float(self.dimensions[0])
        with_valid = [lay for lay in self.layers if lay.valid is not None]
        if not with_valid or not self.info.get("settings", {}).get("tissue"):
            return None
        finest = max(with_valid, key=lambda lay: lay.values.size)
        assert finest.valid is not None
        return finest.valid, finest.shape[1] * finest.cell_size0

    @property
    def offsets(self) -> list[int]:
        return [int(v) for v in np.cumsum([0] + [lay.values.size for lay in self.layers])[:-1]]

    @property
    def vmax(self) -> float:
        """The shared top of every layer's colour scale: the slide's largest cell attention."""
        top = max((float(np.max(lay.values)) for lay in self.layers if lay.values.size), default=0.0)
        return top if top > 0 else 1.0

    def locate(self, cell: int) -> tuple[int, int, int]:
        """(layer index, row, col) of a flat cell index; IndexError outside the grids."""
        for j, (start, lay) in enumerate(zip(self.offsets, self.layers, strict=True)):
            if start <= cell < start + lay.values.size:
                row, col = divmod(cell - start, lay.shape[1])
                return j, row, col
        raise IndexError(f"cell {cell} outside the slide's grids")

    def cell_rect(self, cell: int) -> tuple[float, float, float, float]:
        """Level-0 rectangle (x, y, w, h) of a flat cell, as the model read it (edge cells run past the image)."""
        j, row, col = self.locate(cell)
        s = self.layers[j].cell_size0
        return (col * s, row * s, s, s)

    def cell_record(self, cell: int, draws: int) -> dict[str, Any]:
        j, row, col = self.locate(cell)
        lay = self.layers[j]
        x, y, w, h = self.cell_rect(cell)
        mpp = self.mpp
        return {
            "cell": cell,
            "magnification": lay.label,
            "row": row,
            "col": col,
            "rect0": [x, y, w, h],
            "rect_um": None if mpp is None else [x * mpp, y * mpp, w * mpp, h * mpp],
            "patch_px": lay.patch_px,
            "attention": float(lay.values[row, col]),
            "draws": draws,
        }

    def cells_read(self) -> list[dict[str, Any]]:
        """Each distinct cell read, most drawn first, with its geometry and attention."""
        unique, counts = np.unique(np.asarray(self.cells, dtype=np.int64), return_counts=True)
        order = np.lexsort((unique, -counts))
        return [self.cell_record(int(unique[i]), int(counts[i])) for i in order]

    def describe(self) -> dict[str, Any]:
        """What the slide page draws, as JSON (attention values rounded to 6 significant digits)."""
        instance = INSTANCE_ARCHITECTURES.get(self.architecture or "")
        info = self.info
        return {
            "slide_id": self.slide_id,
            "dimensions": list(self.dimensions),
            "mpp": self.mpp,
            "predicted": info.get("predicted"),
            "probabilities": info.get("probabilities", {}),
            "attention_share": info.get("attention_share", {}),
            "timings_s": info.get("timings_s", {}),
            "settings": info.get("settings", {}),
            "architecture": self.architecture,
            "vmax": self.vmax,
            "layers": [
                {
                    "label": lay.label,
                    "title": f"instance attention ({instance}, {lay.label})" if instance else lay.label,
                    "rows": lay.shape[0],
                    "cols": lay.shape[1],
                    "cell_size0": lay.cell_size0,
                    "patch_px": lay.patch_px,
                    "exact": lay.exact,
                    "offset": start,
                    "values": [float(f"{v:.6g}") for v in lay.values.ravel()],
                }
                for start, lay in zip(self.offsets, self.layers, strict=True)
            ],
            "cells_read": self.cells_read(),
            "tissue": None if (t := self.tissue()) is None else {"width0": t[1], "mask": self.tissue_mask is not None},
        }


def load_slide_data(slide_id: str, folder: Path, run: RunInfo) -> SlideData:
    """Read a slide folder's ``prediction.json`` and ``attention.npz``; a missing or damaged file is a
    :class:`SlideDataError` naming it."""
    info_path = folder / PREDICTION_FILE
    try:
        info = json.loads(info_path.read_text())
    except (OSError, ValueError) as err:
        raise SlideDataError(f"{info_path}: cannot be read ({err}); predict the slide again (--overwrite)") from err
    if not isinstance(info, dict):
        raise SlideDataError(f"{info_path}: not a prediction summary; predict the slide again (--overwrite)")
    grid = info.get("grid") or {}
    labels = [str(label) for label in grid] if isinstance(grid, dict) else []
    dims = info.get("dimensions")
    if not labels or not (isinstance(dims, list) and len(dims) == 2 and all(isinstance(v, int) for v in dims)):
        raise SlideDataError(f"{info_path}: no grid or dimensions; predict the slide again (--overwrite)")
    mpp = info.get("mpp") if isinstance(info.get("mpp"), (int, float)) else None
    values, valid, cells, tissue = _read_arrays(folder / ATTENTION_FILE, labels, grid)
    downsamples = _downsamples(labels, run, mpp, info.get("path") or slide_id)
    sizes = _cell_sizes(labels, downsamples, run, folder)
    layers = []
    w0, h0 = int(dims[0]), int(dims[1])
    for j, label in enumerate(labels):
        rows, cols = values[j].shape
        size, patch, exact = sizes[j]
        if size is None:  # no geometry recorded: the grid covers the image
            size, exact = max(w0 / cols, h0 / rows), False
            patch = patch or max(1, round(size))
        layers.append(Layer(label, values[j], valid[j], float(size), int(patch or round(size)), exact))
    return SlideData(slide_id, info, (w0, h0), mpp, tuple(layers), cells, run.architecture, tissue)


def _read_arrays(
    path: Path, labels: list[str], grid: dict[str, Any]
) -> tuple[list[np.ndarray], list[np.ndarray | None], np.ndarray, np.ndarray | None]:
    try:
        with np.load(path, allow_pickle=False) as npz:
            arrays = {name: np.asarray(npz[name]) for name in npz.files}
    except (OSError, ValueError, EOFError) as err:
        raise SlideDataError(f"{path}: cannot be read ({err}); predict the slide again (--overwrite)") from err
    values, valid = [], []
    for label in labels:
        shape = tuple(grid[label]) if isinstance(grid[label], list) else None
        array = arrays.get(label)
        if array is None or array.ndim != 2 or (shape is not None and array.shape != shape):
            raise SlideDataError(f"{path}: no {shape} attention map {label!r}; predict the slide again (--overwrite)")
        array = np.nan_to_num(array.astype(np.float64), nan=0.0, posinf=0.0, neginf=0.0)
        values.append(np.clip(array, 0.0, None))
        mask = arrays.get(f"valid_{label}")
        valid.append(mask.astype(bool) if mask is not None and mask.shape == array.shape else None)
    cells = arrays.get("cells", np.zeros(0, dtype=np.int64)).astype(np.int64).ravel()
    total = sum(v.size for v in values)
    tissue = arrays.get(TISSUE_MASK)
    tissue = tissue.astype(bool) if tissue is not None and tissue.ndim == 2 and tissue.size else None
    return values, valid, cells[(cells >= 0) & (cells < total)], tissue


def _downsamples(labels: list[str], run: RunInfo, mpp: float | None, slide: str) -> list[float | None]:
    specs = list(run.magnifications) if len(run.magnifications) == len(labels) else labels
    out: list[float | None] = []
    for spec in specs:
        try:
            out.append(parse_magnification(spec).downsample_for(mpp, slide))
        except (LoupeError, ValueError):
            out.append(None)
    return out


def _cell_sizes(
    labels: list[str], downsamples: list[float | None], run: RunInfo, folder: Path
) -> list[tuple[float | None, int | None, bool]]:
    """(cell side in level-0 px, patch side read, exact) per magnification."""
    patch = run.patch_size
    measured: dict[str, float] = {}
    if patch is None or any(ds is None for ds in downsamples):
        measured = _geojson_cell_sizes(folder / GEOJSON_FILE)
        if patch is None:
            estimates = [
                measured[lab] / ds for lab, ds in zip(labels, downsamples, strict=True) if ds and lab in measured
            ]
            patch = round(estimates[0]) if estimates else None
    out: list[tuple[float | None, int | None, bool]] = []
    for label, ds in zip(labels, downsamples, strict=True):
        if patch is not None and ds is not None:
            out.append((patch * ds, patch, True))
        elif label in measured:
            out.append((measured[label], patch or max(1, round(measured[label])), True))
        else:
            out.append((None, patch, False))
    return out


def _geojson_cell_sizes(path: Path) -> dict[str, float]:
    """Each magnification's cell side from the GeoJSON's rectangles (the largest side: edge cells are clipped)."""
    try:
        features = json.loads(path.read_text()).get("features", [])
    except (OSError, ValueError, AttributeError):
        return {}
    sizes: dict[str, float] = {}
    for feature in features if isinstance(features, list) else []:
        try:
            label = str(feature["properties"]["magnification"])
            ring = np.asarray(feature["geometry"]["coordinates"][0], dtype=np.float64)
        except (KeyError, TypeError, IndexError, ValueError):
            continue
        if ring.ndim != 2 or ring.shape[1] != 2:
            continue
        side = float(max(np.ptp(ring[:, 0]), np.ptp(ring[:, 1])))
        if math.isfinite(side) and side > sizes.get(label, 0.0):
            sizes[label] = side
    return sizes
