"""StreamingCLAM (Dooper et al., Medical Image Analysis 2023): a CNN trained end to end on whole images.

The convolutional trunk (a ResNet-34 in the paper) runs over the whole image tile by tile
(:class:`~loupe.models.streaming.StreamingTrunk`), so memory is bounded by the tile while every gradient is the
full-image one. Every kept position of the feature map (optionally max-pooled by ``local_pool``) is one instance
of a gated-attention head (CLAM's); a linear layer classifies the attention-weighted embedding. CLAM's
instance-clustering loss is an option.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from functools import lru_cache

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from loupe.config import ModelConfig, StreamingCLAMConfig
from loupe.errors import ConfigError
from loupe.models.backbones import Backbone, forward_features
from loupe.models.gated_attention import GatedAttention
from loupe.models.interface import (
    ImageRegions,
    InferenceSettings,
    PixelSource,
    SlideBatch,
    SlideClassifier,
    SlideOutput,
    read_crop,
)
from loupe.models.streaming import (
    StreamingTrunk,
    freeze_normalisation,
    output_shape,
    resnet_sequential,
)

#: Training images whose average statistics calibrate a randomly initialised trunk's normalisation layers.
CALIBRATION_IMAGES = 16
#: The defaults of every setting the model shares with its settings section: one source for both.
_DEFAULTS, _MODEL_DEFAULTS = StreamingCLAMConfig(), ModelConfig()
#: Sub-tile side (input pixels) in which a ResNet stem is streamed over each tile's crop: its half-resolution,
#: 64-channel activation is the largest of the trunk, and would otherwise set a tile's peak memory.
STEM_TILE = _DEFAULTS.stem_tile


class _Features(nn.Module):
    """The backbone's feature extractor (a timm model's ``forward_features``) as a module of its own."""

    def __init__(self, net: nn.Module) -> None:
        super().__init__()
        self.net = net

    def forward(self, x: Tensor) -> Tensor:
        return forward_features(self.net, x)


@dataclass
class StreamingOutput:
    """One image through StreamingCLAM."""

    logits: Tensor  # (1, C)
    attention: Tensor  # (h, w) gated attention over the head's positions, 0 where not kept
    features: Tensor  # (n_kept, D) embeddings of the kept positions (the instances), row-major
    keep: Tensor  # (h*w,) bool: the positions that are instances


class StreamingCLAM(SlideClassifier):
    """Streamed CNN trunk → (local max-pool) → gated attention over every kept position → linear classifier.

    Each slide is streamed alone, so the training loop accumulates slides (``accumulates_slides``). The loss is
    the bag cross-entropy, or (1 − w)·bag CE + w·CLAM's instance loss with instance classifiers.
    ``checkpoint_segments`` (ResNet trunks): recompute each residual block in a tile's backward, less memory per tile
    for one more forward; off, a tile keeps all its activations (faster, so larger tiles pay off).
    ``fold_normalisation``: compute with the frozen BatchNorms folded into their convolutions (exact in real
    arithmetic and faster, but further from the whole-image float32 gradients: off by default). ``stem_tile``: a
    ResNet stem (with ``stem_depth`` leading children: 1 the stem, :func:`~loupe.models.streaming.resnet_stem_depth`
    the stem and ``layer1``) is streamed over each tile's crop in sub-tiles of this side (None: whole), see
    :class:`~loupe.models.streaming.StreamingTrunk`. With ``local_pool`` 1 the streamed trunk stitches only the
    kept (tissue) positions, so memory after the trunk follows the tissue, not its bounding box.
    """

    accumulates_slides = True
    mean: Tensor
    std: Tensor

    def __init__(
        self,
        backbone: Backbone,
        n_classes: int,
        tile_size: int = _DEFAULTS.tile_size,
        local_pool: int = _DEFAULTS.local_pool,
        attention_hidden: int = _DEFAULTS.attention_hidden,
        attention_dropout: float = _DEFAULTS.attention_dropout,
        classifier_dropout: float = _MODEL_DEFAULTS.classifier_dropout,
        instance_classifiers: bool = _DEFAULTS.instance_loss,
        instance_k: int = _DEFAULTS.instance_k,
        k: int = _DEFAULTS.k,
        instance_weight: float = _DEFAULTS.instance_weight,
        freeze_encoder_epochs: int = _DEFAULTS.freeze_encoder_epochs,
        calibrate: bool = False,
        freeze_trunk: bool = _MODEL_DEFAULTS.freeze_patch_backbone,
        checkpoint_segments: bool = _DEFAULTS.checkpoint_segments,
        fold_normalisation: bool = _DEFAULTS.fold_normalisation,
        stem_tile: int | None = STEM_TILE,
        stem_depth: int = _DEFAULTS.stem_depth,
    ) -> None:
        super().__init__()
        freeze_normalisation(backbone.net)
        self.register_buffer("mean", backbone.mean.clone(), persistent=False)
        self.register_buffer("std", backbone.std.clone(), persistent=False)
        trunk: nn.Module
        try:  # a ResNet streams as stem + blocks, each a checkpoint segment: a tile keeps one block's activations
            trunk, segments, stem = resnet_sequential(backbone.net), checkpoint_segments, stem_tile
            depth = stem_depth
        except ConfigError:
            trunk, segments, stem, depth = _Features(backbone.net), False, None, 1
        self.stream = StreamingTrunk(
            trunk,
            tile_size,
            preprocess=self.preprocess,
            checkpoint_segments=segments,
            fold_normalisation=fold_normalisation,
            stem_tile=stem if stem is not None and stem < tile_size else None,
            stem_depth=depth,
        )
        self.local_pool = int(local_pool)
        self.pool = nn.MaxPool2d(self.local_pool, ceil_mode=True) if self.local_pool > 1 else nn.Identity()
        d = backbone.num_features
        self.attention = GatedAttention(d, attention_hidden, attention_dropout)
        self.classifier = nn.Sequential(nn.Dropout(classifier_dropout), nn.Linear(d, n_classes))
        self.instance_classifiers = (
            nn.ModuleList(nn.Linear(d, 2) for _ in range(n_classes)) if instance_classifiers else None
        )
        self.instance_k = instance_k
        self.k = k
        """Most attended positions reported as an image's key cells."""
        self.instance_weight = instance_weight
        self.freeze_encoder_epochs = freeze_encoder_epochs
        self.calibrate = calibrate
        self.freeze_trunk = freeze_trunk
        """Never train the trunk (a frozen pretrained encoder): only the head learns, no streamed backward."""
        if freeze_trunk:
            self.set_encoder_trainable(False)
        """Calibrate the trunk's frozen normalisation on training images before training (random trunks)."""

    @property
    def trunk(self) -> nn.Module:
        """The convolutional trunk (unstreamed)."""
        return self.stream.trunk

    def preprocess(self, x: Tensor) -> Tensor:
        """Pixels (uint8, or float in [0, 1]) → the trunk's normalised input; pointwise, so it runs per tile."""
        scale = 255.0 if x.dtype == torch.uint8 else 1.0
        return (x.to(self.mean.dtype) / scale - self.mean) / self.std

    @torch.no_grad()
    def calibrate_normalisation(self, images: Iterable[Tensor], max_side: int | None = None) -> int:
        """Set the trunk's normalisation statistics to their average over ``images`` (1, 3, H, W), then freeze
        them again; returns the number of images used.

        Streaming needs frozen normalisation; a randomly initialised trunk has identity statistics, so its
        activations are not normalised at all and it learns slowly, if at all. A pretrained trunk keeps its own
        statistics. ``max_side`` crops each image to its centre (e.g. one streaming tile) to bound memory.
        """
        norms = [m for m in self.trunk.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
        momenta = [m.momentum for m in norms]
        for m in norms:
            m.reset_running_stats()
            m.momentum = None  # cumulative average over every image
            m.train()
        n = 0
        for image in images:
            # The centre: a slide's tissue box is often glass at its corners.
            crop = image if max_side is None else centre_crop(image, max_side)
            self.trunk(self.preprocess(crop.to(self.mean.device)))
            n += 1
        for m, momentum in zip(norms, momenta, strict=True):
            m.momentum = momentum
        freeze_normalisation(self.trunk)
        return n

    def set_encoder_trainable(self, trainable: bool) -> None:
        """Freeze or unfreeze the trunk (normalisation layers stay frozen either way)."""
        for p in self.trunk.parameters():
            p.requires_grad_(trainable)
        freeze_normalisation(self.trunk)

    @classmethod
    def from_settings(cls, model: ModelConfig, settings: StreamingCLAMConfig, n_classes: int) -> StreamingCLAM:
        """The model of a run's ``model`` and ``streamingclam`` settings: its trunk is ``model.patch_backbone``;
        its normalisation is calibrated when ``calibrate_normalisation`` says so (unset: for a random trunk)."""
        from loupe.models.backbones import create_backbone

        calibrate = settings.calibrate_normalisation
        return cls(
            create_backbone(model.patch_backbone, model.patch_pretrained),
            n_classes,
            tile_size=settings.tile_size,
            local_pool=settings.local_pool,
            attention_hidden=settings.attention_hidden,
            attention_dropout=settings.attention_dropout,
            classifier_dropout=model.classifier_dropout,
            instance_classifiers=settings.instance_loss,
            instance_k=settings.instance_k,
            k=settings.k,
            instance_weight=settings.instance_weight,
            freeze_encoder_epochs=settings.freeze_encoder_epochs,
            calibrate=model.patch_pretrained is False if calibrate is None else calibrate,
            freeze_trunk=model.freeze_patch_backbone,
            checkpoint_segments=settings.checkpoint_segments,
            fold_normalisation=settings.fold_normalisation,
            stem_tile=settings.stem_tile or None,
            stem_depth=settings.stem_depth,
        )

    def default_inference(self) -> InferenceSettings:
        """Every position, with the ``k`` most attended reported as its key cells."""
        return InferenceSettings("exhaustive", 1, self.k)

    def forward(
        self,
        batch: SlideBatch,
        pixels: PixelSource,
        inference: InferenceSettings | None = None,
        labels: Tensor | None = None,
    ) -> SlideOutput:
        """Each slide of the batch streamed whole (so ``inference`` only sets how many most attended positions
        are reported as its cells); attention covers the slide's whole grid, zero outside the tissue crop."""
        device = self.mean.device
        k = inference.k if inference is not None and inference.k > 0 else self.k
        valid = batch.valid.cpu().numpy()
        rows, cols = batch.shapes[0]
        logits, attention, cells, losses, read = [], [], [], [], []
        for b, i in enumerate(batch.slides):
            whole = pixels.whole(i, valid[b])
            image = whole.image.to(device) if isinstance(whole.image, Tensor) else whole.image  # read per tile
            out = self.classify_image(image, whole.keep.to(device))
            logits.append(out.logits)
            read.append(int(whole.keep.sum()))  # every tissue position is streamed
            full = out.attention.new_zeros((rows, cols))
            r0, c0, r1, c1 = whole.box
            full[r0:r1, c0:c1] = out.attention
            attention.append(full.reshape(-1))
            top = self.top_cells(out, k)
            width = c1 - c0
            cells.append((top // width + r0) * cols + top % width + c0)
            if labels is not None:
                losses.append(self.loss(out, int(labels[b])))
        n = max((len(c) for c in cells), default=0)
        padded = [torch.cat([c, c[:1].expand(n - len(c))]) if len(c) else c.new_zeros(n) for c in cells]
        result = SlideOutput(torch.cat(logits), torch.stack(attention), torch.stack(padded))
        result.patches_read = torch.tensor(read, dtype=torch.long)
        if labels is not None:
            result.loss = torch.stack(losses)
        return result

    def loss(self, out: StreamingOutput, label: int) -> Tensor:
        """One image's objective: bag cross-entropy, mixed with the instance loss when there are instance heads."""
        ce = F.cross_entropy(out.logits, torch.tensor([label], device=out.logits.device))
        if self.instance_classifiers is None:
            return ce
        w = self.instance_weight
        return (1 - w) * ce + w * self.instance_loss(out, label)

    def prepare_training(self, batches: Iterable[SlideBatch], pixels: PixelSource) -> None:
        """Calibrate the frozen normalisation on up to :data:`CALIBRATION_IMAGES` training images (when asked)."""
        if not self.calibrate:
            return
        images = []
        for batch in batches:
            valid = batch.valid.cpu().numpy()
            for b, i in enumerate(batch.slides):
                images.append(centre_crop(pixels.whole(i, valid[b]).image, self.stream.tile_size))
                if len(images) >= CALIBRATION_IMAGES:
                    break
            if len(images) >= CALIBRATION_IMAGES:
                break
        self.calibrate_normalisation(images, max_side=self.stream.tile_size)

    def begin_epoch(self, epoch: int) -> None:
        """The encoder trains from epoch ``freeze_encoder_epochs`` on (never when ``freeze_trunk``); before that,
        only the head."""
        self.set_encoder_trainable(not self.freeze_trunk and epoch >= self.freeze_encoder_epochs)

    def classify_image(
        self, image: Tensor | ImageRegions, keep: Tensor | None = None, streamed: bool = True
    ) -> StreamingOutput:
        """Classify one image (1, 3, H, W), uint8 or float in [0, 1] (or an :class:`ImageRegions` source, read per
        tile when streamed).

        ``keep`` (h, w) bool marks the head's positions that are tissue (None: all); tiles of the trunk that
        feed no kept position are skipped. ``streamed=False`` runs the trunk on the whole image at once (the
        reference the streamed result equals).
        """
        trunk_keep = None
        if keep is not None and self.local_pool > 1:
            trunk_keep = keep.repeat_interleave(self.local_pool, 0).repeat_interleave(self.local_pool, 1)
        elif keep is not None:
            trunk_keep = keep
        if streamed:
            size = self.stream.output_shape(int(image.shape[-2]), int(image.shape[-1]))[1:]
            mask = None if trunk_keep is None else trunk_keep[: size[0], : size[1]][None, None]
            if self.local_pool == 1:  # only the kept positions are stitched: (n_kept, D)
                if keep is not None and tuple(keep.shape) != size:
                    raise ValueError(f"keep mask {tuple(keep.shape)} does not match the feature map {size}")
                feats = self.stream(image, mask, rows=True)
                flat_keep = (
                    torch.ones(size[0] * size[1], dtype=torch.bool, device=feats.device)
                    if keep is None
                    else keep.reshape(-1).to(feats.device)
                )
                return self._head(feats, flat_keep, size)
            fmap = self.stream(image, mask)
        else:
            if not isinstance(image, Tensor):
                raise ValueError("the whole-image reference (streamed=False) needs the image as a tensor")
            fmap = self.trunk(self.preprocess(image))
            if trunk_keep is not None:
                fmap = fmap * trunk_keep[: fmap.shape[-2], : fmap.shape[-1]].to(fmap.dtype)
        fmap = self.pool(fmap)
        h, w = fmap.shape[-2:]
        if keep is None:
            keep = torch.ones(h, w, dtype=torch.bool, device=fmap.device)
        elif tuple(keep.shape) != (h, w):
            raise ValueError(f"keep mask {tuple(keep.shape)} does not match the feature map ({h}, {w})")
        flat_keep = keep.reshape(-1).to(fmap.device)
        return self._head(fmap[0].flatten(1).t()[flat_keep], flat_keep, (int(h), int(w)))

    def _head(self, feats: Tensor, flat_keep: Tensor, size: tuple[int, int]) -> StreamingOutput:
        """Gated attention over the kept positions' features (n_kept, D), then the classifier."""
        pooled, weights = self.attention(feats[None])
        attention = weights.new_zeros(size[0] * size[1]).masked_scatter(flat_keep, weights[0])
        return StreamingOutput(self.classifier(pooled), attention.view(size), feats, flat_keep)

    def instance_loss(self, out: StreamingOutput, label: int) -> Tensor:
        """CLAM's instance-clustering loss: for the true class, the k most attended positions are positives and
        the k least attended negatives; for every other class its k most attended are negatives."""
        if self.instance_classifiers is None:
            raise RuntimeError("StreamingCLAM was built without instance classifiers")
        idx = torch.nonzero(out.keep).squeeze(-1)
        k = min(self.instance_k, len(idx) // 2)
        if k < 1:
            return out.logits.new_zeros(())
        scores = out.attention.reshape(-1)[idx].detach()
        order = torch.argsort(scores, descending=True)
        top, bottom = order[:k], order[-k:]  # rows of out.features
        losses = []
        for c, head in enumerate(self.instance_classifiers):
            if c == label:
                x = torch.cat([out.features[top], out.features[bottom]])
                y = torch.cat([torch.ones(k), torch.zeros(k)]).long()
            else:
                x, y = out.features[top], torch.zeros(k, dtype=torch.long)
            losses.append(F.cross_entropy(head(x), y.to(x.device)))
        return torch.stack(losses).mean()

    def top_cells(self, out: StreamingOutput, k: int | None = None) -> Tensor:
        """Flat indices (row-major over the head's positions) of the ``k`` (default: the model's) most attended
        kept positions."""
        scores = out.attention.reshape(-1).detach().masked_fill(~out.keep, -1.0)
        k = min(self.k if k is None else k, int(out.keep.sum()))
        return torch.topk(scores, k).indices if k > 0 else scores.new_zeros(0, dtype=torch.long)


def centre_crop(image: Tensor | ImageRegions, side: int) -> Tensor:
    """A copy of the centre ``side`` × ``side`` crop of an image (at most the image): what calibration looks at."""
    h, w = int(image.shape[-2]), int(image.shape[-1])
    y0, x0 = max(0, (h - side) // 2), max(0, (w - side) // 2)
    rows, cols = slice(y0, min(h, y0 + side)), slice(x0, min(w, x0 + side))
    return read_crop(image, rows, cols).clone()  # a copy: a view would keep the whole image alive


@lru_cache(maxsize=32)
def trunk_stride(backbone: str) -> int:
    """Input pixels per feature-map position of a backbone's trunk (32 for a ResNet), from its geometry alone
    (built on the meta device: no weights are made)."""
    from loupe.models.backbones import create_backbone

    with torch.device("meta"):
        net = create_backbone(backbone, False).net
    probe = 64 * 1024
    try:
        trunk: nn.Module = resnet_sequential(net)
    except ConfigError:
        trunk = _Features(net)
    return probe // output_shape(trunk, probe, probe)[1]


def cell_size(model_cfg: ModelConfig, cfg: StreamingCLAMConfig) -> int:
    """One grid cell of a StreamingCLAM run in pixels: one position of the attention head, the trunk's stride ×
    ``local_pool``."""
    return trunk_stride(model_cfg.patch_backbone) * cfg.local_pool
