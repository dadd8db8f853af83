"""Timing primitives of the bench: device sync, medians, timed repeats after warm-up."""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable, Sequence

import torch


def sync(device: torch.device | str | None = None) -> None:
    """Wait for queued accelerator work, so that a wall-clock reading covers it (no-op on CPU)."""
    dev = torch.device(device) if device is not None else None
    if torch.cuda.is_available() and (dev is None or dev.type == "cuda"):
        torch.cuda.synchronize(dev)


def median(values: Sequence[float]) -> float:
    """The median of measured values (the bench's summary statistic: robust to one disturbed repeat)."""
    if not values:
        raise ValueError("no measurements to summarise")
    return float(statistics.median(values))


def timed_repeats(
    fn: Callable[[], object], repeats: int, warmup: int = 1, device: torch.device | str | None = None
) -> list[float]:
    """Seconds of ``repeats`` calls of ``fn`` after ``warmup`` untimed calls, the device synced around each."""
    if repeats < 1:
        raise ValueError(f"repeats must be at least 1, got {repeats}")
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        sync(device)
        start = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - start)
    return times
