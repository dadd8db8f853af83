"""`loupe evaluate`: the paper's metrics on a split of the run's manifest, with plots and per-slide predictions."""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from loupe.data.manifest import load_manifest
from loupe.errors import ConfigError, prepare_output_folder
from loupe.models import resolve_inference
from loupe.reports import (
    attention_share,
    calibration,
    classification_metrics,
    mean_entropy,
    plot_confusion,
    plot_pr,
    plot_reliability,
    plot_roc,
    write_csv,
    write_json,
)
from loupe.reports.metrics import CALIBRATION_BINS
from loupe.workflows.common import (
    RunPaths,
    load_run,
    magnifications_of,
    make_catalog,
    prediction_columns,
    prediction_row,
)
from loupe.workflows.inference import SlidePrediction, infer

#: A class's figures in :attr:`Evaluation.per_class`: precision, recall, support, auc_roc, ap (None: undefined).
ClassFigures = dict[str, float | int | None]


@dataclass(frozen=True)
class Evaluation:
    """What :func:`evaluate` measured on one split; ``metrics.json`` is :meth:`as_dict`, key for key.

    A figure is None where it is undefined (an AUC over a split holding one class). ``evaluation["accuracy"]``
    reads a field by its JSON name, as code written for the dict this replaced does."""

    n: int
    class_names: list[str]
    accuracy: float | None
    balanced_accuracy: float | None
    auc_roc_micro: float | None
    auc_roc_macro: float | None
    ap_micro: float | None
    ap_macro: float | None
    confusion_matrix: list[list[int]]
    per_class: dict[str, ClassFigures]
    split: str
    attention_share: dict[str, float]
    """Mean attention per magnification label (the paper's Tables 3–4)."""
    mean_entropy: float
    inference: dict[str, object]
    """The inference settings used: mode, samples, k."""
    checkpoint: str
    ece: float | None = None
    """Expected calibration error of the top-class confidence (:data:`calibration_bins` equal-width bins over
    [0, 1]); None on an empty split (and in a metrics.json written before it existed)."""
    calibration_bins: int = CALIBRATION_BINS
    reliability: list[dict[str, float | int | None]] = dataclasses.field(default_factory=list)
    """Per confidence bin: edges, count, mean confidence, accuracy (``reliability.png`` draws it)."""
    mean_probability_std: float | None = None
    """Mean over slides of the top class's probability standard deviation over the inference draws (0 for a
    deterministic mode)."""
    mean_predictive_entropy: float | None = None
    """Mean over slides of the predictive entropy of the class probabilities (nats)."""
    mean_patches_read: float | None = None

    @classmethod
    def from_dict(cls, values: Mapping[str, Any]) -> Evaluation:
        """From :meth:`as_dict`'s form (a ``metrics.json`` read back); keys of no field are left out."""
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in values.items() if k in names})

    def as_dict(self) -> dict[str, Any]:
        """The JSON form (``metrics.json``)."""
        return dataclasses.asdict(self)

    def __getitem__(self, key: str) -> Any:
        if key not in {f.name for f in dataclasses.fields(self)}:
            raise KeyError(key)
        return getattr(self, key)


def evaluate(
    run: str | Path,
    *,
    split: str = "test",
    out: str | Path | None = None,
    inference: str | None = None,
    samples: int | None = None,
    epsilon: float | None = None,
    budget: int | None = None,
) -> Evaluation:
    """Evaluate a trained run on one split; write metrics.json (with the expected calibration error over 10
    equal-width bins of the top-class confidence), predictions.csv (with each slide's spread over the inference
    draws) and ROC/PR/reliability/confusion PNGs.

    ``inference`` (sample / mean / topk / exhaustive / adaptive), ``samples``, and adaptive's ``epsilon`` and
    ``budget`` default to the run's settings; the mode used is recorded in the metrics.
    """
    if out is not None:  # writable, before anything is read (the default, inside the run, once the run loads)
        prepare_output_folder(out, "output folder (--out)")
    cfg, model, ckpt = load_run(run)
    out_dir = Path(out) if out is not None else RunPaths(Path(run)).root / f"eval-{split}"
    prepare_output_folder(out_dir, "output folder (--out)")
    if cfg.data.manifest is None:
        raise ConfigError(f"{run}: its config names no manifest (data.manifest): is it a run folder of `loupe train`?")
    manifest = load_manifest(cfg.data.manifest, cfg.data.classes).subset(split)
    classes = list(manifest.classes)
    records = list(manifest.records)
    catalog = make_catalog(records, cfg)
    catalog.require_all()
    settings = resolve_inference(cfg, inference, samples, epsilon=epsilon, budget=budget)
    try:
        result = infer(model, catalog, list(range(len(records))), cfg, settings)
    finally:
        catalog.close()

    y_true = manifest.label_indices()
    labels = [m.label for m in magnifications_of(cfg)]
    probs = np.stack([p.probs for p in result]) if result else np.zeros((0, len(classes)))
    totals = np.stack([p.totals() for p in result]) if result else np.zeros((0, len(labels)))
    calib = calibration(y_true, probs, classes)
    spreads = [_uncertainty(p, classes) for p in result]
    top_std = [float(p.spread[int(np.argmax(p.probs))]) for p in result]
    metrics = Evaluation(
        **classification_metrics(y_true, probs, classes),
        split=split,
        attention_share=attention_share(totals, labels),
        mean_entropy=mean_entropy([p.attention for p in result]),
        inference=settings.record(),
        checkpoint=str(ckpt),
        ece=calib["ece"],  # type: ignore[arg-type]
        calibration_bins=CALIBRATION_BINS,
        reliability=calib["table"],  # type: ignore[arg-type]
        mean_probability_std=float(np.mean(top_std)) if result else None,
        mean_predictive_entropy=float(np.mean([s["entropy"] for s in spreads])) if result else None,
        mean_patches_read=float(np.mean([p.patches_read for p in result])) if result else None,
    )
    write_json(out_dir / "metrics.json", metrics.as_dict())

    rows = [
        prediction_row({"slide_id": r.slide_id, "label": r.label}, probs[n], totals[n], classes, labels, spreads[n])
        for n, r in enumerate(records)
    ]
    write_csv(out_dir / "predictions.csv", rows, prediction_columns(["slide_id", "label"], classes, labels))
    if len(np.unique(y_true)) > 1:
        plot_roc(y_true, probs, classes, out_dir / "roc.png")
        plot_pr(y_true, probs, classes, out_dir / "pr.png")
    if result:
        plot_reliability(y_true, probs, classes, out_dir / "reliability.png")
    plot_confusion(np.asarray(metrics.confusion_matrix), classes, out_dir / "confusion.png")
    return metrics


def _uncertainty(prediction: SlidePrediction, classes: list[str]) -> dict[str, Any]:
    """A prediction's spread and cost in the form predictions.csv rows take (as in ``prediction.json``)."""
    return {
        "probability_std": {c: float(v) for c, v in zip(classes, prediction.spread, strict=True)},
        "entropy": prediction.entropy,
        "patches_read": prediction.patches_read,
    }
