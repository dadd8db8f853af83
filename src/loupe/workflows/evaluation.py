"""`loupe evaluate`: the paper's metrics on a split of the run's manifest, with plots and per-slide predictions."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from loupe.data.manifest import load_manifest
from loupe.reports import (
    attention_share,
    classification_metrics,
    mean_entropy,
    plot_confusion,
    plot_pr,
    plot_roc,
    write_csv,
    write_json,
)
from loupe.workflows.common import (
    InferenceSettings,
    RunPaths,
    infer,
    load_run,
    magnifications_of,
    make_catalog,
    prediction_columns,
    prediction_row,
)


def evaluate(
    run_dir: str | Path,
    split: str = "test",
    out: str | Path | None = None,
    inference: str | None = None,
    samples: int | None = None,
) -> dict:
    """Evaluate a trained run on one split; write metrics.json, predictions.csv and ROC/PR/confusion PNGs.

    ``inference`` (sample / mean / topk / exhaustive) and ``samples`` default to the run's settings; the mode
    used is recorded in the metrics.
    """
    cfg, module, ckpt = load_run(run_dir)
    out_dir = Path(out) if out is not None else RunPaths(Path(run_dir)).root / f"eval-{split}"
    manifest = load_manifest(cfg.data.manifest, cfg.data.classes).subset(split)
    classes = list(manifest.classes)
    records = list(manifest.records)
    catalog = make_catalog(records, cfg)
    catalog.require_all()
    settings = InferenceSettings.resolve(cfg, inference, samples)
    result = infer(module, catalog, list(range(len(records))), cfg, settings.mode, settings.samples)
    catalog.close()

    y_true = manifest.label_indices()
    labels = [m.label for m in magnifications_of(cfg)]
    totals = result.magnification_totals()
    metrics = classification_metrics(y_true, result.probs, classes)
    metrics |= {
        "split": split,
        "attention_share": attention_share(totals, labels),
        "mean_entropy": mean_entropy(result.attention),
        "inference": settings.record(),
        "checkpoint": str(ckpt),
    }
    write_json(out_dir / "metrics.json", metrics)

    rows = [
        prediction_row({"slide_id": r.slide_id, "label": r.label}, result.probs[n], totals[n], classes, labels)
        for n, r in enumerate(records)
    ]
    write_csv(out_dir / "predictions.csv", rows, prediction_columns(["slide_id", "label"], classes, labels))
    if len(np.unique(y_true)) > 1:
        plot_roc(y_true, result.probs, classes, out_dir / "roc.png")
        plot_pr(y_true, result.probs, classes, out_dir / "pr.png")
    plot_confusion(np.asarray(metrics["confusion_matrix"]), classes, out_dir / "confusion.png")
    return metrics
