"""Pieces shared by train, evaluate and predict: run folders, catalogs, loading a trained model, inference."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import lightning as L
import numpy as np
import torch

from loupe.config import Config, load_config
from loupe.data.catalog import SlideCatalog
from loupe.data.loading import CellReader, ThumbnailDataset, make_loader
from loupe.data.manifest import SlideRecord
from loupe.data.whole_image import WholeImageReader
from loupe.errors import ConfigError, LoupeError
from loupe.models import build_model
from loupe.slides import Magnification, parse_magnifications
from loupe.slides.cache import SlideCache
from loupe.slides.tissue import TissueSettings
from loupe.training.module import AttentionSamplingModule


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
    """A catalog of slides read with the run's magnifications, patch size, backend, µm/px override, thumbnail
    size, tissue detection and cache."""
    return SlideCatalog(
        records,
        magnifications_of(cfg),
        cfg.model.patch_size,
        cfg.data.backend,
        cfg.data.slide_mpp,
        thumbnail_size=cfg.model.thumbnail_size,
        tissue=tissue_settings(cfg),
        cache=SlideCache(cfg.data.cache_dir, enabled=cfg.data.cache),
    )


def build_module(cfg: Config, n_classes: int) -> L.LightningModule:
    """The Lightning module of a run's architecture: attention sampling (joint, gated_mil) or StreamingCLAM."""
    if cfg.model.architecture == "streamingclam":
        from loupe.models.streamingclam import build_streamingclam
        from loupe.training.streaming_module import StreamingCLAMModule

        model = build_streamingclam(cfg.model, cfg.streaming, n_classes)
        return StreamingCLAMModule(model, cfg.model, cfg.train, cfg.streaming)
    return AttentionSamplingModule(build_model(cfg.model, n_classes), cfg.model, cfg.train)


def attach_reader(module: L.LightningModule, catalog: SlideCatalog, cfg: Config) -> CellReader | WholeImageReader:
    """Give the module what reads its pixels (sampled cells, or whole images for StreamingCLAM); returns it so
    that the caller can close it and read its timings."""
    if cfg.model.architecture == "streamingclam":
        reader: CellReader | WholeImageReader = WholeImageReader(
            catalog, cfg.data.read_threads, crop_to_tissue=cfg.streaming.crop_to_tissue and cfg.data.tissue
        )
    else:
        reader = CellReader(catalog, cfg.data.read_threads)
    module.cell_reader = reader
    return reader


def load_run(run_dir: str | Path, checkpoint: str = "best") -> tuple[Config, L.LightningModule, Path]:
    """The config and trained module of a run folder (weights loaded with ``weights_only=True``)."""
    paths = RunPaths(Path(run_dir))
    if not paths.config.is_file():
        raise LoupeError(f"{paths.root} is not a loupe run folder (no config.yaml): pass the --out of `loupe train`")
    cfg = load_config(paths.config)
    ckpt = paths.best if checkpoint == "best" and paths.best.is_file() else paths.last
    if not ckpt.is_file():
        raise LoupeError(f"no checkpoint in {paths.checkpoints}: train first (`loupe train ... --out {paths.root}`)")
    state = torch.load(ckpt, map_location="cpu", weights_only=True)
    classes = cfg.data.classes or []
    module = build_module(cfg, len(classes))
    module.load_state_dict(state["state_dict"])
    module.eval()
    return cfg, module.to(inference_device(cfg)), ckpt


def inference_device(cfg: Config) -> torch.device:
    """Where evaluate and predict run the model: the GPU when there is one and the run's accelerator allows it."""
    wants_gpu = cfg.train.accelerator in ("auto", "gpu", "cuda")
    return torch.device("cuda" if wants_gpu and torch.cuda.is_available() else "cpu")


@dataclass
class Inference:
    """Per slide (in the order asked): class probabilities, attention over all cells, cells read."""

    probs: np.ndarray  # (N, C)
    attention: list[np.ndarray]  # flat attention per slide
    shapes: list[tuple[tuple[int, int], ...]]
    cells: list[np.ndarray]

    def maps(self, i: int) -> list[np.ndarray]:
        """Slide i's attention as one (rows, cols) map per magnification."""
        sizes = [r * c for r, c in self.shapes[i]]
        parts = np.split(self.attention[i], np.cumsum(sizes)[:-1])
        return [part.reshape(shape) for part, shape in zip(parts, self.shapes[i], strict=True)]

    def magnification_totals(self) -> np.ndarray:
        """(N, m): each slide's total attention per magnification."""
        return np.asarray([[m.sum() for m in self.maps(i)] for i in range(len(self.attention))], dtype=np.float64)


@dataclass(frozen=True)
class InferenceSettings:
    """How patches are pooled at inference; recorded next to every output."""

    mode: str
    samples: int
    k: int

    @classmethod
    def resolve(cls, cfg: Config, mode: str | None, samples: int | None, k: int | None = None) -> InferenceSettings:
        """The requested mode, sample count and patches per sample, defaulting to the run's."""
        if k is not None and k < 1:
            raise ConfigError(f"k={k}: at least one patch per sample is needed")
        return cls(mode or cfg.train.inference, samples or cfg.train.inference_samples, k or cfg.model.k)

    def record(self) -> dict:
        """The JSON form: ``samples`` is what was averaged (1 unless mode is ``mean``)."""
        return {"mode": self.mode, "samples": self.samples if self.mode == "mean" else 1, "k": self.k}


def prediction_row(fields: dict, probs: np.ndarray, totals: np.ndarray, classes: list[str], labels: list[str]) -> dict:
    """One predictions.csv row: the given fields, predicted class, class probabilities, attention per magnification."""
    row = dict(fields) | {"predicted": classes[int(probs.argmax())]}
    row |= {f"prob_{c}": float(probs[j]) for j, c in enumerate(classes)}
    return row | {f"attention_{lab}": float(totals[j]) for j, lab in enumerate(labels)}


def prediction_columns(fields: list[str], classes: list[str], labels: list[str]) -> list[str]:
    """The column order of predictions.csv, matching :func:`prediction_row`."""
    return [*fields, "predicted", *(f"prob_{c}" for c in classes), *(f"attention_{m}" for m in labels)]


@torch.no_grad()
def infer(
    module: L.LightningModule,
    catalog: SlideCatalog,
    indices: list[int],
    cfg: Config,
    mode: str,
    n_samples: int,
    batch_size: int | None = None,
) -> Inference:
    """Run the model on catalog slides ``indices`` with the given pooling mode; no gradients, eval mode."""
    torch.manual_seed(cfg.train.seed)
    dataset = ThumbnailDataset(catalog, indices, cache=False)
    loader = make_loader(dataset, batch_size or cfg.data.batch_size, shuffle=False, num_workers=cfg.data.num_workers)
    reader = attach_reader(module, catalog, cfg)
    module.eval()
    position = {i: n for n, i in enumerate(indices)}
    probs: list = [None] * len(indices)
    attention: list = [None] * len(indices)
    shapes: list = [None] * len(indices)
    cells: list = [None] * len(indices)
    try:
        for batch in loader:
            out = module.run(batch, mode, n_samples)
            p = torch.softmax(out.logits.float(), -1).cpu().numpy()
            for b, i in enumerate(batch["index"].tolist()):
                n = position[i]
                probs[n] = p[b]
                attention[n] = out.attention[b].float().cpu().numpy()
                shapes[n] = catalog.grid(i).shapes
                cells[n] = out.cells[b].cpu().numpy()
    finally:
        reader.close()
    return Inference(np.stack(probs) if probs else np.zeros((0, 0)), attention, shapes, cells)
