"""The one place a Lightning ``Trainer`` is made: `loupe train` and `loupe bench` differ only in what they ask
for (validation, checkpoints, logs), never in how the accelerator, precision or sampling are set."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import lightning as L

from loupe.config import TrainConfig
from loupe.models.runtime import resolve_device


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
    """A Trainer for ``cfg``: the device ``train.accelerator`` resolves to here (one device), the run's
    precision, ``epochs`` (default ``train.epochs``). Batches come from loupe's own shape-bucketed sampler, so
    Lightning's distributed sampler is off; no sanity validation, no model summary."""
    device = resolve_device(cfg.accelerator)
    bar = cfg.progress_bar if progress_bar is None else progress_bar
    return L.Trainer(
        max_epochs=cfg.epochs if epochs is None else epochs,
        max_steps=max_steps,
        accelerator="gpu" if device.type == "cuda" else ("mps" if cfg.accelerator == "mps" else "cpu"),
        devices=1,
        precision=cfg.precision,  # type: ignore[arg-type]
        callbacks=list(callbacks),
        logger=logger,
        enable_checkpointing=checkpoints,
        enable_progress_bar=bar,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        log_every_n_steps=1,
        limit_val_batches=None if validate else 0,
        use_distributed_sampler=False,
    )
