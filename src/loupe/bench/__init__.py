"""Timing harness behind `loupe bench`: the paper's speed tables, a profile of the joint model, and the
accuracy comparison with the baselines, all measured through the real training and inference code.

Names are imported on first use, so that ``loupe.bench.streaming`` (and processes it spawns) does not pay for
Lightning and the workflows.
"""

from __future__ import annotations

from typing import Any

__all__ = ["run_accuracy", "run_bench"]


def __getattr__(name: str) -> Any:
    if name in __all__:
        from loupe.bench import command

        return getattr(command, name)
    raise AttributeError(f"module 'loupe.bench' has no attribute {name!r}")
