"""The attention network A: one joint distribution over every grid cell of every magnification."""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

NORMALISATIONS = ("sigmoid", "softmax")


class AttentionNetwork(nn.Module):
    """Per magnification an adaptive average pool to that magnification's grid and a 1×1 convolution.

    The logits of all cells of all magnifications are flattened (magnifications in order, each row-major) and
    normalised into one distribution: a sigmoid then division by the sum (the paper), or a softmax. Cells flagged
    invalid (padding, background) get probability exactly 0.

    ``balance_magnifications`` weights magnification j's unnormalised scores (sigmoid or exp of the logits) by
    ``1/n_cells_j``, so that with equal logits each magnification holds the same total attention instead of the
    one with the most cells dominating by count alone; the network can still move all the mass anywhere. (For
    softmax this is adding ``−log(n_cells_j)`` to the logits; for the sigmoid it must be applied after the sigmoid,
    or a shared shift of all logits would undo the balance.)
    """

    def __init__(
        self,
        in_channels: int,
        n_magnifications: int,
        normalisation: str = "sigmoid",
        balance_magnifications: bool = True,
    ) -> None:
        super().__init__()
        if normalisation not in NORMALISATIONS:
            raise ValueError(f"normalisation must be one of {NORMALISATIONS}, got {normalisation!r}")
        self.normalisation = normalisation
        self.balance_magnifications = balance_magnifications
        self.heads = nn.ModuleList(nn.Conv2d(in_channels, 1, kernel_size=1) for _ in range(n_magnifications))
        for head in self.heads:
            assert isinstance(head, nn.Conv2d) and head.bias is not None
            nn.init.normal_(head.weight, std=0.01)
            nn.init.zeros_(head.bias)

    def forward(
        self, features: Tensor, shapes: Sequence[tuple[int, int]], valid: Tensor | None = None
    ) -> tuple[Tensor, Tensor]:
        """Return (logits, probs), each (B, N) over all cells; ``shapes`` holds (rows, cols) per magnification.

        ``logits`` are the heads' raw outputs; the magnification balance is applied inside the normalisation.
        """
        if len(shapes) != len(self.heads):
            raise ValueError(f"expected {len(self.heads)} grid shapes, got {len(shapes)}")
        logits = []
        log_weights = []
        for head, (rows, cols) in zip(self.heads, shapes, strict=True):
            # The 1×1 convolution and the average pool are both linear (and an average keeps the bias), so
            # convolving first gives the same logits while pooling one channel instead of C: on a whole slide the
            # finest grid has ~10^6 cells, and pooling C channels to it costs C times the memory.
            cell_logits = F.adaptive_avg_pool2d(head(features), (rows, cols)).flatten(1)
            logits.append(cell_logits)
            log_weights.append(torch.full((rows * cols,), -math.log(rows * cols), dtype=cell_logits.dtype))
        all_logits = torch.cat(logits, dim=1)
        weights = torch.cat(log_weights).to(all_logits.device) if self.balance_magnifications else None
        return all_logits, normalise(all_logits, self.normalisation, valid, weights)


def normalise(
    logits: Tensor, normalisation: str, valid: Tensor | None = None, log_weights: Tensor | None = None
) -> Tensor:
    """Turn cell logits (B, N) into one distribution per row, with exact zeros on invalid cells.

    ``log_weights`` (N,) optionally multiplies each cell's unnormalised score by ``exp(log_weights)``.
    """
    if normalisation == "softmax":
        if log_weights is not None:
            logits = logits + log_weights
        if valid is not None:
            logits = logits.masked_fill(~valid, -torch.inf)
        return torch.softmax(logits, dim=-1)
    scores = torch.sigmoid(logits)
    if log_weights is not None:
        scores = scores * log_weights.exp()
    if valid is not None:
        scores = scores * valid.to(scores.dtype)
    return scores / scores.sum(dim=-1, keepdim=True).clamp_min(torch.finfo(scores.dtype).tiny)


def attention_dropout(
    probs: Tensor, rate: float, keep_at_least: int, generator: torch.Generator | None = None
) -> Tensor:
    """Zero a random fraction ``rate`` of the nonzero cells of each row and renormalise (training only).

    Rows keep at least ``keep_at_least`` nonzero cells (or all they had), so k draws remain possible.
    """
    if rate <= 0:
        return probs
    alive = probs > 0
    noise = torch.rand(probs.shape, generator=generator, device=probs.device, dtype=probs.dtype)
    keep = (noise >= rate) & alive
    # Guarantee enough cells: re-admit the cells with the largest noise among the alive ones.
    need = torch.clamp(torch.minimum(alive.sum(-1), torch.tensor(keep_at_least, device=probs.device)), min=1)
    short = keep.sum(-1) < need
    if short.any():
        ranked = torch.where(alive, noise, torch.full_like(noise, -1.0))
        order = ranked.argsort(dim=-1, descending=True)
        top = torch.zeros_like(keep)
        pos = torch.arange(probs.shape[-1], device=probs.device).expand_as(order)
        top.scatter_(-1, order, pos < need.unsqueeze(-1))
        keep = torch.where(short.unsqueeze(-1), keep | top, keep)
    dropped = probs * keep.to(probs.dtype)
    return dropped / dropped.sum(-1, keepdim=True).clamp_min(torch.finfo(probs.dtype).tiny)


def entropy_regulariser(probs: Tensor) -> Tensor:
    """R = Σ P log P per row (B,), with 0 log 0 = 0; adding α·R to the loss spreads the attention."""
    return torch.where(probs > 0, probs * torch.log(probs.clamp_min(torch.finfo(probs.dtype).tiny)), 0.0).sum(-1)
