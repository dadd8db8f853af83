"""The collectives of :mod:`loupe.training.distributed` in a real gloo group: run under ``torchrun
--nproc-per-node 2``; each rank writes what it got to ``OUT/rank{r}.json`` (checked by test_distributed.py).

Usage: python ddp_collectives.py OUT
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch
import torch.distributed as dist

from loupe.ranks import world
from loupe.training.distributed import average_gradients, gather_rows


def main(out: str) -> None:
    dist.init_process_group("gloo")
    try:
        size, rank = world()
        rows = torch.arange(3 * (rank + 1), dtype=torch.float64).view(-1, 3) + 100 * rank  # 1 row, then 2 rows
        gathered = gather_rows(rows)
        lin = torch.nn.Linear(2, 1)
        unused = torch.nn.Parameter(torch.zeros(2))
        lin.weight.grad = torch.full_like(lin.weight, float(rank + 1))  # 1 and 2: mean 1.5
        lin.bias.grad = torch.ones_like(lin.bias) if rank == 0 else None  # only rank 0: mean 0.5
        average_gradients([*lin.parameters(), unused])
        result = {
            "world": [size, rank],
            "gathered": gathered.tolist(),
            "weight_grad": lin.weight.grad.tolist(),
            "bias_grad": None if lin.bias.grad is None else lin.bias.grad.tolist(),
            "unused_grad": None if unused.grad is None else unused.grad.tolist(),
        }
        Path(out, f"rank{rank}.json").write_text(json.dumps(result))
    finally:
        dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1])
