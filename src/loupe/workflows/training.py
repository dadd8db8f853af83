"""`loupe train`: check every input, then train with Lightning into a resumable run folder."""

from __future__ import annotations

import dataclasses
import logging
import time
from collections.abc import Sequence
from pathlib import Path

import lightning as L
from lightning.pytorch.callbacks import LearningRateMonitor, ModelCheckpoint
from lightning.pytorch.loggers import CSVLogger
from torch.utils.data import DataLoader

from loupe.config import Config, dump_config
from loupe.data.catalog import SKIPPED_SLIDES_FILE, SlideFailures
from loupe.data.loading import ThumbnailDataset, make_loader
from loupe.data.manifest import Manifest, load_manifest, save_manifest
from loupe.data.splits import assign_splits, group_kfold
from loupe.errors import ConfigError, prepare_output_folder
from loupe.models import build_model, check_config
from loupe.ranks import is_first_process
from loupe.reports.io import write_json, write_text
from loupe.training.checkpoint_io import SafeCheckpointIO, record_resume, resume_from
from loupe.training.module import SlideClassifierModule
from loupe.training.trainer import build_trainer
from loupe.workflows.common import RunPaths, magnifications_of, make_catalog
from loupe.workflows.inference import make_pixels

log = logging.getLogger("loupe")


def prepare_manifest(cfg: Config) -> Manifest:
    """Load and validate the manifest (all missing files and unknown labels at once) and fill missing splits."""
    if not cfg.data.manifest:
        raise ConfigError("no manifest given: set data.manifest in the config or pass --data.manifest FILE.csv")
    manifest = load_manifest(cfg.data.manifest, cfg.data.classes)
    if cfg.data.folds is not None:
        manifest = fold_splits(manifest, cfg.data.folds, cfg.data.fold, cfg.data.val_fraction, cfg.data.split_seed)
    if any(r.split is None for r in manifest.records):
        manifest = assign_splits(manifest, cfg.data.val_fraction, cfg.data.test_fraction, cfg.data.split_seed)
    if len(manifest.classes) < 2:
        raise ConfigError(f"{cfg.data.manifest}: need at least two classes, found {list(manifest.classes)}")
    return manifest


def fold_splits(manifest: Manifest, folds: int, fold: int, val_fraction: float, seed: int) -> Manifest:
    """Cross-validation splits: test = fold ``fold`` of a stratified group k-fold, val drawn (stratified,
    group-aware) from the other folds, the rest train. The manifest's own split column is ignored."""
    if not 0 <= fold < folds:
        raise ConfigError(f"data.fold={fold} must be in [0, {folds}) for data.folds={folds}")
    test = set(group_kfold(manifest, folds, seed)[fold][1].tolist())
    records = [dataclasses.replace(r, split="test" if i in test else None) for i, r in enumerate(manifest.records)]
    test_fraction = len(test) / len(records)
    return assign_splits(manifest.with_records(records), val_fraction, test_fraction, seed)


def train(cfg: Config, *, out: str | Path, callbacks: Sequence[L.Callback] = ()) -> Path:
    """Train into run folder ``out``; resumes from ``out/checkpoints/last.ckpt`` when it exists.

    The folder receives the resolved config (with the class order and the split manifest pinned, so evaluate
    and predict see exactly what training saw), checkpoints (best by validation CE, and last) and a CSV log.

    With ``train.devices`` × ``train.num_nodes`` > 1 this runs in every process of a DDP run (Lightning starts
    the others on one node; torchrun or SLURM start them all across nodes): each checks the inputs and trains
    on its shard; the first process alone writes the folder's files, Lightning's rank 0 the checkpoints and logs.
    ``callbacks`` are added to the Trainer's own (Lightning callbacks: extra logging, early stopping...).
    """
    check_config(cfg)  # the networks it names, before any slide is opened
    paths = RunPaths(prepare_output_folder(out, "run folder (--out)"))  # writable, before any slide is opened
    manifest = prepare_manifest(cfg)
    records = list(manifest.records)
    catalog = make_catalog(records, cfg)
    # Every slide opens, has µm/px, is large enough, gives a thumbnail: before any training. Those that do not
    # (and those failing later, in a step) are skipped, unless more than data.max_failed_fraction of them fail.
    failures = SlideFailures(records, len(records), cfg.data.max_failed_fraction)
    position = {r.slide_id: i for i, r in enumerate(records)}
    for problem in catalog.check(thumbnails=True):
        failures.add(position[problem.record.slide_id], problem.reason, "before training", check=False)
    failures.check()

    data = dataclasses.replace(cfg.data, manifest=str(paths.manifest.resolve()), classes=list(manifest.classes))
    cfg = dataclasses.replace(cfg, data=data)
    if not is_first_process():  # of a DDP run: every rank runs this function, the first writes and reports
        log.setLevel(logging.WARNING)
    else:
        save_manifest(manifest, paths.manifest)
        write_text(paths.config, dump_config(cfg))
        failures.record = paths.root / SKIPPED_SLIDES_FILE  # the run's list of skipped slides (empty: none)
        failures.save()

    labels = manifest.label_indices().tolist()
    split_of = [r.split for r in records]
    train_idx = failures.keep([i for i, s in enumerate(split_of) if s == "train"])
    val_idx = failures.keep([i for i, s in enumerate(split_of) if s == "val"])
    if not train_idx or not val_idx:
        raise ConfigError(f"{cfg.data.manifest}: need slides in both the train and val splits")

    L.seed_everything(cfg.train.seed, workers=True, verbose=False)

    def loader(indices: list[int], shuffle: bool) -> DataLoader:
        ds = ThumbnailDataset(catalog, indices, [labels[i] for i in indices], cfg.data.cache_thumbnails)
        return make_loader(ds, cfg.data.batch_size, shuffle, cfg.data.num_workers, cfg.train.seed)

    train_loader, val_loader = loader(train_idx, True), loader(val_idx, False)

    model = build_model(cfg, len(manifest.classes))
    pixels = make_pixels(catalog, cfg, model)
    labels_of_mags = [m.label for m in magnifications_of(cfg)]
    module = SlideClassifierModule(model, cfg.train, pixels, labels_of_mags, failures=failures)
    checkpoint = ModelCheckpoint(
        dirpath=paths.checkpoints,
        filename="best",
        monitor="val_ce",
        mode="min",
        enable_version_counter=False,
    )
    # last.ckpt after every epoch. ModelCheckpoint(save_last=True) on a monitored checkpoint (Lightning 2.6) writes
    # it only when the monitored value improves: a killed run would resume from the last improvement, not the last
    # epoch. A checkpoint without a monitor writes every epoch; listed after "best", it holds best's state too.
    last = ModelCheckpoint(dirpath=paths.checkpoints, filename="last", enable_version_counter=False)
    trainer = build_trainer(  # with a bar on a terminal, one line per epoch in a log (train.progress_bar)
        cfg.train,
        callbacks=[checkpoint, last, LearningRateMonitor(logging_interval="epoch"), *callbacks],
        logger=CSVLogger(paths.root, name="logs"),  # logs/version_N: a resumed run keeps earlier logs
    )
    trainer.strategy.checkpoint_io = SafeCheckpointIO()  # atomic, durable writes; weights-only loads
    resume = resume_from(paths.checkpoints, tidy=is_first_process())  # last.ckpt, else best.ckpt: the last whole one
    if resume is not None:
        log.warning("resuming from %s", resume)
        if is_first_process():
            record_resume(paths.root, resume)
    start = time.perf_counter()
    try:
        trainer.fit(module, train_loader, val_loader, ckpt_path=resume, weights_only=True)
    finally:
        pixels.close()
        catalog.close()
    log.info("trained in %.1f s", time.perf_counter() - start)
    if pixels.embeddings is not None and trainer.is_global_zero:  # how little of the slides a frozen encoder embedded
        cache = pixels.embeddings
        info = cache.coverage(train_idx + val_idx) | {"embedded_now": cache.embedded, "reused_now": cache.reused}
        write_json(paths.root / "embeddings.json", info)
        log.info(
            "patch embeddings: %.1f%% of the valid cells ever embedded; %d embedded, %d reused in this session",
            100 * float(info["fraction_embedded"]), cache.embedded, cache.reused,
        )  # fmt: skip
    return paths.root
