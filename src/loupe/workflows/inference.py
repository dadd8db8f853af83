"""The one per-slide inference path, shared by evaluate (over a manifest, then metrics), predict (slide by slide,
then outputs) and bench (timed): batches of slides through a :class:`SlideClassifier` in eval mode, without
gradients, in the run's device, autocast and memory format, into one :class:`SlidePrediction` per slide."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from loupe.config import Config
from loupe.data.catalog import SlideCatalog
from loupe.data.embeddings import EmbeddingCache, encoder_key
from loupe.data.loading import ThumbnailDataset, make_loader
from loupe.data.pixels import SlidePixels
from loupe.models.factory import architecture
from loupe.models.interface import (
    GridShapes,
    InferenceSettings,
    PixelSource,
    SlideBatch,
    SlideClassifier,
    magnification_totals,
    split_by_magnification,
)
from loupe.models.runtime import Runtime
from loupe.reports.metrics import predictive_entropy


@dataclass(frozen=True)
class SlidePrediction:
    """One slide's result: class probabilities, attention over every cell, the cells read, its grid shapes, and
    the prediction's Monte-Carlo spread over the inference draws.

    ``std`` is the standard deviation of the class probabilities over the draws (each draw classified on its
    own); it is 0 for a prediction that is one deterministic value (exhaustive, topk, a single draw, gated MIL,
    StreamingCLAM). ``patches_read`` counts the distinct patches (positions) read."""

    index: int  # catalog index
    probs: np.ndarray  # (C,)
    attention: np.ndarray  # (N,) flat over every cell of every magnification
    cells: np.ndarray  # (n,) flat indices of the cells read (or most attended)
    shapes: GridShapes
    std: np.ndarray | None = None  # (C,); None: 0
    patches_read: int = 0

    @property
    def spread(self) -> np.ndarray:
        """(C,) the standard deviation of the class probabilities over the inference draws (0 when deterministic)."""
        return np.zeros_like(self.probs) if self.std is None else self.std

    @property
    def entropy(self) -> float:
        """The predictive entropy −Σ p log p (nats) of the prediction's class probabilities (with ``mean``: the
        classifier of the draws' averaged estimate, the Monte-Carlo mean), 0·log 0 = 0."""
        return predictive_entropy(self.probs)

    def maps(self) -> list[np.ndarray]:
        """The attention as one (rows, cols) map per magnification."""
        return split_by_magnification(self.attention, self.shapes)

    def totals(self) -> np.ndarray:
        """(m,) the attention's total per magnification."""
        return magnification_totals(self.attention.astype(np.float64), self.shapes)


def runtime_of(cfg: Config) -> Runtime:
    """Where and how a run's model runs at inference: the GPU when there is one and ``train.accelerator`` allows
    it, the run's precision (autocast on a GPU) and memory format."""
    return Runtime.of(cfg.train.accelerator, cfg.train.precision, cfg.train.channels_last)


@torch.no_grad()
def predict_batch(
    model: SlideClassifier,
    batch: SlideBatch,
    pixels: PixelSource,
    settings: InferenceSettings,
    runtime: Runtime,
    seed: int | None = None,
) -> list[SlidePrediction]:
    """``model`` on one batch of slides; ``seed`` (when given) makes the result of a slide independent of what ran
    before it."""
    if seed is not None:
        torch.manual_seed(seed)
    runtime.prepare(model, move=False)
    model.eval()
    batch = batch.to(runtime.device, non_blocking=True)
    with runtime.autocast():
        out = model(batch, pixels, settings)
    probs = torch.softmax(out.logits.float(), -1).cpu().numpy()
    attention = out.attention.float().cpu().numpy()
    cells = out.cells.cpu().numpy()
    spread = None if out.spread is None else out.spread.float().cpu().numpy()
    if out.patches_read is not None:
        read = [int(n) for n in out.patches_read.tolist()]
    else:
        read = [len(np.unique(row)) for row in cells]
    return [
        SlidePrediction(
            i, probs[b], attention[b], cells[b], batch.shapes, None if spread is None else spread[b], read[b]
        )
        for b, i in enumerate(batch.slides)
    ]


def infer(
    model: SlideClassifier,
    catalog: SlideCatalog,
    indices: Sequence[int],
    cfg: Config,
    settings: InferenceSettings,
    *,
    pixels: PixelSource | None = None,
    runtime: Runtime | None = None,
    batch_size: int | None = None,
) -> list[SlidePrediction]:
    """Predictions for catalog slides ``indices``, in that order (batched by grid shape, seeded once by the
    run's seed). ``pixels`` defaults to a reader over ``catalog`` made and closed here."""
    torch.manual_seed(cfg.train.seed)
    runtime = runtime or runtime_of(cfg)
    dataset = ThumbnailDataset(catalog, indices, cache=False)
    loader = make_loader(dataset, batch_size or cfg.data.batch_size, shuffle=False, num_workers=cfg.data.num_workers)
    own = pixels is None
    source: PixelSource = pixels if pixels is not None else make_pixels(catalog, cfg, model)
    by_index: dict[int, SlidePrediction] = {}
    try:
        for batch in loader:
            for p in predict_batch(model, batch, source, settings, runtime):
                by_index[p.index] = p
    finally:
        if own and isinstance(source, SlidePixels):
            source.close()
    return [by_index[int(i)] for i in indices]


def make_pixels(catalog: SlideCatalog, cfg: Config, model: SlideClassifier | None = None) -> SlidePixels:
    """The pixel source of a run over ``catalog``: ``data.read_threads`` threads; whole images read as the
    architecture's registry entry says (cropped to the tissue's box when tissue detection is on, read per region
    when large); with ``model`` whose patch network is frozen (and ``data.embedding_cache``), an embedding cache
    keyed by that network's exact weights."""
    reading = architecture(cfg).whole_image
    whole = reading(cfg) if reading is not None else None
    embeddings = None
    patch_net = model.patch_network() if model is not None else None
    if model is not None and patch_net is not None and model.patch_network_frozen and cfg.data.embedding_cache:
        root = Path(cfg.data.cache_dir).expanduser() / "embeddings" if cfg.data.cache_dir else None
        # The weights, and the precision and device they run in (a bf16 GPU embedding is not a float32 CPU one).
        runtime = runtime_of(cfg)
        key = f"{encoder_key(patch_net)}-{runtime.precision}-{runtime.device.type}"
        embeddings = EmbeddingCache(catalog, key, root)
    return SlidePixels(
        catalog,
        cfg.data.read_threads,
        crop_to_tissue=whole is not None and whole.crop_to_tissue and cfg.data.tissue,
        embeddings=embeddings,
        max_image_mb=whole.max_image_mb if whole is not None else None,
    )
