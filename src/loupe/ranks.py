"""Which process of a run this is: the number of processes and this one's rank once a process group exists, and
before that whether this is the run's first process, from the variables its launcher set (torchrun, Lightning,
SLURM, MPI). The command line, the data layer and training all ask it; it imports nothing of loupe."""

from __future__ import annotations

import os

import torch.distributed as dist

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
