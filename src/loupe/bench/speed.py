"""The paper's speed tables (Tables 5-6), measured through the real code paths.

Training: a Lightning ``Trainer.fit`` of :class:`SlideClassifierModule` over the real thumbnail loader and pixel
source, one epoch as warm-up, then the wall time of each further epoch (validation and checkpoints off: they are
not training). Inference: :func:`loupe.workflows.inference.infer`, the function behind evaluate and predict, per
image, after warm-up calls. Every figure is the median of its repeats.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import lightning as L
import numpy as np
import torch
from torch.utils.data import DataLoader

from loupe.bench.timing import median, sync, timed_repeats
from loupe.config import Config
from loupe.data.catalog import SlideCatalog
from loupe.data.loading import ThumbnailDataset, make_loader
from loupe.data.manifest import SlideRecord
from loupe.models import InferenceSettings, PixelSource, SlideClassifier, build_model
from loupe.models.runtime import resolve_device
from loupe.training.module import SlideClassifierModule
from loupe.training.trainer import build_trainer
from loupe.workflows.common import magnifications_of, make_catalog
from loupe.workflows.inference import infer, make_pixels, runtime_of

#: Where the bench reports its progress (one line per figure).
Log = Callable[[str], object]


def without_exploration(cfg: Config) -> Config:
    """The training step the paper times: one draw of k per slide, no novelty prior (loupe's defaults read
    ``joint.train_draws`` × k cells per slide and step)."""
    return dataclasses.replace(cfg, joint=dataclasses.replace(cfg.joint, train_draws=1, novelty=0.0))


@dataclass(frozen=True)
class Variant:
    """One model of the table: which of the config's magnifications it reads, k sampled patches or all."""

    name: str
    magnifications: tuple[int, ...]
    all_patches: bool

    def config(self, cfg: Config) -> Config:
        """``cfg`` (a joint model's) narrowed to this variant's magnifications, with the exact all-patches sum if
        asked."""
        labels = [m.label for m in magnifications_of(cfg)]
        model = dataclasses.replace(
            cfg.model,
            magnifications=[cfg.model.magnifications[j] for j in self.magnifications],
            magnification_labels=[labels[j] for j in self.magnifications],
        )
        joint = dataclasses.replace(cfg.joint, estimator="exhaustive" if self.all_patches else "sampled")
        return dataclasses.replace(cfg, model=model, joint=joint)

    @property
    def inference_mode(self) -> str:
        """One draw of k cells (the paper's inference), or every cell."""
        return "exhaustive" if self.all_patches else "sample"

    def inference(self, cfg: Config) -> InferenceSettings:
        """This variant's inference: :attr:`inference_mode`, one sample, ``cfg``'s k."""
        return InferenceSettings(self.inference_mode, 1, cfg.joint.k)


@dataclass(frozen=True)
class Workload:
    """The images timed and how: train and test slides of one manifest, repeats after warm-up."""

    records: tuple[SlideRecord, ...]
    labels: tuple[int, ...]
    train: tuple[int, ...]
    test: tuple[int, ...]
    n_classes: int
    repeats: int = 3
    warmup: int = 1


def device_of(cfg: Config) -> torch.device:
    """The device a run's accelerator setting resolves to here."""
    return resolve_device(cfg.train.accelerator)


class EpochTimer(L.Callback):
    """Wall time of each training epoch (data loading included), device synced at both ends."""

    def __init__(self) -> None:
        self.seconds: list[float] = []
        self._start = 0.0

    def on_train_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        sync(pl_module.device)
        self._start = time.perf_counter()

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        sync(pl_module.device)
        self.seconds.append(time.perf_counter() - self._start)


def make_model(cfg: Config, n_classes: int) -> SlideClassifier:
    """A freshly initialised model of ``cfg`` (timing does not depend on the weights)."""
    torch.manual_seed(cfg.train.seed)
    return build_model(cfg, n_classes)


def make_module(cfg: Config, n_classes: int, pixels: PixelSource) -> SlideClassifierModule:
    """The training module `loupe train` builds around a fresh model of ``cfg``, reading through ``pixels``, with
    plain Adam: the LR schedule watches validation accuracy, which timing runs do not compute."""
    labels = [m.label for m in magnifications_of(cfg)]
    return SlideClassifierModule(make_model(cfg, n_classes), cfg.train, pixels, labels, schedule=False)


def trainer_for(cfg: Config, epochs: int, callbacks: Sequence[L.Callback], max_steps: int = -1) -> L.Trainer:
    """A Trainer as `loupe train` builds it, minus validation, checkpoints, logger and progress bar."""
    return build_trainer(
        cfg.train,
        epochs=epochs,
        callbacks=callbacks,
        validate=False,
        checkpoints=False,
        progress_bar=False,
        max_steps=max_steps,
    )


def warm_slides(catalog: SlideCatalog, indices: Sequence[int]) -> None:
    """Open each image and read one cell of every magnification: a plain image is decoded whole and resized once
    per magnification on first use, so that timed repeats measure the steady state, whatever cells warm-up drew."""
    p = catalog.patch_size
    for i in indices:
        grid = catalog.grid(i)
        catalog.reader(i).read_regions(grid.cell_rects(np.asarray(grid.offsets)), (p, p))


def train_loader(cfg: Config, catalog: SlideCatalog, work: Workload) -> DataLoader:
    """The training loader `loupe train` uses: shape-bucketed, shuffled, thumbnails cached after epoch one."""
    ds = ThumbnailDataset(catalog, work.train, [work.labels[i] for i in work.train], cfg.data.cache_thumbnails)
    return make_loader(ds, cfg.data.batch_size, True, cfg.data.num_workers, cfg.train.seed)


def train_epoch_seconds(cfg: Config, work: Workload) -> list[float]:
    """Seconds per training epoch of ``cfg``'s model on the workload's train images, after warm-up epochs."""
    catalog = make_catalog(list(work.records), cfg)
    warm_slides(catalog, work.train)
    pixels = make_pixels(catalog, cfg)
    module = make_module(cfg, work.n_classes, pixels)
    timer = EpochTimer()
    try:
        trainer_for(cfg, work.warmup + work.repeats, [timer]).fit(module, train_loader(cfg, catalog, work))
    finally:
        pixels.close()
        catalog.close()
    return timer.seconds[work.warmup :]


def infer_seconds_per_image(cfg: Config, work: Workload, settings: InferenceSettings) -> list[float]:
    """Seconds per image of :func:`infer` with ``settings`` on the workload's test images, after warm-up."""
    catalog = make_catalog(list(work.records), cfg)
    warm_slides(catalog, work.test)
    runtime = runtime_of(cfg)
    model = make_model(cfg, work.n_classes)
    runtime.prepare(model)  # on the device, in the memory format, as `load_run` leaves a trained model
    test = list(work.test)
    try:
        times = timed_repeats(
            lambda: infer(model, catalog, test, cfg, settings, runtime=runtime),
            work.repeats,
            work.warmup,
            runtime.device,
        )
    finally:
        catalog.close()
    return [t / len(test) for t in times]


def variants(cfg: Config) -> list[Variant]:
    """Each single magnification with k and with all patches, then the joint model with k and with all."""
    labels = [m.label for m in magnifications_of(cfg)]
    single = [Variant(lab, (j,), all_patches) for j, lab in enumerate(labels) for all_patches in (False, True)]
    joint = tuple(range(len(labels)))
    return [*single, Variant("joint", joint, False), Variant("joint", joint, True)]


def speed_table(cfg: Config, work: Workload, log: Log = print) -> dict[str, Any]:
    """Measure every variant: training seconds per epoch (the joint model with k only, as in the paper) and
    inference ms per image, medians and raw repeats, plus the combined rows and the ratios."""
    train: dict[str, dict[str, float]] = {}
    infer_ms: dict[str, dict[str, float]] = {}
    raw: dict[str, list[float]] = {}
    for v in variants(cfg):
        col = "all" if v.all_patches else "k"
        vcfg = v.config(cfg)
        if not (v.name == "joint" and v.all_patches):
            t = train_epoch_seconds(vcfg, work)
            raw[f"train/{v.name}/{col}"] = t
            train.setdefault(v.name, {})[col] = median(t)
            log(f"train {v.name} {col}: {median(t):.2f} s/epoch")
        t = infer_seconds_per_image(vcfg, work, v.inference(vcfg))
        raw[f"infer/{v.name}/{col}"] = [1000 * s for s in t]
        infer_ms.setdefault(v.name, {})[col] = 1000 * median(t)
        log(f"infer {v.name} {col}: {1000 * median(t):.1f} ms/image")
    singles = [name for name in train if name != "joint"]
    train["combined"] = {col: sum(train[s][col] for s in singles) for col in ("k", "all")}
    ratios = {
        "train_combined_over_joint": train["combined"]["k"] / train["joint"]["k"],
        "train_combined_all_over_joint": train["combined"]["all"] / train["joint"]["k"],
        "infer_all_over_joint": infer_ms["joint"]["all"] / infer_ms["joint"]["k"],
    }
    return {"train_s_per_epoch": train, "infer_ms_per_image": infer_ms, "ratios": ratios, "raw": raw}
