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
    classification_metrics,
    mean_entropy,
    plot_confusion,
    plot_pr,
    plot_roc,
    write_csv,
    write_json,
)
from loupe.workflows.common import (
    RunPaths,
    load_run,
    magnifications_of,
    make_catalog,
    prediction_columns,
    prediction_row,
)
from loupe.workflows.inference import infer

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
) -> Evaluation:
    """Evaluate a trained run on one split; write metrics.json, predictions.csv and ROC/PR/confusion PNGs.

    ``inference`` (sample / mean / topk / exhaustive) and ``samples`` default to the run's settings; the mode
    used is recorded in the metrics.
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
    settings = resolve_inference(cfg, inference, samples)
    try:
        result = infer(model, catalog, list(range(len(records))), cfg, settings)
    finally:
        catalog.close()

    y_true = manifest.label_indices()
    labels = [m.label for m in magnifications_of(cfg)]
    probs = np.stack([p.probs for p in result]) if result else np.zeros((0, len(classes)))
    totals = np.stack([p.totals() for p in result]) if result else np.zeros((0, len(labels)))
    metrics = Evaluation(
        **classification_metrics(y_true, probs, classes),
        split=split,
        attention_share=attention_share(totals, labels),
        mean_entropy=mean_entropy([p.attention for p in result]),
        inference=settings.record(),
        checkpoint=str(ckpt),
    )
    write_json(out_dir / "metrics.json", metrics.as_dict())

    rows = [
        prediction_row({"slide_id": r.slide_id, "label": r.label}, probs[n], totals[n], classes, labels)
        for n, r in enumerate(records)
    ]
    write_csv(out_dir / "predictions.csv", rows, prediction_columns(["slide_id", "label"], classes, labels))
    if len(np.unique(y_true)) > 1:
        plot_roc(y_true, probs, classes, out_dir / "roc.png")
        plot_pr(y_true, probs, classes, out_dir / "pr.png")
    plot_confusion(np.asarray(metrics.confusion_matrix), classes, out_dir / "confusion.png")
    return metrics
