"""Sampling cells from the attention distribution and the unbiased Monte-Carlo estimators of Σ P f.

The model needs ``E_P[f] = Σ_i P_i f(x_i)`` but reads only k cells. Both estimators below return a value whose
expectation over the draws is exactly that sum, and whose Jacobian with respect to the attention (along the
simplex, i.e. through the logits) and to the features has expectation equal to the exact one, so that the
attention network learns from the patches it sampled (Katharopoulos & Fleuret, ICML 2019).

* With replacement: the mean of ``f_s · P_s / stopgrad(P_s)``.
* Without replacement (draws in Gumbel-top-k order): per draw t, ``e_t = Σ_{u<t} P_u f_u + pm_t f_t`` with
  ``pm_t = 1 − Σ_{u<t} P_u``; the value is the mean of the ``e_t``. Differentiating ``e_t`` alone is biased
  because the draw distribution depends on P; we add the score-function term of the draws up to t
  (``e_t · ∇ log q(s_≤t)``, causal, so later draws add no variance), which makes the gradient exact in
  expectation.

Both also accept draws from a *proposal* q ≠ P (:func:`proposal`: the attention mixed with a uniform over the cells
it can draw, so that rare cells are still read while the attention knows nothing). Each draw is then weighted by
P/q, with q held constant: with replacement ``f_s · P_s / q_s``; without replacement (successive draws from q)
``e_t = Σ_{u<t} P_u f_u + P_t f_t · qm_t / q_t`` with ``qm_t = 1 − Σ_{u<t} q_u``. For any fixed q whose support
covers P's, the expectation over the draws is Σ P f for every value of the parameters, so differentiating
through P and f alone gives the exact gradient in expectation (no score term is needed).
"""

from __future__ import annotations

import torch
from torch import Tensor


def sample_cells(probs: Tensor, k: int, replace: bool, generator: torch.Generator | None = None) -> Tensor:
    """Draw k cell indices per row of ``probs`` (B, N); without replacement they come in draw order.

    Without replacement uses Gumbel-top-k on log P, whose sorted order is distributed exactly as successive
    sampling. Rows with fewer than k cells of nonzero probability repeat the last valid draw; those extra draws
    carry no weight in :func:`expectation_without_replacement`.
    """
    if k < 1:
        raise ValueError(f"k must be at least 1, got {k}")
    probs = probs.detach()
    if replace:
        return torch.multinomial(probs, k, replacement=True, generator=generator)
    idx = torch.topk(gumbel_keys(probs, generator), min(k, probs.shape[-1]), dim=-1).indices
    return first_draws(idx, probs, k)


def gumbel_keys(probs: Tensor, generator: torch.Generator | None = None) -> Tensor:
    """``log P + Gumbel noise`` per cell (−inf where P = 0), from one ``torch.rand`` of ``probs``' shape: sorted in
    decreasing order, the cells come in the order of successive sampling without replacement from P."""
    probs = probs.detach()
    uniform = torch.rand(probs.shape, generator=generator, device=probs.device, dtype=probs.dtype)
    gumbel = -torch.log(-torch.log(uniform.clamp_min(torch.finfo(probs.dtype).tiny)))
    return torch.where(probs > 0, torch.log(probs) + gumbel, torch.full_like(probs, -torch.inf))


def first_draws(idx: Tensor, probs: Tensor, k: int) -> Tensor:
    """The first k draws of a draw order ``idx`` (B, ≥ min(k, N)) as :func:`sample_cells` returns them: draws past
    a row's cells of nonzero probability repeat its last valid draw."""
    idx = idx[:, :k]
    if idx.shape[-1] < k:
        idx = torch.cat([idx, idx[:, -1:].expand(-1, k - idx.shape[-1])], dim=-1)
    # Draws that fell on zero-probability cells (row exhausted): point them at the last valid draw.
    n_valid = (probs > 0).sum(-1, keepdim=True).clamp_min(1)
    pos = torch.arange(k, device=probs.device).expand_as(idx)
    last_valid = idx.gather(-1, (n_valid - 1).clamp_max(k - 1))
    return torch.where(pos < n_valid, idx, last_valid)


def proposal(probs: Tensor, uniform_mix: float) -> Tensor:
    """The distribution to draw from: ``(1 − ε)·P + ε·uniform`` over each row's drawable cells (P > 0), detached.

    ε = ``uniform_mix``; 0 gives P itself. Every cell P can draw keeps at least ε / n_cells of the draws.
    """
    if not 0.0 <= uniform_mix <= 1.0:
        raise ValueError(f"uniform_mix must be in [0, 1], got {uniform_mix}")
    probs = probs.detach()
    if uniform_mix == 0.0:
        return probs
    alive = (probs > 0).to(probs.dtype)
    uniform = alive / alive.sum(-1, keepdim=True).clamp_min(1.0)
    return (1.0 - uniform_mix) * probs + uniform_mix * uniform


def expectation_with_replacement(p: Tensor, f: Tensor, q: Tensor | None = None) -> Tensor:
    """Unbiased estimate of Σ P f from i.i.d. draws: p (B, k) sampled probabilities, f (B, k, D) features;
    ``q`` (B, k) the proposal's probabilities of the draws when they were drawn from one (default: P)."""
    w = p / (p.detach() if q is None else q.detach())
    return (w.unsqueeze(-1) * f).mean(dim=1)


def expectation_without_replacement(
    p: Tensor, f: Tensor, p_valid: Tensor | None = None, q: Tensor | None = None
) -> Tensor:
    """Unbiased estimate of Σ P f from draws without replacement, in draw order.

    ``p`` (B, k) are the probabilities of the drawn cells in draw order, ``f`` (B, k, D) their features, ``q``
    (B, k) the proposal's probabilities of the draws when they were drawn from one (default: P). Draws after a
    row's probability mass is exhausted (fewer nonzero cells than k) must be flagged False in ``p_valid``; they
    then contribute the exact sum of the earlier draws.
    """
    if p_valid is None:
        p_valid = torch.ones_like(p, dtype=torch.bool)
    p = torch.where(p_valid, p, torch.zeros_like(p))
    if q is not None:
        return _importance_without_replacement(p, f, p_valid, q.detach())
    e, pm = _draw_estimates(p, f, p_valid)
    # Score function of the draws up to t: log q_u = log P_u − log pm_u, cumulated (causal).
    safe_p = torch.where(p_valid, p, torch.ones_like(p))
    safe_pm = torch.where(p_valid, pm, torch.ones_like(pm)).clamp_min(torch.finfo(p.dtype).tiny)
    log_q = torch.where(p_valid, torch.log(safe_p) - torch.log(safe_pm), torch.zeros_like(p))
    score = torch.cumsum(log_q, dim=1)
    score = score - score.detach()  # value 0, gradient ∇ log q(s_≤t)
    surrogate = e + e.detach() * score.unsqueeze(-1)
    return surrogate.mean(dim=1)


def draw_estimates(p: Tensor, f: Tensor, p_valid: Tensor | None = None) -> Tensor:
    """Each draw's own estimate ``e_t = Σ_{u<t} P_u f_u + pm_t f_t`` (B, T, D), values only (for inference), of
    draws without replacement in draw order (arguments as :func:`expectation_without_replacement`, whose value is
    their mean). Given the draws before t, e_t's expectation over draw t is exactly Σ P f (draw t comes from P
    renormalised over the cells not drawn yet): every e_t is unbiased, however many draws came before it."""
    if p_valid is None:
        p_valid = torch.ones_like(p, dtype=torch.bool)
    p = torch.where(p_valid, p, torch.zeros_like(p))
    return _draw_estimates(p, f, p_valid)[0]


def _draw_estimates(p: Tensor, f: Tensor, p_valid: Tensor) -> tuple[Tensor, Tensor]:
    """(e_t (B, T, D), pm_t (B, T)) of draws whose invalid ones already carry P = 0."""
    before = torch.cumsum(p, dim=1) - p  # Σ_{u<t} P_u, exclusive
    pm = (1.0 - before).clamp_min(0.0)
    weighted_before = torch.cumsum(p.unsqueeze(-1) * f, dim=1) - p.unsqueeze(-1) * f
    mask = p_valid.unsqueeze(-1)
    e = weighted_before + torch.where(mask, pm.unsqueeze(-1) * f, torch.zeros_like(f))  # (B, T, D)
    return e, pm


def _importance_without_replacement(p: Tensor, f: Tensor, p_valid: Tensor, q: Tensor) -> Tensor:
    """Mean over t of ``Σ_{u<t} P_u f_u + P_t f_t · qm_t / q_t`` for draws from the fixed proposal q."""
    q = torch.where(p_valid, q, torch.zeros_like(q))
    qm = (1.0 - (torch.cumsum(q, dim=1) - q)).clamp_min(0.0)
    weight = torch.where(p_valid, qm / torch.where(p_valid, q, torch.ones_like(q)), torch.zeros_like(q))
    pf = p.unsqueeze(-1) * f
    e = torch.cumsum(pf, dim=1) - pf + (weight.unsqueeze(-1) * pf)
    return e.mean(dim=1)


def exact_expectation(probs: Tensor, f: Tensor) -> Tensor:
    """The exact Σ_i P_i f_i over all cells: probs (B, N), f (B, N, D)."""
    return torch.einsum("bn,bnd->bd", probs, f)
