"""The Lightning module that trains any :class:`~loupe.models.interface.SlideClassifier` end to end.

The model owns its objective (``SlideOutput.loss``: cross-entropy plus its own terms) and its hooks (calibration
before training, per-epoch freezing); this module owns the loop: automatic optimisation, or, for models that
accumulate slides (StreamingCLAM), each slide forwarded and back-propagated alone with one optimiser step per
batch. Adam; LR ×``lr_factor`` after ``lr_patience`` epochs without validation accuracy gain.
"""

from __future__ import annotations

from typing import Any

import lightning as L
import torch
from lightning.pytorch.utilities.types import OptimizerLRScheduler
from torch import Tensor

from loupe.config import TrainConfig
from loupe.models.interface import (
    InferenceSettings,
    PixelSource,
    SlideBatch,
    SlideClassifier,
    SlideOutput,
    magnification_totals,
)
from loupe.models.runtime import Runtime


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
    ) -> None:
        super().__init__()
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

    def run(self, batch: SlideBatch, inference: InferenceSettings | None, labels: Tensor | None) -> SlideOutput:
        """The model on one batch, in the run's memory format and autocast (the one place both are applied)."""
        runtime = Runtime(self.device, self.runtime.precision, self.runtime.channels_last)
        runtime.prepare(self.model, move=False)
        with runtime.autocast():
            return self.model(batch, self.pixels, inference, labels)

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

    # --- training -----------------------------------------------------------------------------------------
    def on_train_start(self) -> None:
        if self.global_step == 0:  # a resumed run keeps what its checkpoint holds
            self.model.prepare_training(self.trainer.train_dataloader or [], self.pixels)

    def on_train_epoch_start(self) -> None:
        self.model.begin_epoch(self.current_epoch)

    def training_step(self, batch: SlideBatch, batch_idx: int) -> Tensor | None:
        if self.automatic_optimization:
            out = self.run(batch, None, batch.labels)
            return self._log_step("train", out, batch.labels, on_step=False)
        opt = self.optimizers()
        assert not isinstance(opt, list)
        opt.zero_grad()
        n = len(batch)
        outs = []
        for b in range(n):  # one slide at a time: only one slide's activations live at once
            out = self.run(batch.select([b]), None, batch.labels[b : b + 1])
            assert out.loss is not None
            self.manual_backward(out.loss.sum() / n)
            outs.append(SlideOutput(out.logits.detach(), out.attention.detach(), out.cells, out.loss.detach()))
        opt.step()
        merged = SlideOutput(
            torch.cat([o.logits for o in outs]),
            torch.cat([o.attention for o in outs]),
            torch.cat([o.cells for o in outs]),
            torch.cat([o.loss for o in outs if o.loss is not None]),
        )
        self._log_step("train", merged, batch.labels, on_step=False)
        return None

    # --- validation ---------------------------------------------------------------------------------------
    def validation_step(self, batch: SlideBatch, batch_idx: int) -> None:
        out = self.run(batch, self.validation, batch.labels)
        self._log_step("val", out, batch.labels, prog_bar=True)
        totals = magnification_totals(out.attention.float(), batch.shapes).mean(0)
        for j, share in enumerate(totals):
            self.log(f"val_attention_{self.magnification_labels[j]}", share, on_epoch=True, batch_size=len(batch))

    def on_validation_epoch_end(self) -> None:
        if self.automatic_optimization or not self.schedule or self.trainer.sanity_checking:
            return
        sched = self.lr_schedulers()
        acc = self.trainer.callback_metrics.get("val_acc")
        if isinstance(sched, torch.optim.lr_scheduler.ReduceLROnPlateau) and acc is not None:
            sched.step(float(acc))

    def configure_optimizers(self) -> OptimizerLRScheduler:
        opt = torch.optim.Adam(self.parameters(), lr=self.train_cfg.lr, weight_decay=self.train_cfg.weight_decay)
        if not self.schedule:
            return opt
        cfg = self.train_cfg
        sched = torch.optim.lr_scheduler.ReduceLROnPlateau(
            opt, mode="max", factor=cfg.lr_factor, patience=cfg.lr_patience
        )
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "monitor": "val_acc", "interval": "epoch"}}
