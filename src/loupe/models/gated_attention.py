"""Gated attention pooling (Ilse et al., ICML 2018), the aggregation head of CLAM and StreamingCLAM.

``a_k = softmax_k(w^T [tanh(V h_k) ⊙ sigmoid(U h_k)])`` over the instances of a bag, bag embedding ``Σ a_k h_k``.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn


class GatedAttention(nn.Module):
    """Pools a bag of instance embeddings (B, N, D) into one embedding (B, D) with gated attention weights."""

    def __init__(self, in_features: int, hidden: int = 128, dropout: float = 0.0, *, score_bias: bool = True) -> None:
        """``score_bias=False`` leaves the bias out of ``w``: it shifts every score alike, so the softmax cancels it
        and its gradient is rounding noise (what a gradient comparison, e.g. ``loupe bench streaming``, would
        report as the worst parameter); the attention weights are the same either way."""
        super().__init__()
        self.value = nn.Sequential(nn.Linear(in_features, hidden), nn.Tanh(), nn.Dropout(dropout))
        self.gate = nn.Sequential(nn.Linear(in_features, hidden), nn.Sigmoid(), nn.Dropout(dropout))
        self.score = nn.Linear(hidden, 1, bias=score_bias)

    def scores(self, h: Tensor) -> Tensor:
        """Unnormalised attention scores (B, N) of instances (B, N, D)."""
        return self.score(self.value(h) * self.gate(h)).squeeze(-1)

    def forward(self, h: Tensor, mask: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """Return (bag embedding (B, D), attention weights (B, N)); instances with ``mask`` False get weight 0.

        A bag whose mask is all False gets weight 0 everywhere and a zero embedding, rather than NaNs.
        """
        s = self.scores(h)
        if mask is not None:
            s = s.masked_fill(~mask, float("-inf"))
            weights = torch.softmax(s, dim=-1).nan_to_num(0.0)
        else:
            weights = torch.softmax(s, dim=-1)
        return torch.einsum("bn,bnd->bd", weights, h), weights
