"""The estimators are checked by exact enumeration over every draw sequence on tiny maps, not by sampling."""

from __future__ import annotations

import itertools

import pytest
import torch

from loupe.models.estimators import (
    exact_expectation,
    expectation_with_replacement,
    expectation_without_replacement,
    proposal,
    sample_cells,
)


@pytest.fixture(autouse=True)
def _float64():
    """Exact comparisons in float64, for this module's tests only (a module-level default leaked into every test
    collected after it, which then ran their convolutions in float64)."""
    before = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    yield
    torch.set_default_dtype(before)


def _normalise(z: torch.Tensor, kind: str) -> torch.Tensor:
    if kind == "softmax":
        return torch.softmax(z, dim=-1)
    s = torch.sigmoid(z)
    return s / s.sum(-1, keepdim=True)


def _sequences(n: int, k: int, replace: bool):
    if replace:
        return itertools.product(range(n), repeat=k)
    return itertools.permutations(range(n), k)


def _sequence_prob(probs: torch.Tensor, seq: tuple[int, ...], replace: bool) -> float:
    q, used = 1.0, 0.0
    for s in seq:
        q *= float(probs[s]) / (1.0 if replace else 1.0 - used)
        used += float(probs[s])
    return q


def _expected_value_and_grads(n: int, k: int, d: int, replace: bool, kind: str, seed: int, mix: float = 0.0):
    """Exact E[estimate], E[∂(v·estimate)/∂z], E[∂(v·estimate)/∂f], and the exact targets; with ``mix`` > 0 the
    draws come from the proposal (1 − mix)·P + mix·uniform and are weighted by P/q."""
    gen = torch.Generator().manual_seed(seed)
    z0 = torch.randn(n, generator=gen)
    f0 = torch.randn(n, d, generator=gen)
    v = torch.randn(d, generator=gen)
    probs0 = _normalise(z0, kind).detach()
    q0 = proposal(probs0.unsqueeze(0), mix)[0] if mix > 0 else None

    ev = torch.zeros(d)
    egz = torch.zeros(n)
    egf = torch.zeros(n, d)
    total_q = 0.0
    for seq in _sequences(n, k, replace):
        q = _sequence_prob(probs0 if q0 is None else q0, seq, replace)
        total_q += q
        z = z0.clone().requires_grad_(True)
        f = f0.clone().requires_grad_(True)
        probs = _normalise(z, kind)
        idx = torch.tensor(seq)
        p_s, f_s = probs[idx].unsqueeze(0), f[idx].unsqueeze(0)
        q_s = None if q0 is None else q0[idx].unsqueeze(0)
        if replace:
            est = expectation_with_replacement(p_s, f_s, q=q_s)[0]
        else:
            est = expectation_without_replacement(p_s, f_s, q=q_s)[0]
        gz, gf = torch.autograd.grad(est @ v, (z, f))
        ev += q * est.detach()
        egz += q * gz
        egf += q * gf

    z = z0.clone().requires_grad_(True)
    f = f0.clone().requires_grad_(True)
    exact = exact_expectation(_normalise(z, kind).unsqueeze(0), f.unsqueeze(0))[0]
    tz, tf = torch.autograd.grad(exact @ v, (z, f))
    return total_q, (ev, egz, egf), (exact.detach(), tz, tf)


@pytest.mark.parametrize("replace", [True, False])
@pytest.mark.parametrize("kind", ["softmax", "sigmoid"])
@pytest.mark.parametrize(("n", "k"), [(4, 1), (4, 2), (5, 3), (4, 4)])
def test_estimator_value_and_gradients_are_unbiased_by_enumeration(replace, kind, n, k):
    total_q, (ev, egz, egf), (tv, tz, tf) = _expected_value_and_grads(n, k, 3, replace, kind, seed=n * 10 + k)
    assert total_q == pytest.approx(1.0, abs=1e-12)
    torch.testing.assert_close(ev, tv, atol=1e-12, rtol=1e-10)
    torch.testing.assert_close(egz, tz, atol=1e-12, rtol=1e-10)  # attention gradient, through the logits
    torch.testing.assert_close(egf, tf, atol=1e-12, rtol=1e-10)  # feature gradient


@pytest.mark.parametrize("replace", [True, False])
@pytest.mark.parametrize("kind", ["softmax", "sigmoid"])
@pytest.mark.parametrize(("n", "k"), [(4, 1), (4, 2), (5, 3), (4, 4)])
@pytest.mark.parametrize("mix", [0.3, 1.0])
def test_draws_from_a_uniform_mixed_proposal_stay_unbiased_by_enumeration(replace, kind, n, k, mix):
    total_q, (ev, egz, egf), (tv, tz, tf) = _expected_value_and_grads(n, k, 3, replace, kind, n * 7 + k, mix)
    assert total_q == pytest.approx(1.0, abs=1e-12)
    torch.testing.assert_close(ev, tv, atol=1e-12, rtol=1e-10)
    torch.testing.assert_close(egz, tz, atol=1e-12, rtol=1e-10)
    torch.testing.assert_close(egf, tf, atol=1e-12, rtol=1e-10)


def test_the_proposal_mixes_over_drawable_cells_only():
    probs = torch.tensor([[0.7, 0.3, 0.0, 0.0], [0.25, 0.25, 0.25, 0.25]])
    q = proposal(probs, 0.5)
    torch.testing.assert_close(q, torch.tensor([[0.6, 0.4, 0.0, 0.0], [0.25, 0.25, 0.25, 0.25]]))
    assert proposal(probs, 0.0) is not probs and torch.equal(proposal(probs, 0.0), probs)
    with pytest.raises(ValueError, match="uniform_mix"):
        proposal(probs, 1.5)


def test_exhausted_rows_under_a_proposal_give_the_exact_sum():
    probs = torch.tensor([[0.5, 0.3, 0.2, 0.0, 0.0]])
    q = proposal(probs, 0.6)
    idx = sample_cells(q, 5, replace=False, generator=torch.Generator().manual_seed(0))
    f = torch.randn(1, 5, 4)
    p_valid = torch.tensor([[True, True, True, False, False]])
    est = expectation_without_replacement(probs.gather(1, idx), f[:, idx[0]], p_valid, q=q.gather(1, idx))
    exact = exact_expectation(probs, f)
    s0, s1 = idx[0, :2].tolist()
    e0 = probs[0, s0] * f[0, s0] / q[0, s0]
    e1 = probs[0, s0] * f[0, s0] + probs[0, s1] * f[0, s1] * (1 - q[0, s0]) / q[0, s1]
    torch.testing.assert_close(est[0], (e0 + e1 + 3 * exact[0]) / 5)


def _reference_style_attention_grad(probs: torch.Tensor, f: torch.Tensor, seq, v: torch.Tensor) -> torch.Tensor:
    """The attention gradient of the reference TensorFlow code for sampling without replacement.

    Per draw t (0-based) it assigns ∂/∂P_{s_t} = (1/k)·v·[e_t·pm_t/P_t + Σ_{u<t} f_u − t·f_t].
    """
    k = len(seq)
    p = probs[list(seq)]
    fs = f[list(seq)]
    before = torch.cumsum(p, 0) - p
    pm = 1 - before
    e = torch.cumsum(p[:, None] * fs, 0) - p[:, None] * fs + pm[:, None] * fs
    g = torch.zeros_like(probs)
    for t, s in enumerate(seq):
        term = e[t] * pm[t] / p[t] + fs[:t].sum(0) - t * fs[t]
        g[s] += (term @ v) / k
    return g


def test_reference_without_replacement_gradient_is_biased_and_ours_is_not():
    n, k, d = 5, 3, 3
    gen = torch.Generator().manual_seed(7)
    z0 = torch.randn(n, generator=gen)
    f = torch.randn(n, d, generator=gen)
    v = torch.randn(d, generator=gen)
    z = z0.clone().requires_grad_(True)
    probs = torch.softmax(z, -1)
    jac = torch.autograd.functional.jacobian(lambda zz: torch.softmax(zz, -1), z0)  # dP/dz
    exact_grad_z = jac.T @ (f @ v)

    expected_ref_p = torch.zeros(n)
    for seq in itertools.permutations(range(n), k):
        q = _sequence_prob(probs.detach(), seq, replace=False)
        expected_ref_p += q * _reference_style_attention_grad(probs.detach(), f, seq, v)
    ref_grad_z = jac.T @ expected_ref_p
    bias = (ref_grad_z - exact_grad_z).abs().max()
    assert bias > 1e-2, "the reference-style gradient was expected to be biased on this map"

    _, (_, egz, _), (_, tz, _) = _expected_value_and_grads(n, k, d, False, "softmax", seed=7)
    torch.testing.assert_close(egz, tz, atol=1e-12, rtol=1e-10)


def test_exhausted_rows_give_the_exact_sum_after_the_mass_is_used():
    probs = torch.tensor([[0.5, 0.3, 0.2, 0.0, 0.0]])
    idx = sample_cells(probs, 5, replace=False, generator=torch.Generator().manual_seed(0))
    assert set(idx[0, :3].tolist()) == {0, 1, 2}
    assert idx[0, 3:].tolist() == [idx[0, 2].item()] * 2
    f = torch.randn(1, 5, 4)
    p_s = probs.gather(1, idx)[0]
    f_s = f[0, idx[0]]
    p_valid = torch.tensor([[True, True, True, False, False]])
    est = expectation_without_replacement(p_s[None], f_s[None], p_valid)[0]
    exact = exact_expectation(probs, f)[0]
    e0 = f_s[0]
    e1 = p_s[0] * f_s[0] + (1 - p_s[0]) * f_s[1]
    # The third draw takes the remaining mass exactly; the two exhausted draws repeat the exact sum.
    torch.testing.assert_close(est, (e0 + e1 + 3 * exact) / 5)


@pytest.mark.parametrize("replace", [True, False])
def test_sampler_matches_the_sequence_distribution(replace):
    probs = torch.tensor([0.5, 0.25, 0.15, 0.1])
    n_draws = 60_000
    idx = sample_cells(probs.expand(n_draws, -1).contiguous(), 2, replace, torch.Generator().manual_seed(1))
    counts: dict[tuple[int, int], int] = {}
    for a, b in idx.tolist():
        counts[(a, b)] = counts.get((a, b), 0) + 1
    for seq in _sequences(4, 2, replace):
        q = _sequence_prob(probs, seq, replace)
        freq = counts.get(seq, 0) / n_draws
        assert freq == pytest.approx(q, abs=4 * (q * (1 - q) / n_draws) ** 0.5 + 1e-3), seq
    if not replace:
        assert all(a != b for a, b in idx.tolist())


def test_sampler_never_draws_zero_probability_cells():
    probs = torch.tensor([[0.0, 0.6, 0.0, 0.4, 0.0, 0.0]]).expand(500, -1).contiguous()
    for replace in (True, False):
        idx = sample_cells(probs, 2, replace, torch.Generator().manual_seed(2))
        assert set(idx.unique().tolist()) <= {1, 3}
