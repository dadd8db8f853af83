"""`loupe demo`: generate a synthetic dataset, train, evaluate, predict and write a short report."""

from __future__ import annotations

import dataclasses
import logging
import time
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any

from loupe.config import Config, load_config
from loupe.data.manifest import load_manifest
from loupe.datasets.synthetic import SyntheticSpec, generate_dataset
from loupe.errors import prepare_output_folder
from loupe.reports import write_json, write_text
from loupe.workflows.common import magnifications_of
from loupe.workflows.evaluation import Evaluation, evaluate
from loupe.workflows.prediction import predict
from loupe.workflows.training import train

log = logging.getLogger("loupe")

N_OVERLAYS = 4


@dataclass(frozen=True)
class DemoTimings:
    """Wall seconds of each part of the demo (rounded to 0.1 s)."""

    generate: float
    train: float
    evaluate_and_predict: float
    total: float


@dataclass(frozen=True)
class DemoResult:
    """What :func:`run_demo` did: the test set's evaluation, where the evidence was planted, how long each part
    took. ``metrics.json`` is :meth:`as_dict`: the evaluation's keys plus ``signal_magnification`` and
    ``timings_s``; ``result["accuracy"]`` reads a key of that form, as code written for the dict this replaced."""

    evaluation: Evaluation
    signal_magnification: str
    """The magnification label the class evidence was planted at."""
    timings_s: DemoTimings

    def as_dict(self) -> dict[str, Any]:
        """The JSON form (the demo's ``metrics.json``)."""
        timings = dataclasses.asdict(self.timings_s)
        return self.evaluation.as_dict() | {"signal_magnification": self.signal_magnification, "timings_s": timings}

    def __getitem__(self, key: str) -> Any:
        return self.as_dict()[key]


def demo_config() -> Config:
    """The shipped demo preset."""
    return load_config(Path(str(resources.files("loupe") / "configs" / "demo.yaml")))


def run_demo(
    *, out: str | Path, signal_magnification: str = "highest", epochs: int | None = None, progress_bar: bool = True
) -> DemoResult:
    """The whole main job on generated data into ``out``; returns the test set's evaluation and the timings."""
    start = time.perf_counter()
    out = prepare_output_folder(out, "output folder (--out)")
    cfg = demo_config()
    labels = [m.label for m in magnifications_of(cfg)]
    spec = SyntheticSpec(
        labels=tuple(labels),
        magnifications=(2.0, 1.0, 0.5),
        patch_size=cfg.joint.patch_size,
        signal=signal_magnification,
    )
    planted = spec.labels[spec.signal_index()]
    log.info("demo: generating synthetic slides whose class shows only at %s, into %s", planted, out / "data")
    manifest_path = generate_dataset(out / "data", spec)
    generated = time.perf_counter()

    cfg = dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, manifest=str(manifest_path)))
    train_cfg = dataclasses.replace(cfg.train, progress_bar=progress_bar)
    if epochs is not None:
        train_cfg = dataclasses.replace(train_cfg, epochs=epochs)
    cfg = dataclasses.replace(cfg, train=train_cfg)
    log.info("demo: training %d epochs into %s", cfg.train.epochs, out / "run")
    run = train(cfg, out=out / "run")
    trained = time.perf_counter()

    log.info("demo: evaluating the test split into %s", out / "eval")
    metrics = evaluate(run, split="test", out=out / "eval")
    test = load_manifest(manifest_path).subset("test")
    picks = [r.path for r in test.records[:N_OVERLAYS]]
    log.info("demo: predicting %d test slides into %s", len(picks), out / "predict")
    predict(run, picks, out=out / "predict", heatmaps=True)  # the report shows their overlays
    done = time.perf_counter()

    timings = DemoTimings(
        generate=round(generated - start, 1),
        train=round(trained - generated, 1),
        evaluate_and_predict=round(done - trained, 1),
        total=round(done - start, 1),
    )
    result = DemoResult(metrics, planted, timings)
    write_json(out / "metrics.json", result.as_dict())
    write_text(out / "report.md", _report(result, [p.stem for p in picks]))
    return result


def _report(result: DemoResult, slide_ids: list[str]) -> str:
    m, t = result.evaluation, result.timings_s
    share = m.attention_share
    planted = result.signal_magnification
    rows = "\n".join(
        f"| {lab} | {100 * v:.1f}% | {'**planted**' if lab == planted else ''} |" for lab, v in share.items()
    )
    overlays = "\n".join(f"![{s}](predict/slides/{s}/overlay.png)" for s in slide_ids)
    inf = m.inference
    return f"""# loupe demo

Synthetic slides whose class can be told only at **{planted}**, only in one small region. The model sees a
thumbnail, chooses where and at which magnification to look, reads k = {inf["k"]} patches and classifies.

## Test set ({m.n} slides; inference: {inf["mode"]}, {inf["samples"]} sample(s) of k = {inf["k"]})

| metric | value |
|---|---|
| accuracy | {_figure(m.accuracy)} |
| balanced accuracy | {_figure(m.balanced_accuracy)} |
| AUC-ROC (macro) | {_figure(m.auc_roc_macro)} |
| AP (macro) | {_figure(m.ap_macro)} |
| mean attention entropy | {m.mean_entropy:.3f} |

## Attention share per magnification (the paper's Table 3)

| magnification | share of attention | |
|---|---|---|
{rows}

## Attention on a few test slides

{overlays}

Curves: [ROC](eval/roc.png), [PR](eval/pr.png), [confusion matrix](eval/confusion.png).

Wall time: generate {t.generate} s, train {t.train} s, evaluate + predict {t.evaluate_and_predict} s,
total {t.total} s.
"""


def _figure(value: float | None) -> str:
    """A metric to three decimals, or "n/a" where it is undefined (an AUC over a split holding one class)."""
    return "n/a" if value is None else f"{value:.3f}"
