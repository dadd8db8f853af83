"""What a training process needs to know and do about the other processes of a data-parallel (DDP) run: its rank,
gathering per-slide rows from every rank, and averaging gradients once per optimiser step. Every function is the
identity in a run of one process, so the single-device path is the same code."""

from __future__ import annotations

import os
from collections.abc import Iterable

import torch
import torch.distributed as dist
from torch import Tensor

#: Environment variables that carry a process's rank, by launcher: torchrun and Lightning (RANK, LOCAL_RANK,
#: NODE_RANK), SLURM, Open MPI, other MPIs.
_RANK_VARIABLES = ("RANK", "LOCAL_RANK", "NODE_RANK", "SLURM_PROCID", "OMPI_COMM_WORLD_RANK", "PMI_RANK")


def world() -> tuple[int, int]:
    """(number of processes, this one's rank) of the initialised process group; (1, 0) without one."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_world_size(), dist.get_rank()
    return 1, 0


def is_first_process() -> bool:
    """Whether this is the run's first process, as its launcher says, before any process group exists: the one
    that writes the run folder's files. (The first process of a one-node Lightning launch, which starts the
    others itself, has no variable at all.)"""
    return all(os.environ.get(name, "0").strip() in ("0", "") for name in _RANK_VARIABLES)


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
