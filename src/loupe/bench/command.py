"""`loupe bench`: the speed tables and profile (default) or the accuracy comparison (``--accuracy``)."""

from __future__ import annotations

import dataclasses
import os
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from loupe.bench.commands import new_parser
from loupe.bench.data import Geometry, generate_images, geometry_config
from loupe.bench.profile import profile_inference, profile_training_step
from loupe.bench.report import accuracy_markdown, speed_markdown
from loupe.bench.speed import Log, Workload, device_of, speed_table, without_exploration
from loupe.config import Config, JointConfig, load_config
from loupe.errors import ConfigError
from loupe.reports import write_json, write_text
from loupe.workflows.common import make_catalog

if TYPE_CHECKING:
    from jsonargparse import ArgumentParser, Namespace

#: (train images, test images, repeats) of the quick and the full run.
QUICK = (4, 4, 3)
FULL = (16, 8, 3)


def _without_downloads(cfg: Config) -> Config:
    """Random weights: timing does not depend on them, and benchmark machines may have no internet."""
    model = dataclasses.replace(cfg.model, patch_pretrained=False)
    return dataclasses.replace(cfg, model=model, joint=dataclasses.replace(cfg.joint, thumbnail_pretrained=False))


def _joint_only(cfg: Config, config: str | Path) -> Config:
    """The speed table and profile time the joint model and its own baselines (one magnification, all patches)."""
    if not isinstance(cfg.section(), JointConfig):  # the paper's tables: this bench varies the joint settings
        raise ConfigError(
            f"{config}: model.architecture {cfg.model.architecture}: `loupe bench` times the joint model; give a "
            f"config with model.architecture {JointConfig.name}"
        )
    return cfg


def workload(cfg: Config, n_train: int | None, n_test: int | None, repeats: int, warmup: int) -> Workload:
    """The train and test images of ``cfg``'s manifest (its splits; val stands in for a missing test split),
    the first ``n_train`` / ``n_test`` of each when given."""
    from loupe.workflows.training import prepare_manifest

    manifest = prepare_manifest(cfg)
    split = [r.split for r in manifest.records]
    train = [i for i, s in enumerate(split) if s == "train"][:n_train]
    test = [i for i, s in enumerate(split) if s == "test"] or [i for i, s in enumerate(split) if s == "val"]
    return Workload(
        records=tuple(manifest.records),
        labels=tuple(manifest.label_indices().tolist()),
        train=tuple(train),
        test=tuple(test[:n_test]),
        n_classes=len(manifest.classes),
        repeats=repeats,
        warmup=warmup,
    )


def _settings(cfg: Config, work: Workload, dataset: str, quick: bool) -> dict[str, Any]:
    catalog = make_catalog(list(work.records), cfg)
    grid = catalog.grid(work.train[0])
    catalog.close()
    m, j = cfg.model, cfg.joint
    return {
        "dataset": dataset,
        "device": str(device_of(cfg)),
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "thumbnail_backbone": j.thumbnail_backbone,
        "patch_backbone": m.patch_backbone,
        "k": j.k,
        "patch_size": j.patch_size,
        "thumbnail_size": list(j.thumbnail_size),
        "magnifications": list(m.magnification_labels or m.magnifications),
        "cells": grid.n_cells,
        "grids": ", ".join(f"{c}×{r}" for r, c in grid.shapes),
        "n_train": len(work.train),
        "n_test": len(work.test),
        "batch_size": cfg.data.batch_size,
        "precision": cfg.train.precision,
        "channels_last": cfg.train.channels_last,
        "repeats": work.repeats,
        "warmup": work.warmup,
        "quick": quick,
    }


def run_bench(
    *,
    out: str | Path,
    config: str | Path | None = None,
    quick: bool = False,
    repeats: int | None = None,
    warmup: int = 1,
    n_train: int | None = None,
    n_test: int | None = None,
    profile: bool = True,
    geometry: Geometry | None = None,
    batch_size: int = 4,
    log: Log = print,
) -> dict[str, Any]:
    """Measure the speed table (and profile) into ``out/bench.json`` and ``out/bench.md``; return the result.

    Without ``config``: generated images of ``geometry`` (default BACH's) with the tiny backbone, ``batch_size``
    images per step. A ``config`` must be a joint model's (its baselines are derived from it).
    """
    start = time.perf_counter()
    load_before = os.getloadavg()[0]
    out = Path(out)
    _quiet_lightning()
    d_train, d_test, d_repeats = QUICK if quick else FULL
    repeats = repeats or d_repeats
    if config is None:
        n_train, n_test = n_train or d_train, n_test or d_test
        geometry = geometry or Geometry()
        manifest = generate_images(out / "data", n_train, n_test, geometry)
        cfg = geometry_config(manifest, geometry, batch_size=batch_size)
        g = geometry
        dataset = f"generated {g.width}×{g.height} images at {g.mpp} µm/px" + (
            " (the BACH geometry)" if geometry == Geometry() else ""
        )
    else:
        cfg = _without_downloads(_joint_only(load_config(config), config))
        dataset = f"{config} ({cfg.data.manifest})"
        if quick:
            n_train, n_test = n_train or d_train, n_test or d_test
    cfg = without_exploration(cfg)
    work = workload(cfg, n_train, n_test, repeats, warmup)
    result = speed_table(cfg, work, log)
    if profile:
        result["profile"] = {
            "train_step": profile_training_step(cfg, work),
            "inference": profile_inference(cfg, work),
        }
    result["settings"] = _settings(cfg, work, dataset, quick) | {
        "wall_s": time.perf_counter() - start,
        "load_average": [load_before, os.getloadavg()[0]],
        "cpu_count": os.cpu_count(),
    }
    write_json(out / "bench.json", result)
    write_text(out / "bench.md", speed_markdown(result))
    return result


def _quiet_lightning() -> None:
    """Keep the bench's output to its own lines: no Trainer banners, no warnings about the missing val loop."""
    import logging
    import warnings

    logging.getLogger("lightning.pytorch").setLevel(logging.WARNING)
    warnings.filterwarnings("ignore", message=".*val_dataloader.*")
    warnings.filterwarnings("ignore", message=".*LeafSpec.*")
    warnings.filterwarnings("ignore", message=".*does not have many workers.*")


def run_accuracy(
    *, out: str | Path, config: str | Path | None = None, epochs: int | None = None, log: Log = print
) -> dict[str, Any]:
    """Train and evaluate the joint model and its baselines on the same splits into ``out``; write
    accuracy.json and accuracy.md. Without ``config``: the demo dataset and preset."""
    from loupe.bench.accuracy import compare_accuracy

    out = Path(out)
    if config is None:
        from loupe.datasets.synthetic import SyntheticSpec, generate_dataset
        from loupe.workflows.common import magnifications_of
        from loupe.workflows.demo import demo_config

        cfg = demo_config()
        labels = tuple(m.label for m in magnifications_of(cfg))
        spec = SyntheticSpec(labels=labels, magnifications=(2.0, 1.0, 0.5), patch_size=cfg.joint.patch_size)
        manifest = generate_dataset(out / "data", spec)
        cfg = dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, manifest=str(manifest)))
        dataset = f"the demo dataset (planted at {spec.labels[spec.signal_index()]}), demo preset"
    else:
        cfg = _joint_only(load_config(config), config)
        dataset = str(config)
    train_cfg = dataclasses.replace(cfg.train, progress_bar=False)
    if epochs is not None:
        train_cfg = dataclasses.replace(train_cfg, epochs=epochs)
    result = compare_accuracy(dataclasses.replace(cfg, train=train_cfg), out, dataset, log)
    write_json(out / "accuracy.json", result)
    write_text(out / "accuracy.md", accuracy_markdown(result))
    return result


def build_parser(prog: str) -> ArgumentParser:
    """The options of `loupe bench` (the tables)."""
    parser = new_parser(prog, description="the paper's speed tables and a profile; --accuracy: the baselines")
    parser.add_argument("--config", default=None, help="a run config (its manifest, backbones); default: generated")
    parser.add_argument("--out", required=True, help="folder for bench.json and bench.md (or accuracy.*)")
    parser.add_argument("--quick", action="store_true", help=f"{QUICK[0]} train / {QUICK[1]} test images")
    parser.add_argument("--accuracy", action="store_true", help="train and evaluate the joint model and baselines")
    parser.add_argument("--repeats", type=int, default=None, help="timed repeats per figure (median)")
    parser.add_argument("--warmup", type=int, default=1, help="untimed repeats first")
    parser.add_argument("--train-images", "--train_images", dest="n_train", type=int, default=None)
    parser.add_argument("--test-images", "--test_images", dest="n_test", type=int, default=None)
    parser.add_argument("--epochs", type=int, default=None, help="--accuracy: override the config's epochs")
    return parser


def run_command(ns: Namespace) -> int:
    """Run `loupe bench` with parsed options."""
    if ns.accuracy:
        result = run_accuracy(out=ns.out, config=ns.config, epochs=ns.epochs)
        c = result["comparison"]
        print(
            f"joint − best single ({c['best_single']}): {100 * c['joint_minus_best_single']:+.1f} points, joint − all "
            f"patches: {100 * c['joint_minus_all_patches']:+.1f} points; table: {ns.out}/accuracy.md"
        )
        return 0
    result = run_bench(
        out=ns.out,
        config=ns.config,
        quick=ns.quick,
        repeats=ns.repeats,
        warmup=ns.warmup,
        n_train=ns.n_train,
        n_test=ns.n_test,
    )
    r = result["ratios"]
    print(
        f"training combined ÷ joint {r['train_combined_over_joint']:.2f}×, inference all patches ÷ joint "
        f"{r['infer_all_over_joint']:.2f}×; table: {ns.out}/bench.md"
    )
    return 0
