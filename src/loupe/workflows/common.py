"""Pieces shared by train, evaluate and predict: run folders, catalogs, loading a trained model."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from loupe.config import Config, load_config
from loupe.data.catalog import SlideCatalog
from loupe.data.manifest import SlideRecord
from loupe.errors import LoupeError
from loupe.models import SlideClassifier, architecture, build_model
from loupe.models.runtime import Runtime
from loupe.slides import Magnification, parse_magnifications
from loupe.slides.cache import SlideCache
from loupe.slides.tissue import TissueSettings
from loupe.training.checkpoint_io import load_weights_only
from loupe.training.frozen import FROZEN, fill_frozen
from loupe.workflows import run_weights
from loupe.workflows.inference import runtime_of


@dataclass(frozen=True)
class RunPaths:
    """The layout of a run folder."""

    root: Path

    @property
    def config(self) -> Path:
        return self.root / "config.yaml"

    @property
    def manifest(self) -> Path:
        return self.root / "manifest.csv"

    @property
    def checkpoints(self) -> Path:
        return self.root / "checkpoints"

    @property
    def best(self) -> Path:
        return self.checkpoints / "best.ckpt"

    @property
    def last(self) -> Path:
        return self.checkpoints / "last.ckpt"


def magnifications_of(cfg: Config) -> tuple[Magnification, ...]:
    return parse_magnifications(cfg.model.magnifications, cfg.model.magnification_labels)


def tissue_settings(cfg: Config) -> TissueSettings | None:
    """The tissue detection of a run, or None when it is off."""
    return TissueSettings(min_cell_fraction=cfg.data.tissue_min_fraction) if cfg.data.tissue else None


def make_catalog(records: list[SlideRecord] | tuple[SlideRecord, ...], cfg: Config) -> SlideCatalog:
    """A catalog of slides read with the run's magnifications, cell size (the architecture's), backend, µm/px
    override, thumbnail size, tissue detection and cache."""
    entry = architecture(cfg)
    return SlideCatalog(
        records,
        magnifications_of(cfg),
        entry.cell_size(cfg),
        cfg.data.backend,
        cfg.data.slide_mpp,
        thumbnail_size=entry.thumbnail_size(cfg),
        tissue=tissue_settings(cfg),
        cache=SlideCache(cfg.data.cache_dir, enabled=cfg.data.cache),
    )


def run_checkpoint(
    run_dir: str | Path, checkpoint: str = "best", *, weights: str | Path | None = None
) -> tuple[Config, Path]:
    """The config of a run folder and the checkpoint file it would load (``best``, else ``last``), without
    loading any weights; the weights files of its networks resolved (:func:`~loupe.workflows.run_weights.resolve`:
    a frozen encoder left out of the checkpoint is found where the config says or where ``weights`` or
    ``$LOUPE_WEIGHTS`` point, and checked by its SHA-256)."""
    paths = RunPaths(Path(run_dir))
    if not paths.config.is_file():
        raise LoupeError(f"{paths.root} is not a loupe run folder (no config.yaml): pass the --out of `loupe train`")
    ckpt = paths.best if checkpoint == "best" and paths.best.is_file() else paths.last
    if not ckpt.is_file():
        load_config(paths.config)  # a broken config is the first thing to say
        raise LoupeError(f"no checkpoint in {paths.checkpoints}: train first (`loupe train ... --out {paths.root}`)")
    return run_weights.run_config(paths.config, ckpt, weights), ckpt


def load_model(
    run_dir: str | Path, checkpoint: str = "best", *, weights: str | Path | None = None
) -> tuple[Config, SlideClassifier, Path]:
    """The config and trained model of a run folder (weights loaded with ``weights_only=True``), on the CPU in
    float32 and in training mode, as its checkpoint holds it: a frozen encoder left out of the checkpoint comes
    from its (checked) weights file."""
    cfg, ckpt = run_checkpoint(run_dir, checkpoint, weights=weights)
    state = load_weights_only(ckpt)  # a file holding pickled objects is refused with a message
    prefix = "model."
    params = {k[len(prefix) :]: v for k, v in state["state_dict"].items() if k.startswith(prefix)}
    cfg = architecture(cfg).migrate_checkpoint(cfg, params)  # e.g. trained before a part of the model existed
    model = build_model(cfg, len(cfg.data.classes or []))
    if state.get(FROZEN):
        fill_frozen(params, state[FROZEN], model, "")
    model.load_state_dict(params)
    return cfg, model, ckpt


def load_run(
    run_dir: str | Path, checkpoint: str = "best", *, weights: str | Path | None = None
) -> tuple[Config, SlideClassifier, Path]:
    """The config and trained model of a run folder (:func:`load_model`), in eval mode on the run's inference
    device and memory format. ``weights``: where to look for a frozen encoder's weights file left out of the
    checkpoint, when it is not where the run's config says (a file, or a folder; also ``$LOUPE_WEIGHTS``)."""
    cfg, model, ckpt = load_model(run_dir, checkpoint, weights=weights)
    model.eval()
    runtime: Runtime = runtime_of(cfg)
    runtime.prepare(model)
    return cfg, model, ckpt


def prediction_row(
    fields: dict[str, Any],
    probs: np.ndarray,
    totals: np.ndarray,
    classes: list[str],
    labels: list[str],
    uncertainty: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """One predictions.csv row: the given fields, predicted class, class probabilities, attention per magnification,
    then the prediction's spread and cost (``uncertainty``: ``probability_std`` by class, ``entropy``,
    ``patches_read``, as :func:`loupe.workflows.slide_outputs.uncertainty` gives them)."""
    row = dict(fields) | {"predicted": classes[int(probs.argmax())]}
    row |= {f"prob_{c}": float(probs[j]) for j, c in enumerate(classes)}
    row |= {f"attention_{lab}": float(totals[j]) for j, lab in enumerate(labels)}
    if uncertainty is not None:
        row |= {f"std_{c}": uncertainty["probability_std"].get(c) for c in classes}
        row |= {"entropy": uncertainty["entropy"], "patches_read": uncertainty["patches_read"]}
    return row


def prediction_columns(fields: list[str], classes: list[str], labels: list[str]) -> list[str]:
    """The column order of predictions.csv, matching :func:`prediction_row`: the uncertainty columns come last
    (``std_<class>``: standard deviation of the class probability over the inference draws, 0 for deterministic
    modes; ``entropy``: predictive entropy in nats; ``patches_read``), so that older readers see the same first
    columns."""
    return [
        *fields,
        "predicted",
        *(f"prob_{c}" for c in classes),
        *(f"attention_{m}" for m in labels),
        *(f"std_{c}" for c in classes),
        "entropy",
        "patches_read",
    ]
