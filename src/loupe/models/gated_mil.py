"""Gated-attention MIL over every valid patch of one magnification (Ilse et al. 2018; CLAM's head), as a baseline.

The pipeline most users run today: cut the image into all patches at one magnification, embed each with f, pool
them with gated attention, classify. It has the forward signature of :class:`JointAttentionSampler` and returns a
:class:`JointOutput`, so the Lightning module, evaluate and predict (attention maps, GeoJSON) use it unchanged;
its attention is the gated attention weights over the cells (zero on invalid cells), and the thumbnail is unused.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn

from loupe.models.backbones import Backbone
from loupe.models.gated_attention import GatedAttention
from loupe.models.joint import JointOutput, PatchReader, embed_patches, valid_cells


class GatedAttentionMIL(nn.Module):
    """All valid patches of one magnification → f → gated attention pooling → dropout + linear."""

    def __init__(
        self,
        patch_net: Backbone,
        n_classes: int,
        hidden: int = 128,
        attention_dropout: float = 0.0,
        classifier_dropout: float = 0.5,
        patch_chunk: int = 64,
    ) -> None:
        super().__init__()
        self.patch_net = patch_net
        self.pool = GatedAttention(patch_net.num_features, hidden, attention_dropout)
        self.classifier = nn.Sequential(nn.Dropout(classifier_dropout), nn.Linear(patch_net.num_features, n_classes))
        self.patch_chunk = patch_chunk
        self.k = 0  # every valid cell is read; kept so that callers setting k (predict --k) do no harm
        self.channels_last = False

    def embed(self, patches: Tensor) -> Tensor:
        """f on patches (B, n, 3, p, p) → (B, n, D), in chunks so that memory stays bounded."""
        return embed_patches(self.patch_net, patches, self.patch_chunk, self.channels_last)

    def forward(
        self,
        thumbnails: Tensor,
        shapes: Sequence[tuple[int, int]],
        read_patches: PatchReader,
        valid: Tensor | None = None,
        mode: str = "exhaustive",
        n_samples: int = 1,
        generator: torch.Generator | None = None,
    ) -> JointOutput:
        """Classify a batch from every valid cell of its single magnification; ``mode``, ``n_samples`` and
        ``generator`` are accepted for signature compatibility and ignored (nothing is sampled)."""
        if len(shapes) != 1:
            raise ValueError(f"gated-attention MIL reads one magnification, got {len(shapes)} grid shapes")
        b = thumbnails.shape[0]
        n_cells = shapes[0][0] * shapes[0][1]
        cells, real = valid_cells(valid, (b, n_cells), thumbnails.device)
        feats = self.embed(read_patches(cells))
        pooled, weights = self.pool(feats, real)
        attention = torch.zeros(b, n_cells, dtype=weights.dtype, device=weights.device)
        attention = attention.scatter_add(1, cells, weights * real.to(weights.dtype))
        regulariser = torch.zeros(b, dtype=pooled.dtype, device=pooled.device)
        return JointOutput(self.classifier(pooled), attention, cells, regulariser)
