"""`loupe predict`: classify new slides and write their attention maps; a broken slide never stops the others."""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from loupe.data.catalog import SlideCatalog
from loupe.data.manifest import manifest_from_paths
from loupe.reports import attention_overlay, save_attention_npz, write_csv, write_json
from loupe.workflows.common import (
    Inference,
    InferenceSettings,
    infer,
    load_run,
    magnifications_of,
    make_catalog,
    prediction_columns,
    prediction_row,
)

log = logging.getLogger("loupe")

OVERLAY_SIDE = 512


def predict(
    run_dir: str | Path,
    slides: Sequence[str | Path],
    out: str | Path,
    inference: str | None = None,
    samples: int | None = None,
    slide_mpp: float | None = None,
) -> dict[str, dict]:
    """Predict slides (files or folders); write predictions.csv, status.json and per slide attention + overlay.

    Returns the status of every slide: ``{"status": "done"}`` or ``{"status": "failed", "reason": ...}``.
    """
    cfg, module, _ = load_run(run_dir)
    if slide_mpp is not None:
        cfg = dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, slide_mpp=slide_mpp))
    out_dir = Path(out)
    manifest = manifest_from_paths(slides)
    records = list(manifest.records)
    catalog = make_catalog(records, cfg)
    classes = list(cfg.data.classes or [])
    labels = [m.label for m in magnifications_of(cfg)]
    settings = InferenceSettings.resolve(cfg, inference, samples)

    status: dict[str, dict] = {}
    rows = []
    for i, rec in enumerate(records):
        try:
            result = infer(module, catalog, [i], cfg, settings.mode, settings.samples, batch_size=1)
            _write_slide(out_dir / "slides" / rec.slide_id, catalog, i, result, labels, rec.slide_id)
        except Exception as err:  # report and skip: the other slides must still get their results
            reason = str(err) if str(err) else type(err).__name__
            log.error("%s: %s", rec.path, reason)
            status[rec.slide_id] = {"status": "failed", "path": str(rec.path), "reason": reason}
            continue
        fields = {"slide_id": rec.slide_id, "path": str(rec.path)}
        rows.append(prediction_row(fields, result.probs[0], result.magnification_totals()[0], classes, labels))
        status[rec.slide_id] = {"status": "done", "path": str(rec.path)}
    catalog.close()

    write_csv(out_dir / "predictions.csv", rows, prediction_columns(["slide_id", "path"], classes, labels))
    write_json(out_dir / "status.json", {"inference": settings.record(), "slides": status})
    return status


def _write_slide(folder: Path, catalog: SlideCatalog, i: int, result: Inference, labels: list[str], title: str) -> None:
    """attention.npz (one map per magnification, plus the cells read) and overlay.png for one slide."""
    maps = result.maps(0)
    grid = catalog.grid(i)
    save_attention_npz(folder / "attention.npz", dict(zip(labels, maps, strict=True)), cells=result.cells[0])
    reader = catalog.reader(i)
    w, h = reader.dimensions
    scale = OVERLAY_SIDE / max(w, h)
    thumb = reader.thumbnail((max(1, round(w * scale)), max(1, round(h * scale))))
    extents = [(g.patch_size * g.downsample * scale,) * 2 for g in grid.grids]
    sampled = [[] for _ in labels]
    for c in np.unique(result.cells[0]):
        m, r, col = grid.cell(int(c))
        sampled[m].append((r, col))
    attention_overlay(thumb, maps, labels, extents, folder / "overlay.png", title=title, sampled=sampled)
