"""`loupe predict`: classify many slides; a broken slide is reported and skipped, a re-run skips finished work.

Slides come from files, folders and manifest CSVs. Each is prepared (header, thumbnail, overview, tissue mask:
through the cache) in DataLoader workers while the model runs on the previous ones; the model then reads only
the k sampled patches. Each slide's outputs go to ``OUT/slides/<slide_id>/``, written atomically; ``status.json``
records every slide as pending, done or failed (with the reason) and is rewritten after each slide;
``predictions.csv`` and ``timings.csv`` cover every finished slide of the request.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import time
from collections.abc import Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from loupe.config import Config
from loupe.data.catalog import SlideCatalog
from loupe.data.loading import PreparedSlide, PreparedSlides, collate_slides, prepared_loader
from loupe.data.manifest import SlideRecord, load_manifest, manifest_from_paths
from loupe.data.pixels import SlidePixels
from loupe.errors import ManifestError, describe_error
from loupe.models import InferenceSettings, SlideClassifier, resolve_inference
from loupe.models.runtime import Runtime
from loupe.reports import write_csv
from loupe.slides.cache import file_identity
from loupe.workflows.common import load_run, magnifications_of, make_catalog, prediction_columns
from loupe.workflows.inference import make_pixels, predict_batch, runtime_of
from loupe.workflows.slide_outputs import PREDICTION_FILE, SlideResult, clean_partials, write_slide_folder
from loupe.workflows.status import DONE, FAILED, PENDING, RunStatus

log = logging.getLogger("loupe")

TIMING_STEPS = ("open", "thumbnail", "overview", "tissue", "patches", "model", "write")


@dataclass
class PredictionRun:
    """What a call to :func:`predict` did."""

    status: RunStatus
    processed: list[str]
    """Slides worked on in this call (the others were finished or failed, unchanged, before)."""

    def counts(self) -> dict[str, int]:
        return self.status.counts()


def collect_records(slides: Sequence[str | Path]) -> list[SlideRecord]:
    """Slides from files, folders (searched recursively) and manifest CSVs (labels optional), in order."""
    records: list[SlideRecord] = []
    paths: list[str | Path] = []
    for item in slides:
        if str(item).lower().endswith((".csv", ".tsv")):
            records += load_manifest(item, require_labels=False, check_files=False).records
        else:
            paths.append(item)
    if paths:
        records += manifest_from_paths(paths).records
    ids = [r.slide_id for r in records]
    repeated = sorted({i for i in ids if ids.count(i) > 1})
    if repeated:
        raise ManifestError(
            f"slide ids repeated across the inputs: {', '.join(repeated[:10])}; output folders are named by slide "
            "id, so give each slide a unique slide_id (manifest column) or predict the sources separately"
        )
    return records


def _fingerprint(catalog: SlideCatalog, i: int, cfg: Config) -> Any:
    """What a failed slide's outcome depends on: the file and the settings that read it."""
    try:
        ident: Any = file_identity(catalog.records[i].path)
    except OSError:
        ident = None
    fp = {"file": ident, "mpp": catalog.mpp_of(i), "backend": cfg.data.backend, "tissue": cfg.data.tissue}
    return json.loads(json.dumps(fp, default=str))  # the form it has after a round trip through status.json


def _settings_record(cfg: Config, inference: InferenceSettings, checkpoint: Path) -> dict[str, Any]:
    """What a finished slide's outputs depend on; a change makes a re-run redo the slide."""
    stat = checkpoint.stat()
    return {
        **inference.record(),
        "checkpoint": str(checkpoint.resolve()),
        "checkpoint_mtime_ns": stat.st_mtime_ns,
        "tissue": cfg.data.tissue,
        "tissue_min_fraction": cfg.data.tissue_min_fraction if cfg.data.tissue else None,
        "seed": cfg.train.seed,
    }


def _finished(folder: Path, settings: dict[str, Any]) -> dict[str, Any] | None:
    """The slide's prediction summary when its folder is complete and made with the same settings."""
    try:
        info = json.loads((folder / PREDICTION_FILE).read_text())
    except (OSError, ValueError):
        return None
    return info if info.get("settings") == json.loads(json.dumps(settings)) else None


def predict(
    run: str | Path,
    slides: Sequence[str | Path],
    *,
    out: str | Path,
    inference: str | None = None,
    samples: int | None = None,
    slide_mpp: float | None = None,
    overwrite: bool = False,
    workers: int = 2,
    tissue: bool | None = None,
    k: int | None = None,
) -> PredictionRun:
    """Predict slides (files, folders, manifest CSVs) into ``out``; see the module docstring for the layout.

    ``tissue`` overrides the run's tissue detection (e.g. on for whole slides with a model trained on crops);
    ``k`` the patches read per sample (the estimator is unbiased for any k; more patches, less variance).
    Finished slides are skipped unless ``overwrite``; slides that failed before are retried only when their
    file or the settings that read them changed.
    """
    cfg, model, ckpt = load_run(run)
    data = cfg.data
    if slide_mpp is not None:
        data = dataclasses.replace(data, slide_mpp=slide_mpp)
    if tissue is not None:
        data = dataclasses.replace(data, tissue=tissue)
    cfg = dataclasses.replace(cfg, data=data)
    out_dir = Path(out)
    slides_dir = out_dir / "slides"
    records = collect_records(slides)
    catalog = make_catalog(records, cfg)
    classes = list(cfg.data.classes or [])
    labels = [m.label for m in magnifications_of(cfg)]
    inference_settings = resolve_inference(cfg, inference, samples, k)
    settings = _settings_record(cfg, inference_settings, ckpt)

    clean_partials(slides_dir)
    previous = RunStatus.previous_slides(out_dir / "status.json")
    status = RunStatus(out_dir / "status.json", {"run": str(Path(run).resolve()), "settings": settings})
    todo: list[int] = []
    for i, rec in enumerate(records):
        fp = _fingerprint(catalog, i, cfg)
        if not overwrite:
            info = _finished(slides_dir / rec.slide_id, settings)
            if info is not None:
                timings = previous.get(rec.slide_id, {}).get("timings_s") or info.get("timings_s")
                status.set(rec.slide_id, DONE, save=False, path=str(rec.path), timings_s=timings)
                continue
            before = previous.get(rec.slide_id, {})
            if before.get("status") == FAILED and before.get("fingerprint") == fp:
                status.set(rec.slide_id, FAILED, save=False, **{k: v for k, v in before.items() if k != "status"})
                continue
        status.set(rec.slide_id, PENDING, save=False, path=str(rec.path), fingerprint=fp)
        todo.append(i)
    status.save()
    skipped = len(records) - len(todo)
    if skipped:
        log.info("%d of %d slides already done or failed with unchanged inputs: skipped", skipped, len(records))

    processed = []
    pixels = make_pixels(catalog, cfg, model)
    runtime = runtime_of(cfg)
    loader = prepared_loader(PreparedSlides(catalog, todo), workers if len(todo) > 1 else 0)
    # Outputs (figures, GeoJSON) are written by one background thread while the model runs on the next slide;
    # at most MAX_PENDING_WRITES results wait in memory.
    writes = _Writes(status, slides_dir, classes, labels, settings, len(todo))
    try:
        for n, item in enumerate(loader, start=1):
            rec = catalog.records[item.index]
            processed.append(rec.slide_id)
            fp = status.slides[rec.slide_id]["fingerprint"]
            if item.error is not None:
                _fail(status, rec, item.error, fp, n, len(todo))
                continue
            try:
                result = _run_model(model, pixels, runtime, catalog, item, cfg, inference_settings)
            except Exception as err:  # report and skip: the other slides must still get their results
                _fail(status, rec, describe_error(err), fp, n, len(todo))
                continue
            writes.submit(n, rec, fp, result)
    finally:
        writes.finish()
        pixels.close()
        catalog.close()

    _write_tables(out_dir, records, status, classes, labels)
    return PredictionRun(status, processed)


MAX_PENDING_WRITES = 2


class _Writes:
    """Slide folders written by one background thread; their outcome is recorded in the status file from the
    calling thread, in the order the slides finish."""

    def __init__(
        self, status: RunStatus, slides_dir: Path, classes: list[str], labels: list[str], settings: dict, total: int
    ) -> None:
        self.status, self.slides_dir, self.classes, self.labels = status, slides_dir, classes, labels
        self.settings, self.total = settings, total
        self.pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="loupe-write")
        self.pending: list[tuple[Future, int, SlideRecord, Any, SlideResult]] = []

    def _write(self, result: SlideResult) -> SlideResult:
        start = time.perf_counter()
        write_slide_folder(self.slides_dir / result.slide_id, result, self.classes, self.labels, self.settings)
        result.timings["write"] = time.perf_counter() - start
        return result

    def submit(self, n: int, rec: SlideRecord, fp: Any, result: SlideResult) -> None:
        self.pending.append((self.pool.submit(self._write, result), n, rec, fp, result))
        self.settle(block=len(self.pending) > MAX_PENDING_WRITES)

    def settle(self, block: bool = False) -> None:
        """Record finished writes; with ``block``, wait for the oldest one first."""
        while self.pending and (block or self.pending[0][0].done()):
            future, n, rec, fp, result = self.pending.pop(0)
            block = False
            try:
                future.result()
            except Exception as err:
                _fail(self.status, rec, describe_error(err), fp, n, self.total)
                continue
            timings = {k: round(result.timings.get(k, 0.0), 4) for k in TIMING_STEPS}
            self.status.set(rec.slide_id, DONE, path=str(rec.path), timings_s=timings)
            predicted = self.classes[int(np.argmax(result.probs))]
            log.info("[%d/%d] %s: %s (%.2f s)", n, self.total, rec.slide_id, predicted, sum(timings.values()))

    def finish(self) -> None:
        """Wait for every write and record it."""
        while self.pending:
            self.settle(block=True)
        self.pool.shutdown(wait=True)


def _fail(status: RunStatus, rec: SlideRecord, reason: str, fp: Any, n: int, total: int) -> None:
    log.error("[%d/%d] %s failed: %s", n, total, rec.slide_id, reason)
    status.set(rec.slide_id, FAILED, path=str(rec.path), reason=reason, fingerprint=fp)


def _run_model(
    model: SlideClassifier,
    pixels: SlidePixels,
    runtime: Runtime,
    catalog: SlideCatalog,
    prepared: PreparedSlide,
    cfg: Config,
    settings: InferenceSettings,
) -> SlideResult:
    """One slide through the shared inference path; the patch reading time is split from the rest of the model."""
    assert prepared.item is not None
    i = prepared.index
    read_before = pixels.seconds
    start = time.perf_counter()
    # Seeded per slide: a slide's result does not depend on which slides ran before it.
    (pred,) = predict_batch(model, collate_slides([prepared.item]), pixels, settings, runtime, seed=cfg.train.seed)
    total = time.perf_counter() - start
    patches = pixels.seconds - read_before
    timings = {step: 0.0 for step in TIMING_STEPS if step != "write"}
    timings |= dict(prepared.timings) | {"patches": patches, "model": total - patches}
    rec = catalog.records[i]
    assert prepared.overview is not None
    return SlideResult(
        slide_id=rec.slide_id,
        path=str(rec.path),
        probs=pred.probs,
        attention=pred.attention,
        cells=pred.cells,
        valid=prepared.item.valid.numpy(),
        grid=catalog.grid(i),
        overview=prepared.overview,
        tissue=prepared.tissue,
        timings=timings,
        mpp=catalog.header(i).mpp,
    )


def _write_tables(
    out_dir: Path, records: Sequence[SlideRecord], status: RunStatus, classes: list[str], labels: list[str]
) -> None:
    """predictions.csv and timings.csv over every finished slide of the request, in input order."""
    with_label = any(r.label for r in records)
    fields = ["slide_id", "path", *(["label"] if with_label else [])]
    columns = prediction_columns(fields, classes, labels)
    rows, timing_rows = [], []
    for rec in records:
        if status.slides.get(rec.slide_id, {}).get("status") != DONE:
            continue
        try:
            info = json.loads((out_dir / "slides" / rec.slide_id / PREDICTION_FILE).read_text())
        except (OSError, ValueError):
            continue
        row: dict[str, Any] = {"slide_id": rec.slide_id, "path": str(rec.path), "predicted": info["predicted"]}
        if with_label:
            row["label"] = rec.label or ""
        row |= {f"prob_{c}": info["probabilities"].get(c) for c in classes}
        row |= {f"attention_{m}": info["attention_share"].get(m) for m in labels}
        rows.append(row)
        t = status.slides[rec.slide_id].get("timings_s") or info.get("timings_s") or {}
        timing_rows.append({"slide_id": rec.slide_id, **t, "total": round(sum(t.values()), 4)})
    write_csv(out_dir / "predictions.csv", rows, columns)
    write_csv(out_dir / "timings.csv", timing_rows, ["slide_id", *TIMING_STEPS, "total"])
