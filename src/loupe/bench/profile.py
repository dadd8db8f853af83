"""Where the time of one training step and one inference of the joint model goes.

Parts: slide reading (patches through the pixel source, thumbnails and valid cells through the catalog), the
thumbnail backbone h and the patch backbone f (forward and backward), sampling/attention (the rest of the model's
forward and backward: attention network, sampling, estimator, classifier and, in training, the loss the model
computes) and everything else (optimiser, Lightning, data-loader glue). Forward parts are timed by module hooks; a
backbone's backward runs from the moment the gradient reaches its output (backward pre-hook) to the last gradient
accumulated into its parameters. The device is synced at every boundary, so the profile is slower than the timed
runs; its shares are what matters.
"""

from __future__ import annotations

import functools
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from typing import Any, ParamSpec, TypeVar

import lightning as L
import numpy as np
import torch
from torch import Tensor, nn
from torch.utils.hooks import RemovableHandle

from loupe.bench.speed import Workload, device_of, make_model, make_module, train_loader, trainer_for, warm_slides
from loupe.bench.timing import sync
from loupe.config import Config
from loupe.data.catalog import SlideCatalog
from loupe.models import InferenceSettings, JointAttentionSampler, PixelSource, SlideClassifier, WholeImage
from loupe.workflows.common import make_catalog
from loupe.workflows.inference import infer, make_pixels, runtime_of

PARTS = ("slide_reading", "thumbnail_backbone", "patch_backbone", "sampling_attention", "other")

P = ParamSpec("P")
R = TypeVar("R")


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


def _timed(clock: PartClock, name: str, fn: Callable[P, R]) -> Callable[P, R]:
    @functools.wraps(fn)
    def wrapper(*args: P.args, **kwargs: P.kwargs) -> R:
        start = clock.now()
        try:
            return fn(*args, **kwargs)
        finally:
            clock.add(name, clock.now() - start)

    return wrapper


class TimedPixels:
    """A pixel source whose reads (cells and whole images) are booked on ``clock`` as ``name``."""

    def __init__(self, pixels: PixelSource, clock: PartClock, name: str = "patch_reading") -> None:
        self.pixels, self.clock, self.name = pixels, clock, name
        self.embeddings = pixels.embeddings  # a frozen encoder's cached embeddings are still found

    def cells(self, slides: Sequence[int], cells: Tensor) -> Tensor:
        start = self.clock.now()
        try:
            return self.pixels.cells(slides, cells)
        finally:
            self.clock.add(self.name, self.clock.now() - start)

    def whole(self, slide: int, valid: np.ndarray | None) -> WholeImage:
        start = self.clock.now()
        try:
            return self.pixels.whole(slide, valid)
        finally:
            self.clock.add(self.name, self.clock.now() - start)


def _hook_forward(module: nn.Module, clock: PartClock, name: str) -> list[RemovableHandle]:
    starts: list[float] = []

    def pre(mod: nn.Module, args: tuple[Any, ...]) -> None:
        starts.append(clock.now())

    def post(mod: nn.Module, args: tuple[Any, ...], out: Any) -> None:
        clock.add(name, clock.now() - starts.pop())

    return [module.register_forward_pre_hook(pre), module.register_forward_hook(post)]


class _Backbone:
    """Times the calls of one backbone method (forward, or feature_map for h) and its backward: from the first
    gradient at its outputs to the last gradient accumulated into its parameters."""

    def __init__(self, net: nn.Module, method: str, clock: PartClock, name: str, backward: bool) -> None:
        self.net, self.method, self.clock, self.name = net, method, clock, name
        self.state: dict[str, float] = {}
        inner = getattr(net, method)

        def call(*args: Any, **kwargs: Any) -> Any:
            start = clock.now()
            out = inner(*args, **kwargs)
            clock.add(f"{name}_forward", clock.now() - start)
            if backward and out.requires_grad:
                out.register_hook(self._grad_reached)
            return out

        setattr(net, method, call)  # an instance attribute shadows the class's method until removed
        self.handles = [p.register_post_accumulate_grad_hook(self._accumulated) for p in net.parameters() if backward]

    def _grad_reached(self, grad: Tensor) -> None:
        self.state.setdefault("start", self.clock.now())

    def _accumulated(self, param: Tensor) -> None:
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


def _joint(model: SlideClassifier) -> JointAttentionSampler:
    if not isinstance(model, JointAttentionSampler):
        raise TypeError(f"the profile is of the joint model, got {type(model).__name__}")
    return model


@contextmanager
def instrumented(
    model: JointAttentionSampler, catalog: SlideCatalog, clock: PartClock, training: bool
) -> Iterator[list[Callable[[], None]]]:
    """Hook the model's parts and wrap the catalog's thumbnail reads for the duration (patch reads are timed by
    the pixel source: :class:`TimedPixels` in training, the source's own ``seconds`` in inference); yields the
    backbones' per-step backward bookers."""
    handles = _hook_forward(model, clock, "model_forward")
    nets = [
        _Backbone(model.thumbnail_net, "feature_map", clock, "thumbnail", training),
        _Backbone(model.patch_net, "forward", clock, "patch", training),
    ]
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
        for name in saved:
            delattr(catalog, name)


def breakdown(s: dict[str, float], total: float, n: int) -> dict[str, Any]:
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

    def __init__(self, clock: PartClock, closers: list[Callable[[], None]], warmup: int) -> None:
        self.clock, self.closers, self.warmup = clock, closers, warmup
        self.steps = 0
        self.total = 0.0
        self._last = 0.0

    def on_train_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._last = self.clock.now()

    def on_before_backward(self, trainer: L.Trainer, pl_module: L.LightningModule, loss: Tensor) -> None:
        self.clock.mark("backward")

    def on_after_backward(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.clock.add("backward", self.clock.since("backward"))
        for close in self.closers:
            close()

    def on_train_batch_end(
        self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        end = self.clock.now()
        self.steps += 1
        if self.steps == self.warmup:
            self.clock.reset()
        elif self.steps > self.warmup:
            self.total += end - self._last
        self._last = end


def profile_training_step(cfg: Config, work: Workload, *, steps: int = 3, warmup: int = 2) -> dict[str, Any]:
    """The parts of a training step of ``cfg``'s joint model, averaged over ``steps`` steps after warm-up."""
    catalog = make_catalog(list(work.records), cfg)
    warm_slides(catalog, work.train)
    clock = PartClock(device_of(cfg))
    pixels = make_pixels(catalog, cfg)
    module = make_module(cfg, work.n_classes, TimedPixels(pixels, clock))
    loader = train_loader(cfg, catalog, work)
    epochs = -(-(steps + warmup) // len(loader))
    try:
        with instrumented(_joint(module.model), catalog, clock, training=True) as closers:
            prof = _StepProfiler(clock, closers, warmup)
            trainer_for(cfg, epochs, [prof], max_steps=steps + warmup).fit(module, loader)
    finally:
        pixels.close()
        catalog.close()
    out = breakdown(clock.seconds, prof.total, prof.steps - warmup)
    return out | {"unit": "training step", "steps": prof.steps - warmup, "batch_size": cfg.data.batch_size}


def profile_inference(cfg: Config, work: Workload, *, mode: str = "sample", warmup: int = 1) -> dict[str, Any]:
    """The parts of :func:`infer` per image with pooling ``mode`` (one sample of ``joint.k``), one timed pass over
    the test images; patch reading is the time of the pixel source given to that pass."""
    catalog = make_catalog(list(work.records), cfg)
    warm_slides(catalog, work.test)
    runtime = runtime_of(cfg)
    model = make_model(cfg, work.n_classes)
    runtime.prepare(model)
    clock = PartClock(runtime.device)
    settings = InferenceSettings(mode, 1, cfg.joint.k)
    test = list(work.test)
    try:
        for _ in range(warmup):
            infer(model, catalog, test, cfg, settings, runtime=runtime)
        with instrumented(_joint(model), catalog, clock, training=False):
            pixels = make_pixels(catalog, cfg)
            start = clock.now()
            try:
                infer(model, catalog, test, cfg, settings, pixels=pixels, runtime=runtime)
            finally:
                pixels.close()
            total = clock.now() - start
            clock.add("patch_reading", pixels.seconds)
    finally:
        catalog.close()
    return breakdown(clock.seconds, total, len(test)) | {"unit": "image", "mode": mode, "images": len(test)}
