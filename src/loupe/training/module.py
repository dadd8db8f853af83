"""The Lightning module that trains any :class:`~loupe.models.interface.SlideClassifier` end to end.

The model owns its objective (``SlideOutput.loss``: cross-entropy plus its own terms) and its hooks (calibration
before training, per-epoch freezing); this module owns the loop: automatic optimisation, or, for models that
accumulate slides (StreamingCLAM), each slide forwarded and back-propagated alone with one optimiser step per
batch. Adam; LR ×``lr_factor`` after ``lr_patience`` epochs without validation accuracy gain.

Under DDP every rank trains on its shard; validation figures are computed over the whole validation set gathered
from every rank (an accuracy or AUC averaged over ranks is not the set's), so the LR schedule and the best checkpoint
follow the same figure on every rank.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from contextlib import nullcontext
from functools import partial
from typing import Any

import lightning as L
import numpy as np
import torch
from lightning.pytorch.utilities.types import OptimizerLRScheduler
from sklearn.metrics import roc_auc_score
from torch import Tensor

from loupe.config import TrainConfig
from loupe.data.catalog import SlideFailures, run_dropping_failed
from loupe.errors import SlideReadError
from loupe.models.interface import (
    InferenceSettings,
    PixelSource,
    SlideBatch,
    SlideClassifier,
    SlideOutput,
    WholeImage,
    magnification_totals,
)
from loupe.models.runtime import Runtime
from loupe.training.distributed import average_gradients, gather_rows
from loupe.training.frozen import restore_frozen, strip_frozen


class SlideClassifierModule(L.LightningModule):
    """Trains ``model`` reading pixels through ``pixels``; validation runs ``validation`` inference (default: the
    model's own). ``magnification_labels`` name the per-magnification attention shares it logs."""

    def __init__(
        self,
        model: SlideClassifier,
        train_cfg: TrainConfig,
        pixels: PixelSource,
        magnification_labels: list[str],
        validation: InferenceSettings | None = None,
        schedule: bool = True,
        failures: SlideFailures | None = None,
    ) -> None:
        super().__init__()
        self.failures = failures
        """Where slides failing to read are counted (then dropped from their batches); None: a failure raises."""
        self.model = model
        self.train_cfg = train_cfg
        self.pixels = pixels
        self.magnification_labels = list(magnification_labels)
        self.validation = validation or model.default_inference()
        self.schedule = schedule
        """Reduce the LR on a validation plateau (timing runs, which do not validate, turn it off)."""
        self.runtime = Runtime(torch.device("cpu"), str(train_cfg.precision), train_cfg.channels_last)
        """Precision and memory format of the run (the device is the module's, read at each step)."""
        self.automatic_optimization = not model.accumulates_slides
        self._val_rows: list[Tensor] = []

    def setup(self, stage: str) -> None:
        """The run's memory format before Lightning wraps the model for DDP, whose gradient buckets take the
        parameters' strides (converted later, every channels-last gradient would be copied into its bucket)."""
        self.runtime.prepare(self.model, move=False)

    def run(
        self,
        batch: SlideBatch,
        inference: InferenceSettings | None,
        labels: Tensor | None,
        pixels: PixelSource | None = None,
    ) -> SlideOutput:
        """The model on one batch, in the run's memory format and autocast (the one place both are applied);
        ``pixels`` replaces the module's source for this call."""
        runtime = Runtime(self.device, self.runtime.precision, self.runtime.channels_last)
        runtime.prepare(self.model, move=False)
        with runtime.autocast():
            return self.model(batch, pixels if pixels is not None else self.pixels, inference, labels)

    def _log_step(self, prefix: str, out: SlideOutput, labels: Tensor, **kw: Any) -> Tensor:
        assert out.loss is not None
        loss = out.loss.float().mean()
        ce = torch.nn.functional.cross_entropy(out.logits.float(), labels)
        acc = (out.logits.argmax(-1) == labels).float().mean()
        self.log_dict(
            {f"{prefix}_loss": loss.detach(), f"{prefix}_ce": ce.detach(), f"{prefix}_acc": acc},
            on_epoch=True,
            batch_size=labels.shape[0],
            **kw,
        )
        return loss

    # --- checkpoints --------------------------------------------------------------------------------------
    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """A frozen encoder loaded from a file is recorded by name and SHA-256 instead of its tensors."""
        strip_frozen(checkpoint, self.model)

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Resuming: the left-out encoder's tensors come back from the network built from the run's config, whose
        file must be the recorded one."""
        restore_frozen(checkpoint, self.model)

    # --- training -----------------------------------------------------------------------------------------
    def on_train_start(self) -> None:
        if self.global_step == 0:  # a resumed run keeps what its checkpoint holds
            self.model.prepare_training(self.trainer.train_dataloader or [], self.pixels)

    def on_train_epoch_start(self) -> None:
        self.model.begin_epoch(self.current_epoch)

    def training_step(self, batch: SlideBatch, batch_idx: int) -> Tensor | None:
        if self.automatic_optimization:
            ran = run_dropping_failed(batch, lambda b: self.run(b, None, b.labels), self.failures, self._when())
            if ran is None:  # no readable slide left: a zero loss, so that DDP's ranks still step together
                zero = torch.zeros((), device=self.device)
                return sum((p.sum() * 0 for p in self.parameters() if p.requires_grad), zero)
            batch, out = ran
            return self._log_step("train", out, batch.labels, on_step=False, sync_dist=True)
        opt = self.optimizers()
        assert not isinstance(opt, list)
        opt.zero_grad()
        n = len(batch)
        outs = []
        # Under DDP no backward synchronises (a streamed backward accumulates each parameter's gradient once per
        # tile, which DDP's reducer refuses): the ranks average their gradients once, before the step.
        with getattr(self.trainer.strategy, "block_backward_sync", nullcontext)():
            for b in range(n):  # one slide at a time: only one slide's activations live at once
                one = batch.select([b])
                watch = _RegionWatch(self.pixels)
                ran = run_dropping_failed(one, partial(self._train_run, pixels=watch), self.failures, self._when())
                if ran is None:  # unreadable: skipped (its gradient is no rank's; the averaging allows for that)
                    continue
                out = ran[1]
                assert out.loss is not None
                if not self._backward_slide(out.loss.sum() / n, one.slides[0], watch.regions):
                    continue  # failed in its backward: skipped like a slide failing in its forward
                outs.append(SlideOutput(out.logits.detach(), out.attention.detach(), out.cells, out.loss.detach()))
        average_gradients(self.parameters())
        opt.step()
        if not outs:
            return None
        kept = [b for b in range(n) if int(batch.indices[b]) not in (self.failures or ())]
        batch = batch.select(kept)
        merged = SlideOutput(
            torch.cat([o.logits for o in outs]),
            torch.cat([o.attention for o in outs]),
            torch.cat([o.cells for o in outs]),
            torch.cat([o.loss for o in outs if o.loss is not None]),
        )
        self._log_step("train", merged, batch.labels, on_step=False, sync_dist=True)
        return None

    def _train_run(self, batch: SlideBatch, pixels: PixelSource | None = None) -> SlideOutput:
        """The training forward of ``batch`` (with its labels), reading through ``pixels`` when given."""
        return self.run(batch, None, batch.labels, pixels)

    def _backward_slide(self, loss: Tensor, slide: int, reads_pixels: bool) -> bool:
        """Back-propagate one slide's ``loss`` into the gradients accumulated so far; False when the slide failed
        to read meanwhile. An image read per tile (``reads_pixels``) is read again in the backward (each tile is
        recomputed there), and a read can fail after some tiles' gradients have been added: the trainable
        gradients are then put back as they were before this slide, and the slide is counted as failed. The copy
        this takes (one of the trainable gradients) is made only for such images and only when failures are
        tolerated; otherwise a failure raises as before."""
        if not reads_pixels or self.failures is None:
            self.manual_backward(loss)
            return True
        saved = _save_gradients(self.parameters())
        try:
            self.manual_backward(loss)
        except SlideReadError as err:
            if err.index != slide:
                raise
            _restore_gradients(saved)
            del saved
            self.failures.add(slide, str(err), f"{self._when()} (backward)")
            return False
        return True

    def _when(self) -> str:
        return f"epoch {self.current_epoch}, training"

    # --- validation ---------------------------------------------------------------------------------------
    def on_validation_epoch_start(self) -> None:
        self._val_rows = []

    def validation_step(self, batch: SlideBatch, batch_idx: int) -> None:
        """Keep each slide's row (index, label, loss, logits, attention per magnification); the metrics are
        computed once per epoch over the whole validation set, gathered from every rank. A slide that fails to
        read is skipped (and counted), as in training."""
        when = f"epoch {self.current_epoch}, validation"
        ran = run_dropping_failed(batch, lambda b: self.run(b, self.validation, b.labels), self.failures, when)
        if ran is None:
            return
        batch, out = ran
        assert out.loss is not None
        totals = magnification_totals(out.attention.float(), batch.shapes)
        rows = torch.cat(
            [
                batch.indices.to(self.device, torch.float64)[:, None],
                batch.labels.to(self.device, torch.float64)[:, None],
                out.loss.detach().to(torch.float64).reshape(-1, 1),
                out.logits.detach().to(torch.float64),
                totals.detach().to(torch.float64),
            ],
            dim=1,
        )
        self._val_rows.append(rows)

    def validation_metrics(self) -> dict[str, float]:
        """Loss, cross-entropy, accuracy, AUC (one-vs-rest, macro: defined when every class is present) and
        attention share per magnification, over every validation slide once (padding repeats dropped)."""
        if not self._val_rows:  # no validation batches (every rank gets as many batches: all have none)
            return {}
        rows = gather_rows(torch.cat(self._val_rows)).cpu()
        _, first = np.unique(rows[:, 0].numpy(), return_index=True)
        rows = rows[np.sort(first)]
        n_classes = rows.shape[1] - 3 - len(self.magnification_labels)
        labels, losses = rows[:, 1].long(), rows[:, 2]
        logits, totals = rows[:, 3 : 3 + n_classes], rows[:, 3 + n_classes :]
        metrics = {
            "val_loss": float(losses.mean()),
            "val_ce": float(torch.nn.functional.cross_entropy(logits, labels)),
            "val_acc": float((logits.argmax(-1) == labels).double().mean()),
        }
        if len(torch.unique(labels)) == n_classes:
            probs = torch.softmax(logits, -1).numpy()
            if n_classes == 2:
                metrics["val_auc"] = float(roc_auc_score(labels.numpy(), probs[:, 1]))
            else:
                metrics["val_auc"] = float(roc_auc_score(labels.numpy(), probs, multi_class="ovr", average="macro"))
        for j, name in enumerate(self.magnification_labels):
            metrics[f"val_attention_{name}"] = float(totals[:, j].mean())
        return metrics

    def on_validation_epoch_end(self) -> None:
        metrics = self.validation_metrics()
        # Every rank holds the same figures: the mean over ranks that sync_dist takes is the figure itself.
        for name, value in metrics.items():
            self.log(name, value, prog_bar=name == "val_acc", sync_dist=True)
        self._val_rows = []
        if self.automatic_optimization or not self.schedule or self.trainer.sanity_checking:
            return
        sched = self.lr_schedulers()
        if isinstance(sched, torch.optim.lr_scheduler.ReduceLROnPlateau) and "val_acc" in metrics:
            sched.step(metrics["val_acc"])

    def configure_optimizers(self) -> OptimizerLRScheduler:
        opt = torch.optim.Adam(self.parameters(), lr=self.train_cfg.lr, weight_decay=self.train_cfg.weight_decay)
        if not self.schedule:
            return opt
        cfg = self.train_cfg
        sched = torch.optim.lr_scheduler.ReduceLROnPlateau(
            opt, mode="max", factor=cfg.lr_factor, patience=cfg.lr_patience
        )
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "monitor": "val_acc", "interval": "epoch"}}


_Gradients = list[tuple[torch.nn.Parameter, Tensor | None]]


def _save_gradients(params: Iterable[torch.nn.Parameter]) -> _Gradients:
    """A copy of every trainable parameter's gradient (None where it has none yet)."""
    return [(p, None if p.grad is None else p.grad.clone()) for p in params if p.requires_grad]


def _restore_gradients(saved: _Gradients) -> None:
    """Put back the gradients :func:`_save_gradients` copied (in place: a gradient may be a view into a DDP
    bucket)."""
    for p, grad in saved:
        if grad is None:
            p.grad = None
        elif p.grad is not None:
            p.grad.copy_(grad)
        else:
            p.grad = grad


class _RegionWatch:
    """A pixel source passing reads through to ``pixels`` and noting whether a whole image came as regions (read
    per tile, so also in the backward pass) rather than a tensor held in memory."""

    def __init__(self, pixels: PixelSource) -> None:
        self.pixels = pixels
        self.regions = False
        self.embeddings = pixels.embeddings  # models reading cached embeddings still find them

    def cells(self, slides: Sequence[int], cells: Tensor) -> Tensor:
        return self.pixels.cells(slides, cells)

    def whole(self, slide: int, valid: np.ndarray | None) -> WholeImage:
        whole = self.pixels.whole(slide, valid)
        self.regions |= not isinstance(whole.image, Tensor)
        return whole
