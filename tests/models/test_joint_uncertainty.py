"""The joint model's Monte-Carlo spread at inference: the standard deviation of the class probabilities over the
inference draws (``SlideOutput.spread``)."""

from __future__ import annotations

import pytest
import torch
from torch import Tensor, nn

from loupe.models import AttentionNetwork, Backbone, JointAttentionSampler
from loupe.models.joint import draw_spread

PAPER = {"uniform_mix": 0.0, "train_draws": 1, "novelty": 0.0, "novelty_epochs": 0, "magnification_aware": False}
SHAPES = ((1, 1), (2, 2), (3, 4))  # 17 cells
N_CELLS = 17
PATCH = 8


def read_cells(cells: Tensor) -> Tensor:
    """Each cell's own patch (the same on every call): cells give different features."""
    gen = torch.Generator().manual_seed(0)
    table = torch.rand(N_CELLS, 3, PATCH, PATCH, generator=gen)
    b, n = cells.shape
    return table[cells.reshape(-1)].reshape(b, n, 3, PATCH, PATCH)


class Probe(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 4, stride=4)
        nn.init.normal_(self.conv.weight, std=0.5)

    def forward_features(self, x: Tensor) -> Tensor:
        return torch.tanh(self.conv(x))


def model(k: int = 2) -> JointAttentionSampler:
    torch.manual_seed(0)
    h = Backbone(Probe(), 8, (0.5, 0.5, 0.5), (0.25, 0.25, 0.25))
    f = Backbone(Probe(), 8, (0.5, 0.5, 0.5), (0.25, 0.25, 0.25))
    return JointAttentionSampler(h, f, AttentionNetwork(8, len(SHAPES)), n_classes=3, k=k, **PAPER).eval()


def thumbs(b: int = 2) -> Tensor:
    return torch.rand(b, 3, 32, 48, generator=torch.Generator().manual_seed(1))


def test_identical_draws_have_a_spread_of_exactly_zero():
    logits = torch.tensor([[0.3, -1.1, 2.0], [0.1, 0.1, 0.1]])
    assert torch.equal(draw_spread(logits.expand(7, 2, 3)), torch.zeros(2, 3))
    # One valid cell: every draw reads it, so every draw's prediction is the same.
    valid = torch.zeros(2, N_CELLS, dtype=torch.bool)
    valid[:, 5] = True
    with torch.no_grad():
        out = model().classify(thumbs(), SHAPES, read_cells, valid, mode="mean", n_samples=6)
    assert out.spread is not None and torch.equal(out.spread, torch.zeros(2, 3))


def test_the_mean_mode_spread_is_the_std_of_each_draws_probabilities():
    net, n = model(k=1), 8
    with torch.no_grad():
        out = net.classify(
            thumbs(), SHAPES, read_cells, mode="mean", n_samples=n, generator=torch.Generator().manual_seed(4)
        )
        gen = torch.Generator().manual_seed(4)  # the same random stream, one draw at a time
        singles = torch.stack(
            [net.classify(thumbs(), SHAPES, read_cells, mode="sample", generator=gen).logits for _ in range(n)]
        )
    expected = torch.softmax(singles, -1).std(0, correction=0)
    assert out.spread is not None
    torch.testing.assert_close(out.spread, expected, rtol=1e-4, atol=1e-6)
    assert float(out.spread.min()) > 1e-4  # k = 1 of 17 different cells: the draws disagree


@pytest.mark.parametrize("mode, n_samples", [("sample", 1), ("mean", 1), ("topk", 1), ("exhaustive", 1)])
def test_deterministic_and_single_draw_predictions_carry_no_spread(mode, n_samples):
    with torch.no_grad():
        out = model().classify(thumbs(), SHAPES, read_cells, mode=mode, n_samples=n_samples)
    assert out.spread is None  # read as 0 by the inference path


def test_training_makes_no_spread():
    out = model().train().classify(thumbs(), SHAPES, read_cells, mode="mean", n_samples=3)
    assert out.spread is None
