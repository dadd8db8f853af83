"""`loupe predict`: classify many slides, by one worker or by many sharing one output folder; a broken slide is
reported and skipped, a re-run skips finished work.

Slides come from files, folders and manifest CSVs. Each is prepared (header, thumbnail, overview, tissue mask:
through the cache) in DataLoader processes while the model runs on the previous ones; the model then reads only the
k sampled patches. The output folder holds:

- ``slides/<slide_id>/``: the slide's outputs (:mod:`slide_outputs`), written into a temporary sibling and renamed
  into place, so never visible half-written;
- ``state/<slide_id>.json``: the slide's outcome, done (timings) or failed (reason), one small atomic write per
  slide (:mod:`slide_state`);
- ``claims/<slide_id>.claim``: while a worker works on a slide, its claim (:mod:`claims`);
- ``status.json`` (every slide of the request: pending, done or failed with the reason), ``predictions.csv`` and
  ``timings.csv`` (every finished slide, in input order): the run summary, merged from the state files when a
  worker ends (:mod:`run_summary`).

**Many workers.** Any number of workers may predict the same inputs into the same folder: ``workers=N`` here
(``--workers N``) starts N processes on this machine (one per GPU when several are visible), and plain commands
started by hand or as the jobs of a scheduler array (SLURM) do the same. There is no scheduler: a worker walks the
slides in input order and works on a slide only after claiming it (an atomic file creation: exactly one worker
wins); it skips slides finished or claimed by others, and at the end waits for the slides others still hold, taking
over the claims of workers that died (at once on the same machine, after ``claim_expiry_s`` elsewhere). The summary
it then merges is the same whichever worker finishes last, and the same as one worker's.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import time
import uuid
from collections import Counter
from collections.abc import Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from torch.utils.data import Sampler

from loupe.config import Config
from loupe.console import Progress
from loupe.data.catalog import SlideCatalog
from loupe.data.loading import PreparedSlide, PreparedSlides, collate_slides, prepared_loader
from loupe.data.manifest import SlideRecord, load_manifest, manifest_from_paths
from loupe.data.pixels import SlidePixels
from loupe.errors import (
    ConfigError,
    ManifestError,
    describe_error,
    is_write_refusal,
    output_error,
    prepare_output_folder,
)
from loupe.models import InferenceSettings, SlideClassifier, resolve_inference
from loupe.models.runtime import GPU_ACCELERATORS, Runtime
from loupe.slides.cache import file_identity
from loupe.slides.urls import SlideURL
from loupe.workflows.claims import EXPIRY_S, Claims, Owner
from loupe.workflows.common import load_run, magnifications_of, make_catalog, run_checkpoint
from loupe.workflows.inference import make_pixels, predict_batch, runtime_of
from loupe.workflows.run_summary import TIMING_STEPS, merge_summary
from loupe.workflows.slide_outputs import SlideResult, clean_partials, write_slide_folder
from loupe.workflows.slide_state import SlideStates
from loupe.workflows.status import PENDING, RunStatus
from loupe.workflows.worker_pool import run_workers, visible_gpus

log = logging.getLogger("loupe")

__all__ = ["TIMING_STEPS", "PredictOptions", "PredictionRun", "collect_records", "predict"]

#: Default DataLoader processes preparing slides ahead of the model, per worker.
LOADER_WORKERS = 2
#: A worker with at most this many slides to do logs one line per slide (its class and time); with more, a line
#: every 30 s (slides done of all, failed, rate, time left: :class:`loupe.console.Progress`), and one per failed
#: slide. On a terminal a progress bar replaces both, failures printed above it.
PER_SLIDE_LINES = 50


@dataclass
class PredictionRun:
    """What a call to :func:`predict` did."""

    status: RunStatus
    processed: list[str]
    """Slides worked on in this call, by any of its workers (the others were finished or failed before, or taken
    by other workers)."""

    def counts(self) -> dict[str, int]:
        return self.status.counts()


def collect_records(slides: Sequence[str | Path | SlideURL], out: str | Path | None = None) -> list[SlideRecord]:
    """Slides from files, folders (searched recursively, leaving out the output folder ``out``) and manifest CSVs
    (labels optional), in order."""
    records: list[SlideRecord] = []
    paths: list[str | Path | SlideURL] = []
    for item in slides:
        if not isinstance(item, SlideURL) and str(item).lower().endswith((".csv", ".tsv")):
            records += load_manifest(item, require_labels=False, check_files=False).records
        else:
            paths.append(item)
    if paths:
        records += manifest_from_paths(paths, exclude=out).records
    counts = Counter(r.slide_id for r in records)
    repeated = sorted(i for i, n in counts.items() if n > 1)
    if repeated:
        raise ManifestError(
            f"slide ids repeated across the inputs: {', '.join(repeated[:10])}; output folders are named by slide "
            "id, so give each slide a unique slide_id (manifest column) or predict the sources separately"
        )
    return records


@dataclass(frozen=True)
class _Job:
    """One prediction request, checked: the run, its settings with the overrides, the slides, the output folder."""

    run: Path
    cfg: Config
    records: list[SlideRecord]
    inference: InferenceSettings
    settings: dict[str, Any]
    out: Path
    since: float | None  # --overwrite: slides finished before this time are redone
    heatmaps: bool = False  # also write the PNG pictures of each slide

    @property
    def header(self) -> dict[str, Any]:
        return {"run": str(self.run.resolve()), "settings": self.settings}

    @property
    def classes(self) -> list[str]:
        return list(self.cfg.data.classes or [])

    @property
    def labels(self) -> list[str]:
        return [m.label for m in magnifications_of(self.cfg)]

    def states(self) -> SlideStates:
        previous = RunStatus.previous_slides(self.out / "status.json")  # a folder made before state files
        return SlideStates(self.out, self.settings, since=self.since, previous=previous)

    def fingerprint(self, i: int) -> Any:
        """What a failed slide's outcome depends on: the file and the settings that read it."""
        rec = self.records[i]
        try:
            ident: Any = file_identity(rec.path)
        except OSError:
            ident = None
        mpp = {"override": rec.mpp, "fallback": self.cfg.data.slide_mpp}  # as SlideCatalog.mpp_of decides
        fp = {"file": ident, "mpp": mpp, "backend": self.cfg.data.backend, "tissue": self.cfg.data.tissue}
        return json.loads(json.dumps(fp, default=str))  # the form it has after a round trip through JSON

    def pending(self, states: SlideStates, i: int) -> bool:
        """Whether slide i still needs work (not done with these settings, not failed with unchanged inputs)."""
        rec = self.records[i]
        return states.outcome(rec.slide_id, str(rec.path), lambda: self.fingerprint(i)).status == PENDING

    def merge(self, states: SlideStates) -> RunStatus:
        return merge_summary(self.out, self.records, states, self.header, self.classes, self.labels)


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


@dataclass(frozen=True)
class PredictOptions:
    """A prediction request as :func:`predict` was given it (after its checks): what every worker builds its job
    from. Frozen and picklable: ``workers=N`` hands it whole to each worker process."""

    run: Path
    slides: tuple[str | Path | SlideURL, ...]
    out: Path
    inference: str | None = None
    samples: int | None = None
    slide_mpp: float | None = None
    tissue: bool | None = None
    k: int | None = None
    since: float | None = None
    """``overwrite``: slides finished before this time (``time.time()``) are redone."""
    loader_workers: int = LOADER_WORKERS
    claim_expiry_s: float = EXPIRY_S
    heatmaps: bool = False
    """Also write each slide's PNG pictures (overlay, heatmap per magnification, tissue): ``loupe view`` and the
    GeoJSON need only ``attention.npz``, and the pictures were most of a slide's write time."""
    epsilon: float | None = None
    """Adaptive inference: the top class's standard error to reach (default: the run's)."""
    budget: int | None = None
    """Adaptive inference: the most patches read per slide (default: the run's)."""


@dataclass(frozen=True)
class _WorkerTask:
    """What one worker process of ``predict(workers=N)`` is given: the request and its worker name."""

    options: PredictOptions
    worker: str


def _job(options: PredictOptions) -> _Job:
    cfg, ckpt = run_checkpoint(options.run)
    data = cfg.data
    if options.slide_mpp is not None:
        data = dataclasses.replace(data, slide_mpp=options.slide_mpp)
    if options.tissue is not None:
        data = dataclasses.replace(data, tissue=options.tissue)
    cfg = dataclasses.replace(cfg, data=data)
    records = collect_records(options.slides, options.out)
    settings = resolve_inference(cfg, options.inference, options.samples, options.k, options.epsilon, options.budget)
    record = _settings_record(cfg, settings, ckpt)
    return _Job(options.run, cfg, records, settings, record, options.out, options.since, options.heatmaps)


def predict(
    run: str | Path,
    slides: Sequence[str | Path | SlideURL],
    *,
    out: str | Path,
    inference: str | None = None,
    samples: int | None = None,
    slide_mpp: float | None = None,
    overwrite: bool = False,
    workers: int = 1,
    loader_workers: int | None = None,
    tissue: bool | None = None,
    k: int | None = None,
    claim_expiry_s: float = EXPIRY_S,
    heatmaps: bool = False,
    epsilon: float | None = None,
    budget: int | None = None,
) -> PredictionRun:
    """Predict slides (files, folders, manifest CSVs) into ``out``; see the module docstring for the layout.

    ``workers``: 1 works in this process; N > 1 starts N worker processes on this machine and waits for them (one
    GPU each when several are visible); 0 is one worker that also prepares slides in this process (kept from when
    ``workers`` counted loader processes). ``loader_workers``: processes preparing slides ahead of the model, per
    worker (default 2; 0 with ``workers=0``). ``claim_expiry_s``: a claim silent this long belongs to a dead worker
    and is taken over. ``tissue`` overrides the run's tissue detection (e.g. on for whole slides with a model
    trained on crops); ``k`` the patches read per sample (the estimator is unbiased for any k; more patches, less
    variance). Finished slides are skipped unless ``overwrite`` (slides finished before this call are redone);
    slides that failed before are retried only when their file or the settings that read them changed.
    ``heatmaps``: also write each slide's PNG pictures (overlay, heatmaps, tissue); off, a slide's folder holds its
    prediction, attention arrays (with the tissue mask) and GeoJSON, which ``loupe view`` draws from.
    ``epsilon`` and ``budget`` (``inference="adaptive"``): read rounds of k new patches until the top class's
    standard error is under ``epsilon`` or ``budget`` patches are read; each slide's ``patches_read`` is recorded.
    """
    if workers < 0:
        raise ConfigError(f"--workers {workers}: expected an integer ≥ 0 (worker processes; 1: this process)")
    if loader_workers is not None and loader_workers < 0:
        raise ConfigError(f"--loader-workers {loader_workers}: expected an integer ≥ 0")
    if not claim_expiry_s > 0:
        raise ConfigError(f"--claim-expiry {claim_expiry_s}: expected a number of seconds > 0")
    loaders = loader_workers if loader_workers is not None else (0 if workers == 0 else LOADER_WORKERS)
    options = PredictOptions(
        run=Path(run),
        slides=tuple(slides),
        out=prepare_output_folder(out, "output folder (--out)"),  # before any slide is read
        inference=inference,
        samples=samples,
        slide_mpp=slide_mpp,
        tissue=tissue,
        k=k,
        since=time.time() if overwrite else None,
        loader_workers=loaders,
        claim_expiry_s=claim_expiry_s,
        heatmaps=heatmaps,
        epsilon=epsilon,
        budget=budget,
    )
    job = _job(options)
    token = uuid.uuid4().hex[:12]
    if workers <= 1:
        status, processed = _work(job, options, worker=token)
        return PredictionRun(status, processed)

    states = job.states()
    todo = sum(job.pending(states, i) for i in range(len(job.records)))
    count = min(workers, todo)
    if count:
        log.info("%d of %d slides to do: starting %d workers", todo, len(job.records), count)
        tasks = [_WorkerTask(options, f"{token}-{i + 1}") for i in range(count)]
        gpus = visible_gpus() if job.cfg.train.accelerator in GPU_ACCELERATORS else []
        run_workers(_worker_main, tasks, gpus=gpus)
    else:
        log.info("all %d slides already done or failed with unchanged inputs", len(job.records))
    status = job.merge(states)  # after every worker: sees all of them
    processed = [r.slide_id for r in job.records if (states.worker_of(r.slide_id) or "").startswith(token)]
    return PredictionRun(status, processed)


def _worker_main(task: _WorkerTask) -> None:
    """One worker process of ``predict(workers=N)``: progress as log lines (N bars cannot share one terminal)."""
    _work(_job(task.options), task.options, worker=task.worker, bar=False)


def _work(job: _Job, options: PredictOptions, *, worker: str, bar: bool | None = None) -> tuple[RunStatus, list[str]]:
    """One worker: every slide of the job it can claim, then the slides held by workers that died; then the merge.
    Returns the merged status and the slides this worker processed. ``bar``: a progress bar (default: on a
    terminal), else progress lines."""
    states = job.states()
    todo = [i for i in range(len(job.records)) if job.pending(states, i)]
    skipped = len(job.records) - len(todo)
    if skipped:
        log.info("%d of %d slides already done or failed with unchanged inputs: skipped", skipped, len(job.records))
    processed: list[str] = []
    slides_dir = job.out / "slides"
    owner = Owner.current(worker)
    with Claims(job.out / "claims", expiry_s=options.claim_expiry_s, owner=owner) as claims:
        claims.sweep()
        states.sweep(claims.expiry_s)
        clean_partials(slides_dir, busy=lambda slide_id: claims.state(slide_id) == "live")
        if todo:
            with Progress(len(todo), "slides", label="predict", bar=bar) as progress:
                processed = _predict_claimed(job, todo, states, claims, options.loader_workers, progress)
        clean_partials(slides_dir, busy=lambda slide_id: claims.state(slide_id) == "live")
        # A worker killed after recording a slide but before releasing its claim leaves the claim behind.
        claims.clear_stale([rec.slide_id for rec in job.records])
    return job.merge(states), processed


class _ClaimingSampler(Sampler[int]):
    """The slides of ``order`` this worker claims, in order, drawn as the loader needs them: finished slides are
    skipped, slides claimed by other workers are set aside in ``contended``."""

    def __init__(self, order: list[int], job: _Job, states: SlideStates, claims: Claims, progress: Progress) -> None:
        self.order, self.job, self.states, self.claims = order, job, states, claims
        self.progress = progress  # counts the slides finished by other workers too: the cohort's progress
        self.contended: list[int] = []
        self.claimed = 0

    def __iter__(self) -> Iterator[int]:
        for i in self.order:
            slide_id = self.job.records[i].slide_id
            if not self.job.pending(self.states, i):
                self.progress.advance()  # finished by another worker since
                continue
            if not self.claims.acquire(slide_id):
                self.contended.append(i)
                continue
            if not self.job.pending(self.states, i):  # finished between our look and our claim
                self.claims.release(slide_id)
                self.progress.advance()
                continue
            self.states.forget(slide_id)  # a state never describes an older folder
            self.claimed += 1
            yield i


def _predict_claimed(
    job: _Job, todo: list[int], states: SlideStates, claims: Claims, loader_workers: int, progress: Progress
) -> list[str]:
    """Predict the slides of ``todo`` this worker claims; then wait for those others hold, taking over the claims
    of the dead, until every slide of ``todo`` is finished. Returns the slides processed here."""
    run_cfg, model, _ = load_run(job.run)
    cfg = dataclasses.replace(run_cfg, data=job.cfg.data)  # as the model was loaded (older runs), our overrides
    catalog = make_catalog(job.records, cfg)
    position = {i: n for n, i in enumerate(todo, start=1)}
    recorder = _Recorder(job, states, claims, len(todo), progress)
    pixels = make_pixels(catalog, cfg, model)
    runtime = runtime_of(cfg)
    dataset = PreparedSlides(catalog, range(len(job.records)))
    poll = min(5.0, claims.heartbeat_s)
    processed: list[str] = []
    order, first, waiting = todo, True, False
    try:
        while order:
            sampler = _ClaimingSampler(order, job, states, claims, progress)
            loader = prepared_loader(dataset, loader_workers if first and len(order) > 1 else 0, sampler=sampler)
            writes = _Writes(recorder, job.out / "slides", job)
            try:
                for item in loader:
                    rec = job.records[item.index]
                    processed.append(rec.slide_id)
                    n = position[item.index]
                    if item.error is not None:
                        recorder.fail(item.index, item.error, n)
                        continue
                    try:
                        result = _run_model(model, pixels, runtime, catalog, item, cfg, job.inference)
                    except Exception as err:  # report and skip: the other slides must still get their results
                        recorder.fail(item.index, describe_error(err), n)
                        continue
                    writes.submit(n, item.index, result)
            finally:
                writes.finish()
            order = [i for i in sampler.contended if job.pending(states, i)]
            progress.advance(len(sampler.contended) - len(order))  # finished by the workers that held them
            if order and not sampler.claimed:
                if not waiting:
                    log.info("waiting for %d slide(s) held by other workers", len(order))
                    waiting = True
                time.sleep(poll)
            first = False
    finally:
        pixels.close()
        catalog.close()
    return processed


class _Recorder:
    """Records a slide's outcome (its state file), gives its claim up, then logs it (a slide logged is recorded):
    a failed slide always, a finished one in a line of its own up to :data:`PER_SLIDE_LINES` slides to do (and no
    bar), else in the progress."""

    def __init__(self, job: _Job, states: SlideStates, claims: Claims, total: int, progress: Progress) -> None:
        self.job, self.states, self.claims, self.total = job, states, claims, total
        self.progress = progress
        self.level = logging.INFO if total <= PER_SLIDE_LINES and not progress.bar else logging.DEBUG

    def done(self, i: int, result: SlideResult, n: int) -> None:
        rec = self.job.records[i]
        timings = {k: round(result.timings.get(k, 0.0), 4) for k in TIMING_STEPS}
        self.states.done(rec.slide_id, str(rec.path), timings, self.claims.owner.worker)
        self.claims.release(rec.slide_id)
        predicted = self.job.classes[int(np.argmax(result.probs))]
        log.log(self.level, "[%d/%d] %s: %s (%.2f s)", n, self.total, rec.slide_id, predicted, sum(timings.values()))
        self.progress.advance()

    def fail(self, i: int, reason: str, n: int) -> None:
        rec = self.job.records[i]
        fp = self.job.fingerprint(i)
        self.states.failed(rec.slide_id, str(rec.path), reason, fp, self.claims.owner.worker)
        self.claims.release(rec.slide_id)
        log.error("[%d/%d] %s failed: %s", n, self.total, rec.slide_id, reason)
        self.progress.advance(failed=1)


MAX_PENDING_WRITES = 2


class _Writes:
    """Slide folders written by one background thread while the model runs on the next slide (at most
    MAX_PENDING_WRITES results wait in memory); their outcome is recorded from the calling thread, in the order
    the slides finish."""

    def __init__(self, recorder: _Recorder, slides_dir: Path, job: _Job) -> None:
        self.recorder, self.slides_dir, self.heatmaps = recorder, slides_dir, job.heatmaps
        self.classes, self.labels, self.settings = job.classes, job.labels, job.settings
        self.pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="loupe-write")
        self.pending: list[tuple[Future, int, int, SlideResult]] = []

    def _write(self, result: SlideResult) -> SlideResult:
        start = time.perf_counter()
        write_slide_folder(
            self.slides_dir / result.slide_id, result, self.classes, self.labels, self.settings, heatmaps=self.heatmaps
        )
        result.timings["write"] = time.perf_counter() - start
        return result

    def submit(self, n: int, i: int, result: SlideResult) -> None:
        self.pending.append((self.pool.submit(self._write, result), n, i, result))
        self.settle(block=len(self.pending) > MAX_PENDING_WRITES)

    def settle(self, block: bool = False) -> None:
        """Record finished writes; with ``block``, wait for the oldest one first."""
        while self.pending and (block or self.pending[0][0].done()):
            future, n, i, result = self.pending.pop(0)
            block = False
            try:
                future.result()
            except OSError as err:
                if is_write_refusal(err):  # full disk, read-only: stop; the slide stays to do for a re-run
                    raise output_error(err, self.slides_dir, _slide_folder_bytes(self.slides_dir)) from err
                self.recorder.fail(i, describe_error(err), n)
                continue
            except Exception as err:
                self.recorder.fail(i, describe_error(err), n)
                continue
            self.recorder.done(i, result, n)

    def finish(self) -> None:
        """Wait for every write and record it."""
        while self.pending:
            self.settle(block=True)
        self.pool.shutdown(wait=True)


def _slide_folder_bytes(slides_dir: Path, sample: int = 20) -> int | None:
    """The size of a finished slide folder (the largest of the first ``sample``): what one more slide needs."""
    sizes = []
    try:
        for folder in slides_dir.iterdir():
            if folder.name.startswith(".") or not folder.is_dir():
                continue
            sizes.append(sum(f.stat().st_size for f in folder.iterdir() if f.is_file()))
            if len(sizes) >= sample:
                break
    except OSError:
        return None
    return max(sizes) if sizes else None


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
        std=pred.spread,
        entropy=pred.entropy,
        patches_read=pred.patches_read,
    )
