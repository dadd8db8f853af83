"""A small `loupe predict` output folder written by loupe's own writers (slide folders, state files, the merged
summary) over generated slides whose pixels are known: colour bands, so a screenshot can be checked against them.

Slides: ``alpha`` (label matches, hot 20x cell in the green band), ``beta`` (wrong label, hot 10x cell),
``gone`` (predicted, then its file was deleted), ``broken`` (failed in predict, with a reason).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import tifffile
import yaml

from loupe.data.manifest import SlideRecord
from loupe.slides import build_grid
from loupe.workflows.run_summary import merge_summary
from loupe.workflows.slide_outputs import SlideResult, write_slide_folder
from loupe.workflows.slide_state import SlideStates

W, H, MPP, PATCH = 1024, 768, 0.5, 32
LABELS = ["5x", "10x", "20x"]
CLASSES = ["benign", "tumour"]
#: Vertical bands of the generated slides, left to right.
BANDS = [(220, 40, 40), (40, 200, 60), (40, 60, 220), (230, 210, 40)]
SETTINGS = {"mode": "topk", "samples": 1, "k": 4, "tissue": True, "seed": 0}
#: The 20x cell with most of alpha's attention (row, col): inside the green band (x 256..512).
HOT_20X = (10, 12)
#: The 10x cell with most of beta's attention.
HOT_10X = (3, 10)


def band_colour(x: float) -> tuple[int, int, int]:
    return BANDS[min(len(BANDS) - 1, int(x // (W / len(BANDS))))]


def write_slide(path: Path) -> Path:
    image = np.zeros((H, W, 3), dtype=np.uint8)
    for i, colour in enumerate(BANDS):
        image[:, i * W // len(BANDS) : (i + 1) * W // len(BANDS)] = colour
    image[H // 2 - 8 : H // 2 + 8, :] = 255  # a white line across: the picture has a top and a bottom
    tifffile.imwrite(path, image, photometric="rgb", resolution=(1e4 / MPP, 1e4 / MPP), resolutionunit="CENTIMETER")
    return path


def _result(slide_id: str, path: Path, hot: tuple[int, int, int], probs: list[float]) -> SlideResult:
    grid = build_grid((W, H), MPP, LABELS, PATCH, path)
    attention = np.full(grid.n_cells, 1e-4)
    j, r, c = hot
    hot_cell = grid.flat_index(j, r, c)
    attention[hot_cell] = 1.0
    attention /= attention.sum()
    valid = np.ones(grid.n_cells, dtype=bool)
    valid[: grid.grids[0].n_cells : 7] = False  # a few 5x cells are "background"
    cells = np.array([hot_cell, hot_cell, grid.flat_index(2, 0, 0), grid.flat_index(1, 1, 1)])
    tissue = np.ones((96, 128), dtype=bool)
    tissue[:, :8] = False
    return SlideResult(
        slide_id=slide_id,
        path=str(path),
        probs=np.asarray(probs),
        attention=attention,
        cells=cells,
        valid=valid,
        grid=grid,
        overview=np.zeros((96, 128, 3), dtype=np.uint8),
        tissue=tissue,
        timings={"open": 0.01, "thumbnail": 0.02, "overview": 0.01, "tissue": 0.003, "patches": 0.05, "model": 0.1},
        mpp=MPP,
    )


def build_predict_output(root: Path) -> Path:
    """Write the fixture's slides, a run folder's config and the predict output folder; returns the latter."""
    data, out, run = root / "data", root / "predict", root / "run"
    data.mkdir(parents=True)
    (run / "checkpoints").mkdir(parents=True)
    config = {
        "data": {"backend": "auto", "tissue": True},
        "model": {"architecture": "joint", "magnifications": LABELS},
        "joint": {"patch_size": PATCH},
    }
    (run / "config.yaml").write_text(yaml.safe_dump(config))
    records = [
        SlideRecord("alpha", write_slide(data / "alpha.tif"), "tumour"),
        SlideRecord("beta", write_slide(data / "beta.tif"), "benign"),
        SlideRecord("gone", write_slide(data / "gone.tif"), "tumour"),
        SlideRecord("broken", data / "broken.tif", "benign"),
    ]
    (data / "broken.tif").write_bytes(b"not a tiff")
    states = SlideStates(out, SETTINGS)
    hot = {"alpha": (2, *HOT_20X), "beta": (1, *HOT_10X), "gone": (0, 1, 1)}
    probs = {"alpha": [0.1, 0.9], "beta": [0.3, 0.7], "gone": [0.8, 0.2]}
    for rec in records[:3]:
        result = _result(rec.slide_id, rec.path, hot[rec.slide_id], probs[rec.slide_id])
        write_slide_folder(out / "slides" / rec.slide_id, result, CLASSES, LABELS, SETTINGS)
        states.done(rec.slide_id, str(rec.path), dict(result.timings, write=0.2), "w1")
    states.failed("broken", str(records[3].path), "SlideError: slide broken.tif: not a TIFF file", None, "w1")
    merge_summary(out, records, states, {"run": str(run), "settings": SETTINGS}, CLASSES, LABELS)
    (data / "gone.tif").unlink()
    return out
