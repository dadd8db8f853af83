"""The one place a Lightning ``Trainer`` is made: `loupe train` and `loupe bench` differ only in what they ask
for (validation, checkpoints, logs), never in how the accelerator, precision or sampling are set."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import lightning as L
from lightning.pytorch.callbacks import ProgressBar

from loupe.config import TrainConfig
from loupe.models.runtime import resolve_device
from loupe.training.progress import progress_callbacks


def build_trainer(
    cfg: TrainConfig,
    *,
    epochs: int | None = None,
    callbacks: Sequence[L.Callback] = (),
    logger: Any = False,
    validate: bool = True,
    checkpoints: bool = True,
    progress_bar: bool | None = None,
    max_steps: int = -1,
) -> L.Trainer:
    """A Trainer for ``cfg``: the accelerator ``train.accelerator`` resolves to here, ``train.devices`` of it on
    each of ``train.num_nodes`` nodes (DDP when more than one in all), the run's precision, ``epochs`` (default
    ``train.epochs``). Batches come from loupe's own shape-bucketed sampler, which shards itself across ranks, so
    Lightning's distributed sampler is off; no sanity validation, no model summary.

    With several GPUs, BatchNorm layers are synchronised across ranks (statistics of the whole batch, as one
    process would compute them); PyTorch's SyncBatchNorm does not run on CPU, where each rank normalises over its
    own share of the batch.

    Progress (``progress_bar``, default ``train.progress_bar``): Lightning's bar on a terminal; in a log (stderr not
    a terminal: CI, SLURM, nohup) one line per epoch instead (:class:`~loupe.training.progress.EpochLog`)."""
    device = resolve_device(cfg.accelerator)
    given = any(isinstance(c, ProgressBar) for c in callbacks)  # a caller's own bar replaces loupe's
    shown = [] if given else progress_callbacks(cfg.progress_bar if progress_bar is None else progress_bar)
    bar = given or any(isinstance(c, ProgressBar) for c in shown)
    accelerator = "gpu" if device.type == "cuda" else ("mps" if cfg.accelerator == "mps" else "cpu")
    distributed = cfg.devices * cfg.num_nodes > 1
    strategy = "ddp" if cfg.strategy == "auto" and distributed else cfg.strategy
    return L.Trainer(
        max_epochs=cfg.epochs if epochs is None else epochs,
        max_steps=max_steps,
        accelerator=accelerator,
        devices=cfg.devices,
        num_nodes=cfg.num_nodes,
        strategy=strategy,
        sync_batchnorm=distributed and accelerator == "gpu",
        precision=cfg.precision,  # type: ignore[arg-type]
        callbacks=[*callbacks, *shown],
        logger=logger,
        enable_checkpointing=checkpoints,
        enable_progress_bar=bar,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        log_every_n_steps=1,
        limit_val_batches=None if validate else 0,
        use_distributed_sampler=False,
    )
