"""Adaptive inference for the joint model: rounds of k cells, never a cell twice in a slide, until the top class's
Monte-Carlo standard error falls under ε or the patch budget is spent.

**The draws.** One Gumbel key per cell (:func:`~loupe.models.estimators.gumbel_keys`, the random numbers of today's
sampled inference); round 1 is exactly today's draw of k (the k largest keys), and each later round takes the k
largest keys among the cells not read yet. Sorted keys are successive sampling without replacement from P, so the
rounds together are one long draw without replacement in draw order, read k at a time.

**Each round's estimator.** Draw t of the whole sequence gives ``e_t = Σ_{u<t} P_u f_u + pm_t f_t`` with
``pm_t = 1 − Σ_{u<t} P_u`` (:func:`~loupe.models.estimators.draw_estimates`, the estimator of today's sampled
inference without replacement, continued over the earlier rounds' draws). Given every draw before t, draw t comes
from P renormalised over the unread cells, so ``E[e_t | draws before t] = Σ P f`` exactly. Round r's estimate
``E_r`` is the mean of its draws' ``e_t``; round 1's is today's sampled estimate.

**Stopping and combining.** After round r ≥ 2 the rounds' class probabilities ``g(E_j)`` give the top class's
Monte-Carlo standard error ``SE = std_j(p_j[top]) / √r`` (sample standard deviation; top: the class of the largest
mean probability). Stopping on the estimates themselves and averaging them would bias the mean (optional
stopping), so every round's weight is fixed *before* its draws: a round that is not the last weighs ``1/M``
(``M = budget // k``, the most rounds) and the last round takes what is left, ``1 − (its index − 1)/M``. Round
r + 1 is made the last when ``SE < ε`` after round r, or when it is round M (the budget). With weights known before
the draws they weigh, ``E[Σ_r w_r E_r] = Σ P f`` for any stopping rule: the combined estimate stays unbiased. (It
costs one round after ε is met.) When the budget is spent every round weighs 1/M: the mean of all M·k draws, today's
sampled estimate with k = budget. A slide whose tissue cells are all read before its last round ends with a round
that reads nothing: every one of its draws is past the cells, so ``e_t = Σ P f`` exactly. With M = 1 (budget = k)
the prediction is today's sampled inference, bit for bit (of a run sampling without replacement,
``joint.replace: false``; a run trained with replacement still draws without replacement here).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

from loupe.models.estimators import draw_estimates

#: Cells (n,) of one slide → their features (n, D).
SlideEmbedder = Callable[[Tensor], Tensor]


@dataclass(frozen=True)
class AdaptiveSlide:
    """One slide's adaptive inference."""

    estimate: Tensor  # (D,) the combined estimate of Σ P f
    cells: Tensor  # (n,) the cells read, in draw order (round 1 as sampled inference returns it)
    round_logits: Tensor  # (R, C) each round's logits alone (rounds that read patches)
    round_estimates: Tensor  # (R', D) each round's estimate (a last round that read nothing included)
    weights: tuple[float, ...]  # each round's weight in ``estimate``, in the order of ``round_estimates``
    patches_read: int


def standard_error(round_probs: Tensor) -> float:
    """The top class's Monte-Carlo standard error over rounds (R, C), R ≥ 2: the sample standard deviation of its
    probability over the rounds / √R (top: the largest mean probability)."""
    top = int(round_probs.mean(0).argmax())
    r = round_probs.shape[0]
    return float(round_probs[:, top].std(correction=1)) / r**0.5


def adaptive_slide(
    probs: Tensor,
    keys: Tensor,
    first: Tensor,
    first_features: Tensor,
    first_estimate: Tensor,
    embed: SlideEmbedder,
    classify: Callable[[Tensor], Tensor],
    k: int,
    epsilon: float,
    budget: int,
) -> AdaptiveSlide:
    """The rounds of one slide after round 1 (see the module docstring).

    ``probs`` (N,) the attention, ``keys`` (N,) its Gumbel keys, ``first`` (k,) round 1's cells as sampled
    inference draws them, ``first_features`` (k, D) their features, ``first_estimate`` (D,) round 1's estimate;
    ``embed`` reads and embeds cells of this slide, ``classify`` maps estimates (R, D) to logits (R, C).
    """
    if k < 1 or budget < k:
        raise ValueError(f"adaptive inference needs 1 ≤ k ≤ budget, got k={k}, budget={budget}")
    most = budget // k
    n_valid = int((probs > 0).sum())
    head = min(k, n_valid)  # round 1's distinct cells (later entries repeat its last one)
    cells, features = [first[:head]], [first_features[:head]]
    estimates, logits = [first_estimate], [classify(first_estimate.unsqueeze(0))[0]]
    if most == 1:
        return AdaptiveSlide(first_estimate, first, torch.stack(logits), first_estimate.unsqueeze(0), (1.0,), head)
    weights = [1.0 / most]
    read = head
    rounds = 1
    while True:
        if read >= n_valid:  # every tissue cell read: a last round of draws past them, each exactly Σ P f
            seen = torch.cat(cells)
            exact = (probs[seen].unsqueeze(-1) * torch.cat(features)).sum(0)
            estimates.append(exact.to(first_estimate.dtype))
            weights.append(1.0 - sum(weights))
            break
        round_probs = torch.softmax(torch.stack(logits).float(), -1)
        last = rounds + 1 == most or (rounds >= 2 and standard_error(round_probs) < epsilon)
        seen = torch.cat(cells)
        unread = keys.index_fill(0, seen, -torch.inf)
        new = torch.topk(unread, min(k, n_valid - read)).indices
        cells.append(new)
        features.append(embed(new))
        order, feats = torch.cat(cells), torch.cat(features)
        e = draw_estimates(probs[order].unsqueeze(0), feats.unsqueeze(0))[0]  # (read + len(new), D)
        estimate = e[read:].mean(0)
        estimates.append(estimate)
        logits.append(classify(estimate.unsqueeze(0))[0])
        read += len(new)
        rounds += 1
        if last:
            weights.append(1.0 - sum(weights))
            break
        weights.append(1.0 / most)
    combined = sum((w * est for w, est in zip(weights, estimates, strict=True)), torch.zeros_like(first_estimate))
    all_cells = torch.cat([first, *cells[1:]])
    return AdaptiveSlide(combined, all_cells, torch.stack(logits), torch.stack(estimates), tuple(weights), read)
