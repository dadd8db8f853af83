"""The Lightning module that trains the joint attention-sampling model end to end."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from contextlib import nullcontext

import lightning as L
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from loupe.config import ModelConfig, TrainConfig
from loupe.models.joint import JointOutput, magnification_totals
from loupe.slides import parse_magnifications

#: Reads cells (B, n) of the batch's slides (catalog indices) → patches (B, n, 3, p, p) in [0, 1].
BatchCellReader = Callable[[Sequence[int], Tensor], Tensor]

#: Lightning precision settings that mean automatic mixed precision, and the dtype they compute in.
AMP_DTYPES = {"16-mixed": torch.float16, "bf16-mixed": torch.bfloat16}


class AttentionSamplingModule(L.LightningModule):
    """Cross-entropy + α·Σ P log P; Adam; LR ×factor after ``lr_patience`` epochs without val accuracy gain.

    ``model`` is a :class:`~loupe.models.joint.JointAttentionSampler` or a model with its forward signature and
    output (gated-attention MIL). The backbones run channels-last (``train.channels_last``), and on a GPU with a
    mixed ``train.precision`` inference outside the Trainer (evaluate, predict) runs under the same autocast that
    Lightning applies in training.
    """

    def __init__(self, model: nn.Module, model_cfg: ModelConfig, train_cfg: TrainConfig) -> None:
        super().__init__()
        self.model = model
        self.model_cfg = model_cfg
        self.train_cfg = train_cfg
        self.cell_reader: BatchCellReader | None = None
        mags = parse_magnifications(model_cfg.magnifications, model_cfg.magnification_labels)
        self.magnification_labels = [m.label for m in mags]

    def run(self, batch: dict, mode: str, n_samples: int = 1) -> JointOutput:
        """Forward one batch: thumbnails in, the chosen pooling mode, patches read through ``cell_reader``."""
        if self.cell_reader is None:
            raise RuntimeError("AttentionSamplingModule.cell_reader must be set before running")
        device = self.device
        self._use_channels_last()
        thumbs = batch["thumbnail"].to(device, non_blocking=True).float().div_(255.0)
        shapes = _grid_shapes(batch)
        indices = [int(i) for i in batch["index"]]
        reader = self.cell_reader

        def read(cells: Tensor) -> Tensor:
            patches = reader(indices, cells)
            if device.type == "cuda":
                patches = patches.pin_memory()
            return patches.to(device, non_blocking=True)

        valid = batch.get("valid")
        valid = valid.to(device, torch.bool) if valid is not None else None
        with self._autocast(device):
            return self.model(thumbs, shapes, read, valid=valid, mode=mode, n_samples=n_samples)

    def _autocast(self, device: torch.device):
        """Autocast for runs outside the Trainer (evaluate, predict) on a GPU with a mixed precision setting."""
        dtype = AMP_DTYPES.get(str(self.train_cfg.precision))
        if device.type != "cuda" or dtype is None or torch.is_autocast_enabled("cuda"):
            return nullcontext()
        return torch.autocast("cuda", dtype=dtype)

    def _use_channels_last(self) -> None:
        """Convert the model to channels-last once (with ``train.channels_last``): faster convolutions."""
        if not getattr(self.train_cfg, "channels_last", False) or getattr(self.model, "channels_last", True):
            return
        self.model.to(memory_format=torch.channels_last)
        self.model.channels_last = True

    def _loss(self, out: JointOutput, labels: Tensor) -> tuple[Tensor, Tensor]:
        ce = F.cross_entropy(out.logits, labels)
        return ce + self.model_cfg.entropy_alpha * out.regulariser.mean(), ce

    def training_step(self, batch: dict, batch_idx: int) -> Tensor:
        mode = "exhaustive" if self.model_cfg.estimator == "exhaustive" else "sample"
        out = self.run(batch, mode)
        labels = batch["label"]
        loss, ce = self._loss(out, labels)
        acc = (out.logits.argmax(-1) == labels).float().mean()
        bs = labels.shape[0]
        self.log_dict(
            {"train_loss": loss, "train_ce": ce, "train_acc": acc},
            on_epoch=True,
            on_step=False,
            batch_size=bs,
        )
        return loss

    def validation_step(self, batch: dict, batch_idx: int) -> None:
        out = self.run(batch, self.train_cfg.inference, self.train_cfg.inference_samples)
        labels = batch["label"]
        loss, ce = self._loss(out, labels)
        acc = (out.logits.argmax(-1) == labels).float().mean()
        bs = labels.shape[0]
        self.log_dict({"val_loss": loss, "val_ce": ce, "val_acc": acc}, on_epoch=True, prog_bar=True, batch_size=bs)
        totals = magnification_totals(out.attention, _grid_shapes(batch)).mean(0)
        for j, share in enumerate(totals):
            self.log(f"val_attention_{self.magnification_labels[j]}", share, on_epoch=True, batch_size=bs)

    def configure_optimizers(self):
        return adam_with_plateau(self.parameters(), self.train_cfg)


def adam_with_plateau(params, cfg: TrainConfig) -> dict:
    """The paper's optimisation: Adam, LR ×``lr_factor`` after ``lr_patience`` epochs without val accuracy gain."""
    opt = torch.optim.Adam(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    sched = torch.optim.lr_scheduler.ReduceLROnPlateau(opt, mode="max", factor=cfg.lr_factor, patience=cfg.lr_patience)
    return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "monitor": "val_acc", "interval": "epoch"}}


def _grid_shapes(batch: dict) -> list[tuple[int, int]]:
    """The (rows, cols) per magnification shared by every slide of a batch (batches are bucketed by shape)."""
    return [(int(r), int(c)) for r, c in batch["shapes"][0].tolist()]
