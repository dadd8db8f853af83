"""Gated-attention MIL over every valid patch of one magnification (Ilse et al. 2018; CLAM's head), as a baseline.

The pipeline most users run today: cut the image into all patches at one magnification, embed each with f, pool
them with gated attention, classify. Its attention (in evaluate and predict: maps, GeoJSON) is the gated attention
weights over the cells (zero on invalid cells); the thumbnail is unused and nothing is sampled.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from loupe.config import GatedMILConfig, ModelConfig
from loupe.models.backbones import Backbone, create_backbone
from loupe.models.gated_attention import GatedAttention
from loupe.models.interface import InferenceSettings, PixelSource, SlideBatch, SlideClassifier, SlideOutput
from loupe.models.joint import CellEmbedder, PatchReader, cell_embedder, embed_patches, patch_reader, valid_cells

#: The defaults of every setting the model shares with its settings section: one source for both.
_DEFAULTS, _MODEL_DEFAULTS = GatedMILConfig(), ModelConfig()


class GatedAttentionMIL(SlideClassifier):
    """All valid patches of one magnification → f → gated attention pooling → dropout + linear.

    Built from a run's settings by :meth:`from_settings`; the constructor's defaults are the settings' defaults.
    """

    def __init__(
        self,
        patch_net: Backbone,
        n_classes: int,
        attention_hidden: int = _DEFAULTS.attention_hidden,
        attention_dropout: float = _DEFAULTS.attention_dropout,
        classifier_dropout: float = _MODEL_DEFAULTS.classifier_dropout,
        patch_chunk: int = 64,
        freeze_patch_net: bool = _MODEL_DEFAULTS.freeze_patch_backbone,
    ) -> None:
        super().__init__()
        self.patch_net = patch_net
        self.pool = GatedAttention(patch_net.num_features, attention_hidden, attention_dropout)
        self.classifier = nn.Sequential(nn.Dropout(classifier_dropout), nn.Linear(patch_net.num_features, n_classes))
        self.patch_chunk = patch_chunk
        if freeze_patch_net:
            self.freeze("patch_net")

    @classmethod
    def from_settings(cls, model: ModelConfig, settings: GatedMILConfig, n_classes: int) -> GatedAttentionMIL:
        """The model of a run's ``model`` and ``gated_mil`` settings."""
        return cls(
            create_backbone(model.patch_backbone, model.patch_pretrained),
            n_classes,
            attention_hidden=settings.attention_hidden,
            attention_dropout=settings.attention_dropout,
            classifier_dropout=model.classifier_dropout,
            freeze_patch_net=model.freeze_patch_backbone,
        )

    def patch_network(self) -> nn.Module:
        return self.patch_net

    def embed(self, patches: Tensor) -> Tensor:
        """f on patches (B, n, 3, p, p) → (B, n, D), in chunks so that memory stays bounded."""
        return embed_patches(
            self.patch_net, patches, self.patch_chunk, self.channels_last, frozen="patch_net" in self.frozen
        )

    def forward(
        self,
        batch: SlideBatch,
        pixels: PixelSource,
        inference: InferenceSettings | None = None,
        labels: Tensor | None = None,
    ) -> SlideOutput:
        """Classify a batch from every valid cell of its single magnification (training and inference alike:
        nothing is sampled, so ``inference`` does not apply); with ``labels``, the cross-entropy per slide."""
        device = batch.valid.device
        read = patch_reader(pixels, batch, device)
        embed_cells = cell_embedder(self, self.embed, read, batch, pixels)
        out = self.classify(batch.shapes, read, batch.valid, len(batch), device, embed_cells)
        if labels is not None:
            out.loss = F.cross_entropy(out.logits, labels, reduction="none")
        return out

    def classify(
        self,
        shapes: Sequence[tuple[int, int]],
        read_patches: PatchReader,
        valid: Tensor | None,
        batch_size: int,
        device: torch.device | None = None,
        embed_cells: CellEmbedder | None = None,
    ) -> SlideOutput:
        """Every valid cell of ``batch_size`` images (``valid`` (B, N), None: every cell) → f → gated pooling."""
        if len(shapes) != 1:
            raise ValueError(f"gated-attention MIL reads one magnification, got {len(shapes)} grid shapes")
        b = batch_size
        n_cells = shapes[0][0] * shapes[0][1]
        cells, real = valid_cells(valid, (b, n_cells), device)
        feats = embed_cells(cells) if embed_cells is not None else self.embed(read_patches(cells))
        pooled, weights = self.pool(feats, real)
        attention = torch.zeros(b, n_cells, dtype=weights.dtype, device=weights.device)
        attention = attention.scatter_add(1, cells, weights * real.to(weights.dtype))
        return SlideOutput(self.classifier(pooled), attention, cells)
