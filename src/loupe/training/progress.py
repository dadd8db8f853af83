"""How training shows its progress: Lightning's bar on a terminal; in a log (CI, SLURM, nohup: stderr not a TTY)
one line per epoch with its metrics, its time and the time left, instead of a bar's redraws."""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable, Mapping

import lightning as L
from lightning.pytorch.callbacks import TQDMProgressBar

from loupe.console import duration, is_interactive

#: Steps between two redraws of the bar on a terminal: redrawing every step costs ~40% of a small model's time.
BAR_REFRESH_STEPS = 10


class EpochLog(L.Callback):
    """One ``loupe`` log line per epoch, from the first process of a run::

        epoch 3/10: train loss 0.412, acc 0.850 | val loss 0.300, ce 0.290, acc 0.950, auc 0.990 |
        attention 5x 10%, 10x 20%, 20x 70% | 4.1 s, about 28 s left

    The time left is the mean epoch time of this session times the epochs to go."""

    def __init__(self, logger: logging.Logger | None = None, clock: Callable[[], float] = time.monotonic) -> None:
        self._log = logger or logging.getLogger("loupe")
        self.clock = clock
        self.session_start: float | None = None
        self.session_epochs = 0
        self.epoch_start = 0.0

    def on_train_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.epoch_start = self.clock()
        if self.session_start is None:
            self.session_start = self.epoch_start

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        # Lightning runs validation before this hook: the epoch's validation metrics are in callback_metrics.
        now = self.clock()
        self.session_epochs += 1
        if not trainer.is_global_zero:
            return
        epoch, epochs = trainer.current_epoch + 1, trainer.max_epochs
        metrics = {k: _number(v) for k, v in trainer.callback_metrics.items()}
        mean = (now - (self.session_start or now)) / self.session_epochs
        left = (epochs - epoch) * mean if epochs is not None and epochs > 0 else math.nan
        self._log.info("%s", epoch_line(epoch, epochs, metrics, now - self.epoch_start, left))


def epoch_line(
    epoch: int, epochs: int | None, metrics: Mapping[str, float | None], seconds: float, left_s: float
) -> str:
    """The line of :class:`EpochLog` (metrics as Lightning names them: ``train_loss``, ``val_acc``,
    ``val_attention_20x``...)."""
    total = f"/{epochs}" if epochs is not None and epochs > 0 else ""
    parts = [_group("train", metrics), _group("val", metrics)]
    share = {k.removeprefix("val_attention_"): v for k, v in metrics.items() if k.startswith("val_attention_")}
    if share:
        parts.append("attention " + ", ".join(f"{m} {100 * v:.0f}%" for m, v in share.items() if v is not None))
    timing = duration(seconds)
    if math.isfinite(left_s) and left_s > 0:
        timing += f", about {duration(left_s)} left"
    return f"epoch {epoch}{total}: " + " | ".join(p for p in [*parts, timing] if p)


def _group(prefix: str, metrics: Mapping[str, float | None]) -> str:
    """``train loss 0.412, acc 0.850``: the loss first, then the others as logged (attention share apart)."""
    names = [k for k in metrics if k.startswith(f"{prefix}_") and not k.startswith(f"{prefix}_attention_")]
    names.sort(key=lambda k: (k != f"{prefix}_loss", k.endswith("_step")))
    shown = [
        f"{k.removeprefix(prefix + '_').removesuffix('_epoch')} {metrics[k]:.3f}"
        for k in names
        if metrics[k] is not None and not k.endswith("_step")
    ]
    return f"{prefix} " + ", ".join(shown) if shown else ""


def _number(value: object) -> float | None:
    """A logged value (a tensor, a number) as a float; None when it is not one number."""
    try:
        return float(value)  # type: ignore[arg-type]
    except (TypeError, ValueError, RuntimeError):
        return None


def progress_callbacks(show: bool, interactive: bool | None = None) -> list[L.Callback]:
    """What shows training's progress: a bar on a terminal, :class:`EpochLog` in a log, nothing unless ``show``."""
    if not show:
        return []
    if is_interactive() if interactive is None else interactive:
        return [TQDMProgressBar(refresh_rate=BAR_REFRESH_STEPS)]
    return [EpochLog()]
