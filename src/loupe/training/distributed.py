"""What a training process does with the other processes of a data-parallel (DDP) run: gathering per-slide rows
from every rank, and averaging gradients once per optimiser step (which process this is: :mod:`loupe.ranks`).
Both are the identity in a run of one process, so the single-device path is the same code."""

from __future__ import annotations

from collections.abc import Iterable

import torch
import torch.distributed as dist
from torch import Tensor

from loupe.ranks import world


def gather_rows(rows: Tensor) -> Tensor:
    """``rows`` (n, ...) of every rank concatenated in rank order (ranks may hold different n): the whole
    validation set from each rank's shard. Sizes are exchanged first and rows padded to the largest, because a
    collective needs equal shapes."""
    size, _ = world()
    if size == 1:
        return rows
    n = torch.tensor([rows.shape[0]], device=rows.device)
    counts = [torch.zeros_like(n) for _ in range(size)]
    dist.all_gather(counts, n)
    longest = int(max(int(c) for c in counts))
    padded = rows.new_zeros((longest, *rows.shape[1:]))
    padded[: rows.shape[0]] = rows
    parts = [torch.empty_like(padded) for _ in range(size)]
    dist.all_gather(parts, padded.contiguous())
    return torch.cat([p[: int(c)] for p, c in zip(parts, counts, strict=True)])


def average_gradients(params: Iterable[torch.nn.Parameter]) -> None:
    """Replace each trainable parameter's gradient with its mean over the ranks, in one collective.

    For models trained with manual optimisation (slides back-propagated one at a time and accumulated): the
    ranks synchronise once per optimiser step, not once per slide, whatever the model does inside its backward.
    A parameter that no rank gave a gradient keeps none (Adam then leaves it alone, as in one process); one
    that only some ranks did counts zero on the others."""
    size, _ = world()
    trainable = [p for p in params if p.requires_grad]
    if size == 1 or not trainable:
        return
    device = trainable[0].device
    dtype = trainable[0].dtype
    has = torch.tensor([p.grad is not None for p in trainable], dtype=dtype, device=device)
    flat = torch.cat([(p.grad if p.grad is not None else torch.zeros_like(p)).reshape(-1).to(dtype) for p in trainable])
    dist.all_reduce(has)
    dist.all_reduce(flat)
    flat /= size
    offset = 0
    for p, any_grad in zip(trainable, has.tolist(), strict=True):
        n = p.numel()
        p.grad = flat[offset : offset + n].view_as(p).to(p.dtype).clone() if any_grad else None
        offset += n
