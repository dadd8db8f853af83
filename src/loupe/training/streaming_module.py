"""The Lightning module that trains StreamingCLAM end to end on whole images (manual optimisation).

Each slide of a batch is streamed alone (its own forward and streamed backward); their gradients accumulate
into one optimiser step per batch, so ``data.batch_size`` is the number of slides per step. The encoder can be
frozen for the first epochs (only the head trains; no streamed backward is run), then unfrozen, as in the paper.
"""

from __future__ import annotations

import lightning as L
import torch
import torch.nn.functional as F
from torch import Tensor

from loupe.config import ModelConfig, StreamingConfig, TrainConfig
from loupe.data.whole_image import WholeImageReader
from loupe.models.joint import JointOutput
from loupe.models.streamingclam import StreamingCLAM, StreamingOutput
from loupe.slides import parse_magnifications
from loupe.training.module import adam_with_plateau

#: Training images whose average statistics calibrate a randomly initialised trunk's normalisation layers.
CALIBRATION_IMAGES = 16


class StreamingCLAMModule(L.LightningModule):
    """Bag cross-entropy (+ CLAM's instance loss); Adam; LR ×factor after ``lr_patience`` epochs without val
    accuracy gain. ``cell_reader`` must be a :class:`WholeImageReader` over the run's catalog."""

    def __init__(
        self, model: StreamingCLAM, model_cfg: ModelConfig, train_cfg: TrainConfig, streaming_cfg: StreamingConfig
    ) -> None:
        super().__init__()
        self.automatic_optimization = False
        self.model = model
        self.model_cfg = model_cfg
        self.train_cfg = train_cfg
        self.streaming_cfg = streaming_cfg
        self.cell_reader: WholeImageReader | None = None
        mags = parse_magnifications(model_cfg.magnifications, model_cfg.magnification_labels)
        self.magnification_labels = [m.label for m in mags]

    # --- forward ------------------------------------------------------------------------------------------
    def _slides(self, batch: dict):
        """(label, StreamingOutput, crop box, grid shape) per slide of the batch, each streamed alone."""
        if self.cell_reader is None:
            raise RuntimeError("StreamingCLAMModule.cell_reader must be set before running")
        valid = batch.get("valid")
        for b, i in enumerate(batch["index"].tolist()):
            whole = self.cell_reader(int(i), None if valid is None else valid[b].cpu().numpy())
            out = self.model(whole.image.to(self.device), whole.keep.to(self.device))
            shape = tuple(int(v) for v in batch["shapes"][b][0].tolist())
            yield b, out, whole.box, shape

    def run(self, batch: dict, mode: str = "exhaustive", n_samples: int = 1) -> JointOutput:
        """Forward a batch as evaluate and predict use it. A streamed model always sees the whole image, so
        ``mode`` and ``n_samples`` do not apply; ``cells`` are each slide's k most attended positions."""
        logits, attention, cells = [], [], []
        for _, out, box, shape in self._slides(batch):
            logits.append(out.logits)
            full = out.attention.new_zeros(shape)
            full[box[0] : box[2], box[1] : box[3]] = out.attention
            attention.append(full.reshape(-1))
            top = self.model.top_cells(out)
            width = box[3] - box[1]
            cells.append((top // width + box[0]) * shape[1] + top % width + box[1])
        logits_t = torch.cat(logits)
        n = max(len(c) for c in cells)
        cells_t = torch.stack([torch.cat([c, c[:1].expand(n - len(c))]) if len(c) else c.new_zeros(n) for c in cells])
        return JointOutput(logits_t, torch.stack(attention), cells_t, logits_t.new_zeros(len(logits)))

    def _loss(self, out: StreamingOutput, label: int) -> tuple[Tensor, Tensor]:
        ce = F.cross_entropy(out.logits, torch.tensor([label], device=out.logits.device))
        if self.model.instance_classifiers is None:
            return ce, ce
        w = self.streaming_cfg.instance_weight
        return (1 - w) * ce + w * self.model.instance_loss(out, label), ce

    # --- training -----------------------------------------------------------------------------------------
    def on_train_start(self) -> None:
        calibrate = self.streaming_cfg.calibrate_normalisation
        if calibrate is None:
            calibrate = self.model_cfg.patch_pretrained is False
        if not calibrate or self.global_step > 0:  # a resumed run keeps the statistics in its checkpoint
            return
        images = []
        for batch in self.trainer.train_dataloader:
            valid = batch.get("valid")
            for b, i in enumerate(batch["index"].tolist()):
                v = None if valid is None else valid[b].numpy()
                images.append(self.cell_reader(int(i), v).image)
                if len(images) >= CALIBRATION_IMAGES:
                    break
            if len(images) >= CALIBRATION_IMAGES:
                break
        self.model.calibrate_normalisation(images, max_side=self.streaming_cfg.tile_size)

    def on_train_epoch_start(self) -> None:
        self.model.set_encoder_trainable(self.current_epoch >= self.streaming_cfg.freeze_encoder_epochs)

    def training_step(self, batch: dict, batch_idx: int) -> None:
        opt = self.optimizers()
        opt.zero_grad()
        labels = batch["label"].tolist()
        n = len(labels)
        losses, ces, correct = [], [], []
        for b, out, _, _ in self._slides(batch):
            loss, ce = self._loss(out, int(labels[b]))
            self.manual_backward(loss / n)  # streamed backward of this slide; gradients accumulate
            losses.append(loss.detach())
            ces.append(ce.detach())
            correct.append(float(out.logits.argmax(-1).item() == labels[b]))
        opt.step()
        self.log_dict(
            {
                "train_loss": torch.stack(losses).mean(),
                "train_ce": torch.stack(ces).mean(),
                "train_acc": sum(correct) / n,
            },
            on_epoch=True,
            on_step=False,
            batch_size=n,
        )

    def validation_step(self, batch: dict, batch_idx: int) -> None:
        labels = batch["label"].tolist()
        losses, ces, correct = [], [], []
        for b, out, _, _ in self._slides(batch):
            loss, ce = self._loss(out, int(labels[b]))
            losses.append(loss)
            ces.append(ce)
            correct.append(float(out.logits.argmax(-1).item() == labels[b]))
        n = len(labels)
        self.log_dict(
            {"val_loss": torch.stack(losses).mean(), "val_ce": torch.stack(ces).mean(), "val_acc": sum(correct) / n},
            on_epoch=True,
            prog_bar=True,
            batch_size=n,
        )

    def on_validation_epoch_end(self) -> None:
        sched = self.lr_schedulers()
        acc = self.trainer.callback_metrics.get("val_acc")
        if sched is not None and acc is not None and not self.trainer.sanity_checking:
            sched.step(float(acc))

    def configure_optimizers(self):
        return adam_with_plateau(self.parameters(), self.train_cfg)  # the scheduler is stepped by hand above
