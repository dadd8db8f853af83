"""The joint spatial and magnification attention-sampling model (Zhang et al., CVPRW 2021), as a plain module.

h(thumbnail) → attention network A → one distribution P over every cell of every magnification → k cells
drawn → their patches read (by a callback: the model never touches slides) → f → unbiased estimate of
Σ P f → g (dropout + linear). The exhaustive variant is the same module run with ``mode="exhaustive"``.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from loupe.models.attention import AttentionNetwork, attention_dropout, entropy_regulariser
from loupe.models.backbones import Backbone
from loupe.models.estimators import (
    exact_expectation,
    expectation_with_replacement,
    expectation_without_replacement,
    sample_cells,
)

MODES = ("sample", "mean", "topk", "exhaustive")

#: Reads the patches of cells: flat cell indices (B, n) → float patches (B, n, 3, p, p) in [0, 1].
PatchReader = Callable[[Tensor], Tensor]


@dataclass
class JointOutput:
    """What one forward pass produced."""

    logits: Tensor  # (B, C) class logits
    attention: Tensor  # (B, N) attention over all cells (validity applied, before attention dropout)
    cells: Tensor  # (B, n) flat indices of the cells whose patches were read
    regulariser: Tensor  # (B,) R = Σ P log P of the attention


class JointAttentionSampler(nn.Module):
    """Thumbnail → where and at which magnification to look → k patches → class."""

    def __init__(
        self,
        thumbnail_net: Backbone,
        patch_net: Backbone,
        attention: AttentionNetwork,
        n_classes: int,
        k: int = 5,
        replace: bool = False,
        attention_dropout: float = 0.0,
        classifier_dropout: float = 0.5,
        patch_chunk: int = 256,
    ) -> None:
        super().__init__()
        self.thumbnail_net = thumbnail_net
        self.patch_net = patch_net
        self.attention = attention
        self.k = k
        self.replace = replace
        self.attention_dropout = attention_dropout
        self.patch_chunk = patch_chunk
        self.channels_last = False
        """Feed the backbones channels-last inputs (set together with the parameters' format)."""
        self.classifier = nn.Sequential(nn.Dropout(classifier_dropout), nn.Linear(patch_net.num_features, n_classes))

    def attend(
        self, thumbnails: Tensor, shapes: Sequence[tuple[int, int]], valid: Tensor | None = None
    ) -> tuple[Tensor, Tensor]:
        """Attention logits and probabilities (B, N) over all cells, from the thumbnails (B, 3, h, w)."""
        thumbnails = thumbnails.contiguous(memory_format=_memory_format(self.channels_last))
        return self.attention(self.thumbnail_net.feature_map(thumbnails), shapes, valid)

    def embed(self, patches: Tensor) -> Tensor:
        """f on patches (B, n, 3, p, p) → (B, n, D), batched in chunks so that memory stays bounded."""
        return embed_patches(self.patch_net, patches, self.patch_chunk, self.channels_last)

    def forward(
        self,
        thumbnails: Tensor,
        shapes: Sequence[tuple[int, int]],
        read_patches: PatchReader,
        valid: Tensor | None = None,
        mode: str = "sample",
        n_samples: int = 1,
        generator: torch.Generator | None = None,
    ) -> JointOutput:
        """Classify a batch of images whose grids all have ``shapes``.

        Modes: ``sample`` (one draw of k cells; training uses it), ``mean`` (the estimator averaged over
        ``n_samples`` draws), ``topk`` (the k most attended cells, weights renormalised), ``exhaustive`` (f on
        every cell, exact Σ P f).
        """
        if mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
        _, probs = self.attend(thumbnails, shapes, valid)
        regulariser = entropy_regulariser(probs)

        if mode == "exhaustive":
            cells, real = valid_cells(valid, probs.shape, probs.device)
            feats = self.embed(read_patches(cells))
            weights = probs.gather(1, cells) * real.to(probs.dtype)
            return JointOutput(self.classifier(exact_expectation(weights, feats)), probs, cells, regulariser)

        if mode == "topk":
            k = min(self.k, probs.shape[1])
            cells = torch.topk(probs.detach(), k, dim=-1).indices
            p = probs.gather(1, cells)
            feats = self.embed(read_patches(cells))
            pooled = (p.unsqueeze(-1) * feats).sum(1) / p.sum(1, keepdim=True).clamp_min(1e-12)
            return JointOutput(self.classifier(pooled), probs, cells, regulariser)

        draw_probs = probs
        if self.training and self.attention_dropout > 0:
            draw_probs = attention_dropout(probs, self.attention_dropout, self.k, generator)
        repeats = n_samples if mode == "mean" else 1
        draws = [sample_cells(draw_probs, self.k, self.replace, generator) for _ in range(repeats)]
        cells = torch.cat(draws, dim=1)
        feats = self.embed(read_patches(cells)).split(self.k, dim=1)
        estimates = []
        for idx, f in zip(draws, feats, strict=True):
            p = draw_probs.gather(1, idx)
            if self.replace:
                estimates.append(expectation_with_replacement(p, f))
            else:
                n_alive = (draw_probs > 0).sum(-1, keepdim=True)
                p_valid = torch.arange(self.k, device=p.device).expand_as(p) < n_alive
                estimates.append(expectation_without_replacement(p, f, p_valid))
        pooled = torch.stack(estimates).mean(0)
        return JointOutput(self.classifier(pooled), probs, cells, regulariser)


def _memory_format(channels_last: bool) -> torch.memory_format:
    return torch.channels_last if channels_last else torch.contiguous_format


def embed_patches(net: nn.Module, patches: Tensor, chunk: int, channels_last: bool = False) -> Tensor:
    """``net`` on patches (B, n, 3, p, p) → (B, n, D), ``chunk`` patches per forward so that memory stays bounded."""
    b, n = patches.shape[:2]
    flat = patches.flatten(0, 1).contiguous(memory_format=_memory_format(channels_last))
    return torch.cat([net(c) for c in flat.split(chunk)]).view(b, n, -1)


def valid_cells(
    valid: Tensor | None, shape: Sequence[int], device: torch.device | None = None
) -> tuple[Tensor, Tensor]:
    """Every valid cell of each row, in index order: (cells (B, n), real (B, n) bool), n = the most valid cells
    of any row; shorter rows are padded with their first valid cell (``real`` False), so that the all-cells
    modes never read a background or padding patch."""
    b, n_cells = shape
    if valid is None:
        cells = torch.arange(n_cells, device=device).expand(b, -1)
        return cells, torch.ones(b, n_cells, dtype=torch.bool, device=device)
    counts = valid.sum(-1)
    n = max(int(counts.max()), 1)
    order = torch.sort((~valid).to(torch.int8), dim=-1, stable=True).indices[:, :n]
    real = torch.arange(n, device=valid.device).expand(b, -1) < counts.unsqueeze(-1)
    return torch.where(real, order, order[:, :1]), real


def magnification_totals(attention: Tensor, shapes: Sequence[tuple[int, int]]) -> Tensor:
    """Each image's total attention per magnification: (B, N) → (B, m)."""
    sizes = [r * c for r, c in shapes]
    return torch.stack([part.sum(-1) for part in attention.split(sizes, dim=-1)], dim=-1)


def attention_maps(attention: Tensor, shapes: Sequence[tuple[int, int]]) -> list[Tensor]:
    """Split flat attention (B, N) into one (B, rows, cols) map per magnification."""
    sizes = [r * c for r, c in shapes]
    return [part.reshape(-1, r, c) for part, (r, c) in zip(attention.split(sizes, dim=-1), shapes, strict=True)]
