"""The paper's speed tables (Tables 5-6), measured through the real code paths.

Training: a Lightning ``Trainer.fit`` of :class:`AttentionSamplingModule` over the real thumbnail loader and
:class:`CellReader`, one epoch as warm-up, then the wall time of each further epoch (validation and checkpoints
off: they are not training). Inference: :func:`loupe.workflows.common.infer`, the function behind evaluate, per
image, after warm-up calls. Every figure is the median of its repeats.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Sequence
from dataclasses import dataclass

import lightning as L
import numpy as np
import torch

from loupe.bench.timing import median, sync, timed_repeats
from loupe.config import Config
from loupe.data.catalog import SlideCatalog
from loupe.data.loading import CellReader, ThumbnailDataset, make_loader
from loupe.data.manifest import SlideRecord
from loupe.models import build_model
from loupe.training.module import AttentionSamplingModule
from loupe.workflows.common import infer, magnifications_of, make_catalog


@dataclass(frozen=True)
class Variant:
    """One model of the table: which of the config's magnifications it reads, k sampled patches or all."""

    name: str
    magnifications: tuple[int, ...]
    all_patches: bool

    def config(self, cfg: Config) -> Config:
        """``cfg`` narrowed to this variant's magnifications, with the exact all-patches sum if asked."""
        labels = [m.label for m in magnifications_of(cfg)]
        model = dataclasses.replace(
            cfg.model,
            magnifications=[cfg.model.magnifications[j] for j in self.magnifications],
            magnification_labels=[labels[j] for j in self.magnifications],
            estimator="exhaustive" if self.all_patches else "sampled",
        )
        return dataclasses.replace(cfg, model=model)

    @property
    def inference_mode(self) -> str:
        """One draw of k cells (the paper's inference), or every cell."""
        return "exhaustive" if self.all_patches else "sample"


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
    want = cfg.train.accelerator
    if want in ("auto", "gpu", "cuda") and torch.cuda.is_available():
        return torch.device("cuda")
    return torch.device("cpu")


class _NoScheduleModule(AttentionSamplingModule):
    """The real module; its LR schedule watches validation accuracy, which timing runs do not compute."""

    def configure_optimizers(self):
        cfg = self.train_cfg
        return torch.optim.Adam(self.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)


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


def make_module(cfg: Config, n_classes: int) -> AttentionSamplingModule:
    """A freshly initialised module of ``cfg`` (timing does not depend on the weights)."""
    torch.manual_seed(cfg.train.seed)
    return _NoScheduleModule(build_model(cfg.model, n_classes), cfg.model, cfg.train)


def trainer_for(cfg: Config, epochs: int, callbacks: Sequence[L.Callback], max_steps: int = -1) -> L.Trainer:
    """A Trainer as `loupe train` builds it, minus validation, checkpoints, logger and progress bar."""
    return L.Trainer(
        max_epochs=epochs,
        max_steps=max_steps,
        accelerator="gpu" if device_of(cfg).type == "cuda" else "cpu",
        devices=1,
        precision=cfg.train.precision,
        callbacks=list(callbacks),
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        limit_val_batches=0,
        use_distributed_sampler=False,
    )


def warm_slides(catalog: SlideCatalog, indices: Sequence[int]) -> None:
    """Open each image and read one cell of every magnification: a plain image is decoded whole and resized once
    per magnification on first use, so that timed repeats measure the steady state, whatever cells warm-up drew."""
    p = catalog.patch_size
    for i in indices:
        grid = catalog.grid(i)
        catalog.reader(i).read_regions(grid.cell_rects(np.asarray(grid.offsets)), (p, p))


def train_loader(cfg: Config, catalog: SlideCatalog, work: Workload):
    """The training loader `loupe train` uses: shape-bucketed, shuffled, thumbnails cached after epoch one."""
    ds = ThumbnailDataset(catalog, work.train, [work.labels[i] for i in work.train], cfg.data.cache_thumbnails)
    return make_loader(ds, cfg.data.batch_size, True, cfg.data.num_workers, cfg.train.seed)


def train_epoch_seconds(cfg: Config, work: Workload) -> list[float]:
    """Seconds per training epoch of ``cfg``'s model on the workload's train images, after warm-up epochs."""
    catalog = make_catalog(list(work.records), cfg)
    warm_slides(catalog, work.train)
    reader = CellReader(catalog, cfg.data.read_threads)
    module = make_module(cfg, work.n_classes)
    module.cell_reader = reader
    timer = EpochTimer()
    try:
        trainer_for(cfg, work.warmup + work.repeats, [timer]).fit(module, train_loader(cfg, catalog, work))
    finally:
        reader.close()
        catalog.close()
    return timer.seconds[work.warmup :]


def infer_seconds_per_image(cfg: Config, work: Workload, mode: str) -> list[float]:
    """Seconds per image of :func:`infer` with pooling ``mode`` on the workload's test images, after warm-up."""
    catalog = make_catalog(list(work.records), cfg)
    warm_slides(catalog, work.test)
    module = make_module(cfg, work.n_classes).to(device_of(cfg))
    test = list(work.test)
    try:
        times = timed_repeats(
            lambda: infer(module, catalog, test, cfg, mode, 1), work.repeats, work.warmup, device_of(cfg)
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


def speed_table(cfg: Config, work: Workload, log=print) -> dict:
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
        t = infer_seconds_per_image(vcfg, work, v.inference_mode)
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
