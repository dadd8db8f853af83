"""Adaptive inference: one round is today's sampled inference bit for bit; rounds never read a cell twice; they
stop at ε or the budget; the combined estimate is unbiased (exact enumeration over every draw order)."""

from __future__ import annotations

import itertools

import pytest
import torch
from torch import Tensor, nn

from loupe.models import AttentionNetwork, Backbone, InferenceSettings, JointAttentionSampler, SlideBatch
from loupe.models.adaptive import adaptive_slide, standard_error
from loupe.models.estimators import expectation_without_replacement

PAPER = {"uniform_mix": 0.0, "train_draws": 1, "novelty": 0.0, "novelty_epochs": 0, "magnification_aware": False}
SHAPES = ((1, 1), (2, 2), (3, 4))  # 17 cells
N_CELLS = 17
PATCH = 8


class Probe(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 4, stride=4)
        nn.init.normal_(self.conv.weight, std=0.5)

    def forward_features(self, x: Tensor) -> Tensor:
        return torch.tanh(self.conv(x))


class Pixels:
    """Each cell's own patch; remembers every (slide, cell) read."""

    embeddings = None

    def __init__(self) -> None:
        self.table = torch.rand(N_CELLS, 3, PATCH, PATCH, generator=torch.Generator().manual_seed(0))
        self.reads: list[tuple[int, int]] = []

    def cells(self, slides, cells: Tensor) -> Tensor:
        for slide, row in zip(slides, cells.tolist(), strict=True):
            self.reads += [(slide, c) for c in row]
        b, n = cells.shape
        return self.table[cells.reshape(-1)].reshape(b, n, 3, PATCH, PATCH)

    def whole(self, slide, valid):
        raise AssertionError("the joint model reads cells only")


def model(k: int = 3) -> JointAttentionSampler:
    torch.manual_seed(0)
    h = Backbone(Probe(), 8, (0.5, 0.5, 0.5), (0.25, 0.25, 0.25))
    f = Backbone(Probe(), 8, (0.5, 0.5, 0.5), (0.25, 0.25, 0.25))
    return JointAttentionSampler(h, f, AttentionNetwork(8, len(SHAPES)), n_classes=3, k=k, **PAPER).eval()


def batch(valid: Tensor | None = None) -> SlideBatch:
    thumbs = (torch.rand(2, 3, 32, 48, generator=torch.Generator().manual_seed(1)) * 255).to(torch.uint8)
    valid = torch.ones(2, N_CELLS, dtype=torch.bool) if valid is None else valid
    return SlideBatch(thumbs, valid, torch.tensor([0, 2]), torch.tensor([7, 9]), SHAPES)


def run(settings: InferenceSettings, seed: int = 5, valid: Tensor | None = None, k: int = 3):
    pixels = Pixels()
    torch.manual_seed(seed)
    with torch.no_grad():
        out = model(k)(batch(valid), pixels, settings)
    return out, pixels


@pytest.mark.parametrize("budget", [3, 5])  # budget < 2k: one round
def test_one_round_is_todays_sampled_inference_bit_for_bit(budget):
    sampled, _ = run(InferenceSettings("sample", 1, 3))
    adaptive, _ = run(InferenceSettings("adaptive", 1, 3, 0.5, budget))
    assert torch.equal(adaptive.logits, sampled.logits)
    assert torch.equal(adaptive.cells, sampled.cells) and torch.equal(adaptive.attention, sampled.attention)
    assert adaptive.spread is None and adaptive.patches_read.tolist() == [3, 3]


def test_rounds_never_read_a_cell_twice_and_spend_the_budget():
    out, pixels = run(InferenceSettings("adaptive", 1, 3, 1e-9, 13))  # ε unreachable: 4 whole rounds fit
    for slide in (7, 9):
        cells = [c for s, c in pixels.reads if s == slide]
        assert len(cells) == len(set(cells)) == 12
    assert out.patches_read.tolist() == [12, 12]
    assert out.cells.shape == (2, 12) and all(len(set(row.tolist())) == 12 for row in out.cells)
    assert out.spread is not None and float(out.spread.min()) > 0
    first, _ = run(InferenceSettings("sample", 1, 3))
    assert torch.equal(out.cells[:, :3], first.cells)  # round 1 is the sampled draw


def test_a_spent_budget_is_todays_sampled_inference_with_k_equal_to_the_budget():
    adaptive, _ = run(InferenceSettings("adaptive", 1, 3, 1e-9, 12))  # 4 rounds of 3, weights 1/4 each
    sampled, _ = run(InferenceSettings("sample", 1, 12))  # one draw of 12: the same cells in the same order
    assert torch.equal(adaptive.cells, sampled.cells)
    torch.testing.assert_close(adaptive.logits, sampled.logits, rtol=1e-5, atol=1e-6)


def test_a_large_epsilon_stops_after_the_round_following_the_first_check():
    out, pixels = run(InferenceSettings("adaptive", 1, 3, 1.0, 30))  # SE < 1 after round 2: round 3 is the last
    assert out.patches_read.tolist() == [9, 9] and len(pixels.reads) == 18


def test_a_slide_whose_cells_run_out_reads_each_once_and_ends_exact():
    valid = torch.zeros(2, N_CELLS, dtype=torch.bool)
    valid[0, [2, 5, 6, 11, 16]] = True
    valid[1] = True
    out, pixels = run(InferenceSettings("adaptive", 1, 3, 1e-9, 40), valid=valid)
    slide7 = [c for s, c in pixels.reads if s == 7]
    assert sorted(slide7) == [2, 5, 6, 11, 16]
    assert out.patches_read.tolist() == [5, N_CELLS]
    # Everything read, budget left: the estimate is a weighted mean of unbiased rounds, finite and a distribution.
    assert torch.isfinite(out.logits).all()


def test_a_model_trained_with_replacement_still_reads_no_cell_twice():
    net = model()
    net.replace = True
    pixels = Pixels()
    with torch.no_grad():
        out = net(batch(), pixels, InferenceSettings("adaptive", 1, 3, 1e-9, 15))
    assert len(pixels.reads) == len(set(pixels.reads)) == 30 and out.patches_read.tolist() == [15, 15]


def test_adaptive_is_refused_in_classify():
    with pytest.raises(ValueError, match="classify_adaptive"):
        model().classify(torch.rand(1, 3, 32, 48), SHAPES, Pixels().table.__getitem__, mode="adaptive")


def _successive_probability(p: Tensor, order: tuple[int, ...]) -> float:
    prob, left = 1.0, 1.0
    for c in order:
        prob *= float(p[c]) / left
        left -= float(p[c])
    return prob


def test_the_combined_estimate_is_unbiased_over_every_draw_order_whatever_the_stopping():
    """Exact enumeration: every order of 5 cells, k = 1, budget 5; the ε rule stops some orders after 3 or 4 rounds and
    lets others run to the budget. The expectation of the weighted estimate is Σ P f exactly; the plain mean of the
    same rounds is not (optional stopping)."""
    p = torch.tensor([0.05, 0.15, 0.2, 0.25, 0.35], dtype=torch.float64)
    f = torch.tensor([[0.0], [0.1], [1.5], [-2.0], [3.0]], dtype=torch.float64)

    def classify(e: Tensor) -> Tensor:
        return torch.cat([e, -e], dim=-1)

    expected = expected_plain = 0.0
    reads = set()
    for order in itertools.permutations(range(5)):
        keys = torch.zeros(5, dtype=torch.float64)
        keys[list(order)] = torch.arange(5, 0, -1, dtype=torch.float64)  # the draw order, largest key first
        first = torch.tensor(order[:1])
        first_estimate = expectation_without_replacement(p[first].unsqueeze(0), f[first].unsqueeze(0))[0]
        res = adaptive_slide(p, keys, first, f[first], first_estimate, lambda c: f[c], classify, 1, 0.15, 5)
        assert res.cells.tolist() == list(order[: res.patches_read])
        weight = _successive_probability(p, order)
        expected += weight * float(res.estimate[0])
        expected_plain += weight * float(res.round_estimates.mean(0)[0])
        reads.add(res.patches_read)
    exact = float((p.unsqueeze(-1) * f).sum())
    assert reads == {3, 4, 5}  # the rule stopped orders after 3 or 4 rounds, and let others reach the budget
    assert expected == pytest.approx(exact, abs=1e-12)
    assert abs(expected_plain - exact) > 1e-3


def test_standard_error_of_the_top_class():
    probs = torch.tensor([[0.7, 0.3], [0.5, 0.5], [0.6, 0.4]])
    assert standard_error(probs) == pytest.approx(0.1 / 3**0.5)  # std 0.1 over 3 rounds
