"""The one interface every slide classifier implements, and the types that cross it.

Training, evaluate, predict and bench use a model only through :class:`SlideClassifier`: a batch of slides
(:class:`SlideBatch`) and a source of pixels (:class:`PixelSource`) go in, one :class:`SlideOutput` (a row per
slide) comes out. Models never open slides: pixels reach them only through the source passed to ``forward``.
How a model is run (device, autocast, memory format) is decided in one place, :mod:`loupe.models.runtime`.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, replace
from typing import ClassVar, Protocol, TypeVar

import numpy as np
import torch
from torch import Tensor, nn

#: (rows, cols) of each magnification's grid.
GridShapes = tuple[tuple[int, int], ...]


@dataclass
class SlideBatch:
    """Slides whose grids have the same shapes (batches are bucketed by shape), built by
    :func:`loupe.data.loading.collate_slides`. Treat it as immutable (derive batches with :meth:`to`,
    :meth:`select`); it is not frozen because Lightning's true-precision plugins (64-true, 16-true, bf16-true) copy
    batches field by field, which a frozen dataclass refuses."""

    thumbnails: Tensor  # (B, 3, h, w) uint8
    valid: Tensor  # (B, N) bool: cells that may be attended (tissue, inside the image)
    labels: Tensor  # (B,) int64 class indices, -1 where unknown
    indices: Tensor  # (B,) int64 catalog indices of the slides
    shapes: GridShapes  # the grid shapes shared by every slide of the batch

    def __len__(self) -> int:
        return int(self.indices.shape[0])

    @property
    def slides(self) -> list[int]:
        """The catalog indices as Python ints (what a pixel source takes)."""
        return [int(i) for i in self.indices.tolist()]

    def to(self, device: torch.device | str, non_blocking: bool = False) -> SlideBatch:
        """The batch on ``device`` (Lightning moves batches through this method)."""
        return replace(
            self,
            thumbnails=self.thumbnails.to(device, non_blocking=non_blocking),
            valid=self.valid.to(device, non_blocking=non_blocking),
            labels=self.labels.to(device, non_blocking=non_blocking),
            indices=self.indices.to(device, non_blocking=non_blocking),
        )

    def select(self, rows: Sequence[int]) -> SlideBatch:
        """A batch of some of the slides (e.g. one at a time for models that accumulate slide by slide)."""
        idx = torch.as_tensor(list(rows), dtype=torch.long, device=self.indices.device)
        return SlideBatch(self.thumbnails[idx], self.valid[idx], self.labels[idx], self.indices[idx], self.shapes)


class ImageRegions(Protocol):
    """A large image read region by region instead of held whole (e.g. straight from the slide file).

    Streaming models (:class:`~loupe.models.streaming.StreamingTrunk`) read only the crop each tile needs, so host
    memory holds one crop at a time instead of the whole image (12.9 GB of uint8 at 65,536²).
    """

    @property
    def shape(self) -> tuple[int, int, int, int]:
        """(1, C, H, W) of the whole image."""
        ...

    def crop(self, rows: slice, cols: slice) -> Tensor:
        """Pixels ``[rows, cols]`` (steps of 1, inside the image) as (1, C, h, w) uint8 (any memory format)."""
        ...


def read_crop(image: Tensor | ImageRegions, rows: slice, cols: slice) -> Tensor:
    """``image[..., rows, cols]`` of a tensor or an :class:`ImageRegions` source."""
    return image[..., rows, cols] if isinstance(image, Tensor) else image.crop(rows, cols)


@dataclass(frozen=True)
class WholeImage:
    """A slide's image at a model's magnification, cropped to whole grid cells (for models that see everything)."""

    image: Tensor | ImageRegions  # (1, 3, H, W) uint8, H = rows·p, W = cols·p (white beyond the slide's edge)
    keep: Tensor  # (rows, cols) bool: the cells of the crop that are instances (tissue)
    box: tuple[int, int, int, int]  # (row0, col0, row1, col1) of the crop in the slide's grid


class EmbeddingStore(Protocol):
    """Patch embeddings of a frozen patch network kept across epochs and runs
    (:class:`loupe.data.embeddings.EmbeddingCache`): only cells never embedded before are read and embedded."""

    def features(self, slides: Sequence[int], cells: Tensor, embed_missing: Callable[[Tensor], Tensor]) -> Tensor:
        """Embeddings (B, n, D) of flat cells (B, n) of ``slides``; ``embed_missing`` (cells (B', n') → features)
        reads and embeds the cells not stored yet."""
        ...


class PixelSource(Protocol):
    """Where a model's pixels come from (:class:`loupe.data.pixels.SlidePixels` over a catalog of slides).

    ``embeddings``: the store of the frozen patch network's embeddings, when the run keeps them (models whose
    patch network is frozen read cells through it); None otherwise.
    """

    @property
    def embeddings(self) -> EmbeddingStore | None: ...

    def cells(self, slides: Sequence[int], cells: Tensor) -> Tensor:
        """Patches (B, n, 3, p, p) float in [0, 1] of flat cell indices (B, n) of the given slides."""
        ...

    def whole(self, slide: int, valid: np.ndarray | None) -> WholeImage:
        """Slide ``slide``'s whole image at the model's (single) magnification; ``valid`` (N,) marks tissue."""
        ...


@dataclass(frozen=True)
class InferenceSettings:
    """How a model pools at inference (evaluate, predict, validation); recorded beside every output.

    ``mode`` and ``samples`` apply to the joint model; ``k`` is the number of patches read per sample (joint) or
    the most attended positions reported (StreamingCLAM). Architectures that always read every patch report
    ``exhaustive``. ``epsilon`` and ``budget`` apply to the joint model's ``adaptive`` mode (rounds of k patches
    until the top class's Monte-Carlo standard error is under ``epsilon`` or ``budget`` patches are read).
    """

    mode: str = "exhaustive"
    samples: int = 1
    k: int = 0
    epsilon: float = 0.0
    budget: int = 0

    def record(self) -> dict[str, object]:
        """The JSON form: ``samples`` is what was averaged (1 unless mode is ``mean``); ``epsilon`` and ``budget``
        only for the adaptive mode (so that the records of the other modes are as they were)."""
        out: dict[str, object] = {"mode": self.mode, "samples": self.samples if self.mode == "mean" else 1, "k": self.k}
        if self.mode == "adaptive":
            out |= {"epsilon": self.epsilon, "budget": self.budget}
        return out


@dataclass
class SlideOutput:
    """What a classifier produced for a batch; row b is slide b."""

    logits: Tensor  # (B, C) class logits
    attention: Tensor  # (B, N) attention over every cell of every magnification (0 where not attendable)
    cells: Tensor  # (B, n) flat indices of the cells read (or, for whole-image models, the most attended)
    loss: Tensor | None = None  # (B,) each slide's training objective, when labels were given
    regulariser: Tensor | None = None  # (B,) Σ P log P of the attention, where the architecture has that term
    draw_logits: Tensor | None = None  # (R, B, C) per independent draw, when a training step made several
    auxiliary: Tensor | None = None  # (B,) a training-only term the model adds to its loss
    spread: Tensor | None = None
    """(B, C) at inference: the standard deviation (population, over the R draws) of the class probabilities each
    inference draw gives on its own, the Monte-Carlo spread of the prediction; None where the prediction is one
    deterministic value (exhaustive, topk, a single draw, gated MIL, StreamingCLAM): a spread of 0."""
    patches_read: Tensor | None = None
    """(B,) int64 the distinct patches (or positions) read per slide, where ``cells`` does not say it (None: the
    number of distinct entries of each row of ``cells``)."""


class SlideClassifier(nn.Module, ABC):
    """A slide-level classifier: ``forward(batch, pixels, ...)`` → :class:`SlideOutput`.

    ``forward`` with ``inference=None`` is the training forward (sampling as trained, regularisers on); with
    settings it is the inference forward those settings describe. With ``labels`` the output carries each slide's
    training objective (cross-entropy plus the architecture's own terms), so the training loop needs to know
    nothing about an architecture. Models whose one slide already fills memory set ``accumulates_slides``: the
    training loop then forwards and back-propagates their slides one at a time into one optimiser step.
    """

    #: Train slide by slide (forward, backward, next slide; one optimiser step per batch).
    accumulates_slides: ClassVar[bool] = False

    def __init__(self) -> None:
        super().__init__()
        self.channels_last = False
        """Feed the networks channels-last inputs; set by :meth:`loupe.models.runtime.Runtime.prepare` together
        with the parameters' memory format."""
        self.frozen: tuple[str, ...] = ()
        """Names of child networks that are frozen: no gradient, always in eval mode (see :meth:`freeze`)."""

    def freeze(self, *names: str) -> None:
        """Freeze child networks (e.g. a pretrained patch encoder): their parameters get no gradient and they stay in
        eval mode (normalisation statistics and dropout fixed) whatever ``train()`` is called with."""
        self.frozen = tuple(dict.fromkeys((*self.frozen, *names)))
        for name in names:
            net = getattr(self, name)
            net.requires_grad_(False)
            net.eval()

    def train(self, mode: bool = True) -> SlideClassifier:
        super().train(mode)
        for name in self.frozen:
            getattr(self, name).eval()
        return self

    def set_compute_dtype(self, dtype: torch.dtype) -> None:
        """Hold the frozen networks in ``dtype`` (the autocast dtype of a mixed-precision run on a GPU): they are
        never trained, so their float32 master weights would only cost memory and casts."""
        for name in self.frozen:
            getattr(self, name).to(dtype)

    @abstractmethod
    def forward(
        self,
        batch: SlideBatch,
        pixels: PixelSource,
        inference: InferenceSettings | None = None,
        labels: Tensor | None = None,
    ) -> SlideOutput:
        """Classify ``batch`` reading pixels from ``pixels``; see the class docstring."""

    def default_inference(self) -> InferenceSettings:
        """The inference settings of this model when the caller gives none."""
        return InferenceSettings()

    def patch_network(self) -> nn.Module | None:
        """The network that embeds patches, when the model has one of its own (joint, gated MIL): what
        ``loupe export-encoder`` writes and, when it is frozen, what the embedding cache is keyed by. None for a
        model without one (StreamingCLAM's trunk runs over the whole image)."""
        return None

    @property
    def patch_network_frozen(self) -> bool:
        """The patch network is frozen (its embeddings of a cell never change, so they may be stored)."""
        return self.patch_network() is not None and "patch_net" in self.frozen

    def prepare_training(self, batches: Iterable[SlideBatch], pixels: PixelSource) -> None:
        """Called once before the first training step of a new run (not on resume); e.g. calibration."""

    def begin_epoch(self, epoch: int) -> None:
        """Called at the start of every training epoch; e.g. unfreezing an encoder after some epochs."""

    def __call__(
        self,
        batch: SlideBatch,
        pixels: PixelSource,
        inference: InferenceSettings | None = None,
        labels: Tensor | None = None,
    ) -> SlideOutput:
        output: SlideOutput = super().__call__(batch, pixels, inference, labels)
        return output


ArrayT = TypeVar("ArrayT", Tensor, np.ndarray)


def split_by_magnification(flat: ArrayT, shapes: Sequence[tuple[int, int]]) -> list[ArrayT]:
    """Split per-cell values (..., N) into one (..., rows, cols) map per magnification (row-major grids, in the
    order of ``shapes``). Works on tensors and arrays alike: the one place that knows the flat cell layout."""
    sizes = [int(r) * int(c) for r, c in shapes]
    if sum(sizes) != flat.shape[-1]:
        raise ValueError(f"{flat.shape[-1]} values for grids {list(shapes)} ({sum(sizes)} cells)")
    lead = tuple(flat.shape[:-1])
    if isinstance(flat, Tensor):
        parts_t = flat.split(sizes, dim=-1)
        return [p.reshape(*lead, int(r), int(c)) for p, (r, c) in zip(parts_t, shapes, strict=True)]
    parts_a = np.split(flat, np.cumsum(sizes)[:-1], axis=-1)
    return [p.reshape(*lead, int(r), int(c)) for p, (r, c) in zip(parts_a, shapes, strict=True)]


def magnification_totals(attention: ArrayT, shapes: Sequence[tuple[int, int]]) -> ArrayT:
    """Each slide's total attention per magnification: (..., N) → (..., m)."""
    maps = split_by_magnification(attention, shapes)
    if isinstance(attention, Tensor):
        return torch.stack([m.sum((-2, -1)) for m in maps], dim=-1)
    return np.stack([m.sum((-2, -1)) for m in maps], axis=-1)


def magnification_of(cells: Tensor, shapes: Sequence[tuple[int, int]]) -> Tensor:
    """The magnification index of flat cell indices (any shape), from the grids' (rows, cols): the inverse of
    :func:`split_by_magnification`'s layout, kept beside it."""
    ends = torch.tensor([r * c for r, c in shapes], device=cells.device).cumsum(0)
    return torch.bucketize(cells.contiguous(), ends, right=True)
