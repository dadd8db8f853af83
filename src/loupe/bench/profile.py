"""Where the time of one training step and one inference of the joint model goes.

Parts: slide reading (patches through the cell reader, thumbnails and valid cells through the catalog), the
thumbnail backbone h and the patch backbone f (forward and backward), sampling/attention (the rest of the model's
forward and backward: attention network, sampling, estimator, classifier) and everything else (loss, optimiser,
Lightning, data-loader glue). Forward parts are timed by module hooks; a backbone's backward runs from the moment
the gradient reaches its output (backward pre-hook) to the last gradient accumulated into its parameters. The
device is synced at every boundary, so the profile is slower than the timed runs; its shares are what matters.
"""

from __future__ import annotations

import functools
import time
from collections.abc import Callable
from contextlib import contextmanager

import lightning as L
import torch
from torch import nn

from loupe.bench.speed import Workload, device_of, make_module, train_loader, trainer_for, warm_slides
from loupe.bench.timing import sync
from loupe.config import Config
from loupe.data.loading import CellReader
from loupe.workflows.common import infer, make_catalog

PARTS = ("slide_reading", "thumbnail_backbone", "patch_backbone", "sampling_attention", "other")


class PartClock:
    """Accumulates seconds per part; every reading syncs the device first."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.seconds: dict[str, float] = {}
        self._marks: dict[str, float] = {}

    def now(self) -> float:
        sync(self.device)
        return time.perf_counter()

    def add(self, name: str, seconds: float) -> None:
        self.seconds[name] = self.seconds.get(name, 0.0) + seconds

    def mark(self, name: str) -> None:
        self._marks[name] = self.now()

    def since(self, name: str) -> float:
        return self.now() - self._marks.pop(name)

    def reset(self) -> None:
        self.seconds = {}
        self._marks = {}


def _timed(clock: PartClock, name: str, fn: Callable) -> Callable:
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        start = clock.now()
        try:
            return fn(*args, **kwargs)
        finally:
            clock.add(name, clock.now() - start)

    return wrapper


def _hook_forward(module: nn.Module, clock: PartClock, name: str) -> list:
    starts: list[float] = []

    def pre(mod, args):
        starts.append(clock.now())

    def post(mod, args, out):
        clock.add(name, clock.now() - starts.pop())

    return [module.register_forward_pre_hook(pre), module.register_forward_hook(post)]


class _Backbone:
    """Times the calls of one backbone method (forward, or feature_map for h) and its backward: from the first
    gradient at its outputs to the last gradient accumulated into its parameters."""

    def __init__(self, net: nn.Module, method: str, clock: PartClock, name: str, backward: bool) -> None:
        self.net, self.method, self.clock, self.name = net, method, clock, name
        self.state: dict[str, float] = {}
        inner = getattr(net, method)

        def call(*args, **kwargs):
            start = clock.now()
            out = inner(*args, **kwargs)
            clock.add(f"{name}_forward", clock.now() - start)
            if backward and out.requires_grad:
                out.register_hook(self._grad_reached)
            return out

        setattr(net, method, call)  # an instance attribute shadows the class's method until removed
        self.handles = [p.register_post_accumulate_grad_hook(self._accumulated) for p in net.parameters() if backward]

    def _grad_reached(self, grad):
        self.state.setdefault("start", self.clock.now())

    def _accumulated(self, param) -> None:
        self.state["end"] = self.clock.now()

    def close_step(self) -> None:
        """Book this step's backward time (called after the step's backward)."""
        if "start" in self.state and "end" in self.state:
            self.clock.add(f"{self.name}_backward", self.state["end"] - self.state["start"])
        self.state.clear()

    def remove(self) -> None:
        delattr(self.net, self.method)
        for h in self.handles:
            h.remove()


@contextmanager
def instrumented(module, catalog, clock: PartClock, training: bool):
    """Hook the model's parts and wrap the catalog's thumbnail reads (and in training the module's cell reader;
    :func:`infer` attaches a reader of its own, whose ``seconds`` the caller reads) for the duration."""
    model = module.model
    handles = _hook_forward(model, clock, "model_forward")
    nets = [
        _Backbone(model.thumbnail_net, "feature_map", clock, "thumbnail", training),
        _Backbone(model.patch_net, "forward", clock, "patch", training),
    ]
    reader = module.cell_reader
    if training:
        module.cell_reader = _timed(clock, "patch_reading", reader)
    saved = {name: getattr(catalog, name) for name in ("thumbnail", "valid")}
    for name, fn in saved.items():
        setattr(catalog, name, _timed(clock, "thumbnail_loading", fn))
    try:
        yield [net.close_step for net in nets]
    finally:
        for h in handles:
            h.remove()
        for net in nets:
            net.remove()
        module.cell_reader = reader
        for name in saved:
            delattr(catalog, name)


def breakdown(s: dict[str, float], total: float, n: int) -> dict:
    """The five parts (ms per step or image) from accumulated part seconds, ``total`` seconds over ``n`` units."""
    reading = s.get("patch_reading", 0.0) + s.get("thumbnail_loading", 0.0)
    h = s.get("thumbnail_forward", 0.0) + s.get("thumbnail_backward", 0.0)
    f = s.get("patch_forward", 0.0) + s.get("patch_backward", 0.0)
    rest_forward = s.get("model_forward", 0.0) - s.get("thumbnail_forward", 0.0) - s.get("patch_forward", 0.0)
    rest_forward -= s.get("patch_reading", 0.0)  # patches are read inside the model's forward
    rest_backward = s.get("backward", 0.0) - s.get("thumbnail_backward", 0.0) - s.get("patch_backward", 0.0)
    parts = {
        "slide_reading": reading,
        "thumbnail_backbone": h,
        "patch_backbone": f,
        "sampling_attention": rest_forward + rest_backward,
    }
    parts["other"] = total - sum(parts.values())
    ms = {k: 1000 * v / n for k, v in parts.items()}
    return {
        "parts_ms": ms,
        "total_ms": 1000 * total / n,
        "shares": {k: v / (1000 * total / n) for k, v in ms.items()},
        "detail_ms": {k: 1000 * v / n for k, v in sorted(s.items())},
    }


class _StepProfiler(L.Callback):
    """Accumulates parts over the training steps after ``warmup`` steps; total = step end to step end."""

    def __init__(self, clock: PartClock, closers: list, warmup: int) -> None:
        self.clock, self.closers, self.warmup = clock, closers, warmup
        self.steps = 0
        self.total = 0.0
        self._last = 0.0

    def on_train_epoch_start(self, trainer, pl_module) -> None:
        self._last = self.clock.now()

    def on_before_backward(self, trainer, pl_module, loss) -> None:
        self.clock.mark("backward")

    def on_after_backward(self, trainer, pl_module) -> None:
        self.clock.add("backward", self.clock.since("backward"))
        for close in self.closers:
            close()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        end = self.clock.now()
        self.steps += 1
        if self.steps == self.warmup:
            self.clock.reset()
        elif self.steps > self.warmup:
            self.total += end - self._last
        self._last = end


def profile_training_step(cfg: Config, work: Workload, steps: int = 3, warmup: int = 2) -> dict:
    """The parts of a training step of ``cfg``'s joint model, averaged over ``steps`` steps after warm-up."""
    catalog = make_catalog(list(work.records), cfg)
    warm_slides(catalog, work.train)
    module = make_module(cfg, work.n_classes)
    module.cell_reader = reader = CellReader(catalog, cfg.data.read_threads)
    clock = PartClock(device_of(cfg))
    loader = train_loader(cfg, catalog, work)
    epochs = -(-(steps + warmup) // len(loader))
    try:
        with instrumented(module, catalog, clock, training=True) as closers:
            prof = _StepProfiler(clock, closers, warmup)
            trainer_for(cfg, epochs, [prof], max_steps=steps + warmup).fit(module, loader)
    finally:
        reader.close()
        catalog.close()
    out = breakdown(clock.seconds, prof.total, prof.steps - warmup)
    return out | {"unit": "training step", "steps": prof.steps - warmup, "batch_size": cfg.data.batch_size}


def profile_inference(cfg: Config, work: Workload, mode: str = "sample", warmup: int = 1) -> dict:
    """The parts of :func:`infer` per image with pooling ``mode``, one timed pass over the test images."""
    catalog = make_catalog(list(work.records), cfg)
    warm_slides(catalog, work.test)
    module = make_module(cfg, work.n_classes).to(device_of(cfg))
    clock = PartClock(device_of(cfg))
    test = list(work.test)
    try:
        for _ in range(warmup):
            infer(module, catalog, test, cfg, mode, 1)
        with instrumented(module, catalog, clock, training=False):
            start = clock.now()
            infer(module, catalog, test, cfg, mode, 1)
            total = clock.now() - start
            clock.add("patch_reading", module.cell_reader.seconds)  # the reader this infer attached
    finally:
        catalog.close()
    return breakdown(clock.seconds, total, len(test)) | {"unit": "image", "mode": mode, "images": len(test)}
