import torch

from loupe.models.gated_attention import GatedAttention


def test_weights_are_a_distribution_over_kept_instances():
    torch.manual_seed(0)
    head = GatedAttention(8, hidden=4)
    h = torch.randn(2, 5, 8)
    mask = torch.tensor([[True, True, False, True, False], [True] * 5])
    pooled, w = head(h, mask)
    assert torch.allclose(w.sum(-1), torch.ones(2))
    assert (w[0, ~mask[0]] == 0).all() and (w[0, mask[0]] > 0).all()
    assert torch.allclose(pooled, torch.einsum("bn,bnd->bd", w, h))


def test_matches_the_gated_formula():
    torch.manual_seed(1)
    head = GatedAttention(6, hidden=3)
    h = torch.randn(1, 4, 6)
    v = torch.tanh(head.value[0](h))
    u = torch.sigmoid(head.gate[0](h))
    expected = torch.softmax(head.score(v * u).squeeze(-1), -1)
    assert torch.allclose(head(h)[1], expected)


def test_an_empty_bag_gives_zeros_and_finite_gradients():
    head = GatedAttention(4, hidden=2)
    h = torch.randn(1, 3, 4, requires_grad=True)
    pooled, w = head(h, torch.zeros(1, 3, dtype=torch.bool))
    assert (w == 0).all() and (pooled == 0).all()
    pooled.sum().backward()
    assert torch.isfinite(h.grad).all()
