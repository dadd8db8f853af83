"""The attention network A: grid shapes, cell order, normalisation, balance, attention dropout and entropy."""

from __future__ import annotations

import math

import pytest
import torch

from loupe.models import AttentionNetwork, attention_dropout, entropy_regulariser, normalise

# The paper's BACH attention maps (rows, cols) at 50X/100X/200X: 2x2, 4x3 and 7x6 (W x H) -> 58 cells.
BACH_SHAPES = ((2, 2), (3, 4), (6, 7))
# A feature map whose sides are multiples of every grid side, so that adaptive pooling bins do not overlap.
FEAT_H, FEAT_W = 12, 28


def _network(normalisation: str = "sigmoid", balance: bool = True, channels: int = 3) -> AttentionNetwork:
    net = AttentionNetwork(channels, len(BACH_SHAPES), normalisation, balance)
    with torch.no_grad():
        for j, head in enumerate(net.heads):
            head.weight.zero_()
            head.weight[0, 0] = 1.0 + j  # a different gain per magnification, to catch heads used out of order
            head.bias.fill_(0.1 * j)
    return net


def _zero_network(normalisation: str, balance: bool) -> AttentionNetwork:
    net = AttentionNetwork(4, len(BACH_SHAPES), normalisation, balance)
    with torch.no_grad():
        for head in net.heads:
            head.weight.zero_()
            head.bias.zero_()
    return net


def _sizes(shapes=BACH_SHAPES) -> list[int]:
    return [r * c for r, c in shapes]


def test_bach_grids_give_58_cells_in_magnification_then_row_major_order():
    torch.manual_seed(0)
    net = _network(balance=False)
    feats = torch.randn(2, 3, FEAT_H, FEAT_W)
    logits, probs = net(feats, BACH_SHAPES)
    assert logits.shape == probs.shape == (2, 58)

    expected = []
    for j, (rows, cols) in enumerate(BACH_SHAPES):
        pooled = feats[:, 0].reshape(2, rows, FEAT_H // rows, cols, FEAT_W // cols).mean(dim=(2, 4))
        expected.append((1.0 + j) * pooled.reshape(2, -1) + 0.1 * j)  # row-major within a magnification
    torch.testing.assert_close(logits, torch.cat(expected, dim=1), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("y, x", [(0, 0), (5, 20), (11, 27), (7, 3)])
def test_a_hot_spot_lights_up_the_cell_that_contains_it_at_every_magnification(y, x):
    net = _network(balance=True)
    feats = torch.zeros(1, 3, FEAT_H, FEAT_W)
    feats[0, 0, y, x] = 10.0
    logits = net(feats, BACH_SHAPES)[0].detach()
    offset = 0
    for j, (rows, cols) in enumerate(BACH_SHAPES):
        part = logits[0, offset : offset + rows * cols]
        row, col = y // (FEAT_H // rows), x // (FEAT_W // cols)
        assert int(part.argmax()) == row * cols + col, f"magnification {j}"
        offset += rows * cols
    # The 200X head pools 2x4 feature pixels per cell: the hot cell's logit is gain * 10 / 8 + bias.
    hot = logits[0, 4 + 12 + (y // 2) * 7 + x // 4]
    assert float(hot) == pytest.approx(3.0 * 10.0 / 8 + 0.2, rel=1e-5)


@pytest.mark.parametrize("normalisation", ["sigmoid", "softmax"])
def test_probabilities_sum_to_one_and_invalid_cells_are_exactly_zero(normalisation):
    torch.manual_seed(1)
    net = AttentionNetwork(5, 3, normalisation)
    with torch.no_grad():
        for head in net.heads:
            head.weight.normal_(std=3.0)  # large logits, so a sloppy mask would leave visible mass
    feats = torch.randn(3, 5, FEAT_H, FEAT_W)
    valid = torch.rand(3, 58) > 0.4
    valid[:, 0] = True
    _, probs = net(feats, BACH_SHAPES, valid)
    torch.testing.assert_close(probs.sum(-1), torch.ones(3))
    assert torch.all(probs[~valid] == 0.0)
    assert torch.all(probs[valid] > 0.0)

    _, unmasked = net(feats, BACH_SHAPES)
    torch.testing.assert_close(unmasked.sum(-1), torch.ones(3))
    assert torch.all(unmasked > 0)


def test_sigmoid_normalisation_is_sigmoid_then_division_by_the_sum():
    logits = torch.tensor([[-2.0, 0.0, 3.0, 1.0]])
    s = torch.sigmoid(logits)
    torch.testing.assert_close(normalise(logits, "sigmoid"), s / s.sum())
    torch.testing.assert_close(normalise(logits, "softmax"), torch.softmax(logits, -1))
    with pytest.raises(ValueError, match="normalisation"):
        AttentionNetwork(3, 1, "relu")


def test_wrong_number_of_grid_shapes_is_rejected():
    net = AttentionNetwork(3, 3)
    with pytest.raises(ValueError, match="3 grid shapes"):
        net(torch.zeros(1, 3, 4, 4), [(1, 1), (2, 2)])


@pytest.mark.parametrize("normalisation", ["sigmoid", "softmax"])
@pytest.mark.parametrize("bias", [0.0, 4.0, -3.0])
def test_balance_gives_every_magnification_the_same_total_at_equal_logits(normalisation, bias):
    net = _zero_network(normalisation, balance=True)
    with torch.no_grad():
        for head in net.heads:
            head.bias.fill_(bias)  # a shared shift of every logit must not undo the balance
    _, probs = net(torch.randn(2, 4, FEAT_H, FEAT_W), BACH_SHAPES)
    totals = torch.stack([part.sum(-1) for part in probs.split(_sizes(), dim=-1)], dim=-1)
    torch.testing.assert_close(totals, torch.full((2, 3), 1 / 3))


@pytest.mark.parametrize("normalisation", ["sigmoid", "softmax"])
def test_without_balance_totals_are_proportional_to_cell_counts(normalisation):
    net = _zero_network(normalisation, balance=False)
    _, probs = net(torch.randn(1, 4, FEAT_H, FEAT_W), BACH_SHAPES)
    totals = torch.stack([part.sum(-1) for part in probs.split(_sizes(), dim=-1)], dim=-1)
    torch.testing.assert_close(totals, torch.tensor([[4 / 58, 12 / 58, 42 / 58]]))
    torch.testing.assert_close(probs, torch.full((1, 58), 1 / 58))


@pytest.mark.parametrize("normalisation", ["sigmoid", "softmax"])
def test_balanced_attention_can_still_move_all_mass_to_one_magnification(normalisation):
    net = _zero_network(normalisation, balance=True)
    with torch.no_grad():
        net.heads[0].bias.fill_(-30.0)
        net.heads[1].bias.fill_(-30.0)
        net.heads[2].bias.fill_(30.0)
    _, probs = net(torch.randn(1, 4, FEAT_H, FEAT_W), BACH_SHAPES)
    assert float(probs.detach()[0, 16:].sum()) > 0.999


def test_attention_dropout_zeroes_about_rate_renormalises_and_keeps_zeros():
    gen = torch.Generator().manual_seed(0)
    probs = torch.rand(64, 400, generator=gen)
    probs[:, :100] = 0.0  # already invalid: must stay zero
    probs = probs / probs.sum(-1, keepdim=True)
    out = attention_dropout(probs, 0.3, keep_at_least=5, generator=gen)
    torch.testing.assert_close(out.sum(-1), torch.ones(64))
    assert torch.all(out[:, :100] == 0)
    alive = out[:, 100:] > 0
    dropped = 1.0 - alive.float().mean()
    assert abs(float(dropped) - 0.3) < 0.02
    # Surviving cells keep their relative weights: out is P restricted to them, renormalised.
    kept = probs * (out > 0)
    torch.testing.assert_close(out, kept / kept.sum(-1, keepdim=True))


@pytest.mark.parametrize("keep", [1, 3, 5])
def test_attention_dropout_keeps_at_least_keep_cells_even_at_rate_one(keep):
    gen = torch.Generator().manual_seed(3)
    probs = torch.softmax(torch.randn(32, 20, generator=gen), -1)
    out = attention_dropout(probs, 0.999, keep_at_least=keep, generator=gen)
    n_alive = (out > 0).sum(-1)
    assert torch.all(n_alive >= keep)
    torch.testing.assert_close(out.sum(-1), torch.ones(32))
    # Rows with fewer valid cells than keep_at_least keep all they had.
    few = torch.zeros(1, 20)
    few[0, [2, 7]] = torch.tensor([0.25, 0.75])
    out_few = attention_dropout(few, 0.999, keep_at_least=5, generator=gen)
    torch.testing.assert_close(out_few, few)


def test_attention_dropout_at_rate_zero_is_the_identity():
    probs = torch.softmax(torch.randn(2, 10), -1)
    assert attention_dropout(probs, 0.0, keep_at_least=3) is probs


@pytest.mark.parametrize("n", [1, 7, 58])
def test_entropy_regulariser_is_minus_log_n_for_uniform_and_zero_for_one_hot(n):
    uniform = torch.full((2, n), 1.0 / n)
    torch.testing.assert_close(entropy_regulariser(uniform), torch.full((2,), -math.log(n)))
    one_hot = torch.zeros(2, n)
    one_hot[:, n - 1] = 1.0
    assert torch.all(entropy_regulariser(one_hot) == 0.0)


def test_entropy_regulariser_ignores_zero_cells_and_has_finite_gradients():
    p = torch.tensor([[0.5, 0.5, 0.0, 0.0]], requires_grad=True)
    r = entropy_regulariser(p)
    torch.testing.assert_close(r, torch.tensor([math.log(0.5)]))
    r.sum().backward()
    assert torch.all(torch.isfinite(p.grad))


@pytest.mark.parametrize("shapes", [((2, 2), (4, 3), (7, 6)), ((1, 1), (40, 25), (3, 90))])
def test_logits_equal_the_paper_order_pool_then_convolve(shapes):
    torch.manual_seed(0)
    net = AttentionNetwork(in_channels=6, n_magnifications=3).double()
    for head in net.heads:
        torch.nn.init.normal_(head.weight)
        torch.nn.init.normal_(head.bias)
    features = torch.randn(2, 6, 8, 5, dtype=torch.float64)
    logits, _ = net(features, shapes)
    expected = torch.cat(
        [
            head(torch.nn.functional.adaptive_avg_pool2d(features, shape)).flatten(1)
            for head, shape in zip(net.heads, shapes, strict=True)
        ],
        dim=1,
    )
    torch.testing.assert_close(logits, expected, rtol=1e-12, atol=1e-12)
