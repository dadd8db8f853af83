"""Starting N prediction workers on this machine (``loupe predict --workers N``) and waiting for them.

Each worker is a fresh process (``spawn``: no state copied from this one, CUDA safe) running the same function a
single ``loupe predict`` runs; they coordinate only through the output folder, exactly as N commands started by
hand or N jobs of a scheduler array would. With several GPUs visible, worker i sees only GPU i mod count
(``CUDA_VISIBLE_DEVICES``), so each runs on its own GPU. A worker that dies (killed, out of memory) is reported;
the slides it held are taken over by the others (same machine: at once) or by a re-run.
"""

from __future__ import annotations

import logging
import multiprocessing
import os
import signal
import sys
import time
import warnings
from collections.abc import Callable, Sequence
from typing import TypeVar

log = logging.getLogger("loupe")

#: What a worker is given: a picklable value (``spawn`` sends it to the new process), e.g. a frozen dataclass.
Task = TypeVar("Task")

#: Seconds the workers get to stop by themselves (finishing a write, releasing their claims) when interrupted.
STOP_GRACE_S = 10.0


def visible_gpus() -> list[str]:
    """The GPUs this process may use, as ``CUDA_VISIBLE_DEVICES`` names them (empty without CUDA)."""
    listed = os.environ.get("CUDA_VISIBLE_DEVICES")
    if listed is not None:
        return [d.strip() for d in listed.split(",") if d.strip() and d.strip() != "-1"]
    import torch

    return [str(i) for i in range(torch.cuda.device_count())] if torch.cuda.is_available() else []


def _entry(target: Callable[[Task], object], task: Task, index: int, count: int, gpu: str | None, level: int) -> None:
    """What a worker process runs: its console and GPU first, then ``target(task)``."""
    if gpu is not None:
        os.environ["CUDA_VISIBLE_DEVICES"] = gpu  # before anything initialises CUDA in this process
    # Stopped (SIGTERM) as when interrupted: the claims held are released on the way out, for the others.
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter(f"loupe: [worker {index + 1}/{count}] %(message)s"))
    logger = logging.getLogger("loupe")
    logger.handlers = [handler]
    logger.setLevel(level)
    logger.propagate = False
    for category in (DeprecationWarning, FutureWarning, PendingDeprecationWarning):
        warnings.filterwarnings("ignore", category=category)
    target(task)


def run_workers(target: Callable[[Task], object], tasks: Sequence[Task], *, gpus: Sequence[str] = ()) -> list[int]:
    """Run ``target(tasks[i])`` in one process per task, at once, and wait for all; returns their exit codes
    (0: finished; negative: killed by that signal). ``target`` must be a module-level function and each task
    picklable. ``gpus``: the GPUs to deal out, one per worker in turn."""
    context = multiprocessing.get_context("spawn")
    level = log.getEffectiveLevel()
    count = len(tasks)
    processes = []
    for i, task in enumerate(tasks):
        gpu = gpus[i % len(gpus)] if len(gpus) > 1 else None
        p = context.Process(target=_entry, args=(target, task, i, count, gpu, level), name=f"loupe-worker-{i + 1}")
        p.start()
        log.info("worker %d/%d started (pid %d%s)", i + 1, count, p.pid, f", GPU {gpu}" if gpu else "")
        processes.append(p)
    try:
        for p in processes:
            p.join()
    except BaseException:  # interrupted: the workers stop too (they release their claims on the way out)
        deadline = time.monotonic() + STOP_GRACE_S  # Ctrl-C reached them too: let them finish stopping
        for p in processes:
            p.join(max(0.0, deadline - time.monotonic()))
        for p in processes:
            if p.is_alive():
                p.terminate()
        for p in processes:
            p.join()
        raise
    codes = [int(p.exitcode if p.exitcode is not None else -1) for p in processes]
    for i, code in enumerate(codes):
        if code != 0:
            log.error("worker %d/%d ended with exit status %d: a re-run finishes its slides", i + 1, count, code)
    return codes
