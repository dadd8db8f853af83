"""Training's progress in a log (stderr not a terminal): one line per epoch with its metrics and the time left,
no progress bar; on a terminal, Lightning's bar."""

from __future__ import annotations

import logging
from types import SimpleNamespace

import lightning as L
import pytest
import torch
from lightning.pytorch.callbacks import TQDMProgressBar
from torch.utils.data import DataLoader, TensorDataset

from loupe.config import TrainConfig
from loupe.training import progress as progress_module
from loupe.training.progress import EpochLog, epoch_line, progress_callbacks
from loupe.training.trainer import build_trainer


class _Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_each_epoch_is_one_line_with_its_metrics_its_time_and_the_time_left(caplog: pytest.LogCaptureFixture) -> None:
    clock = _Clock()
    callback = EpochLog(clock=clock)
    metrics = {
        "train_loss": torch.tensor(0.4123),
        "train_acc": torch.tensor(0.85),
        "val_acc": torch.tensor(0.95),
        "val_loss": torch.tensor(0.3),
        "val_attention_5x": torch.tensor(0.1),
        "val_attention_20x": torch.tensor(0.9),
        "lr-Adam": torch.tensor(1e-4),
    }
    trainer = SimpleNamespace(current_epoch=0, max_epochs=10, is_global_zero=True, callback_metrics=metrics)
    with caplog.at_level(logging.INFO, logger="loupe"):
        for epoch in range(2):
            trainer.current_epoch = epoch
            callback.on_train_epoch_start(trainer, None)  # type: ignore[arg-type]
            clock.now += 4.0
            callback.on_train_epoch_end(trainer, None)  # type: ignore[arg-type]
    lines = [r.getMessage() for r in caplog.records]
    assert lines == [
        "epoch 1/10: train loss 0.412, acc 0.850 | val loss 0.300, acc 0.950 | attention 5x 10%, 20x 90% "
        "| 4.0 s, about 36 s left",
        "epoch 2/10: train loss 0.412, acc 0.850 | val loss 0.300, acc 0.950 | attention 5x 10%, 20x 90% "
        "| 4.0 s, about 32 s left",
    ]


def test_only_the_first_process_logs(caplog: pytest.LogCaptureFixture) -> None:
    callback = EpochLog(clock=_Clock())
    trainer = SimpleNamespace(current_epoch=0, max_epochs=2, is_global_zero=False, callback_metrics={})
    with caplog.at_level(logging.INFO, logger="loupe"):
        callback.on_train_epoch_start(trainer, None)  # type: ignore[arg-type]
        callback.on_train_epoch_end(trainer, None)  # type: ignore[arg-type]
    assert not caplog.records


def test_the_last_epoch_and_an_open_ended_run_have_no_time_left() -> None:
    assert epoch_line(5, 5, {"val_acc": 1.0}, 2.0, 0.0) == "epoch 5/5: val acc 1.000 | 2.0 s"
    assert epoch_line(3, -1, {}, 75.0, float("nan")) == "epoch 3: 1 min 15 s"


def test_a_log_gets_epoch_lines_and_a_terminal_the_bar(monkeypatch: pytest.MonkeyPatch) -> None:
    assert [type(c) for c in progress_callbacks(True, interactive=False)] == [EpochLog]
    assert [type(c) for c in progress_callbacks(True, interactive=True)] == [TQDMProgressBar]
    assert progress_callbacks(False, interactive=True) == progress_callbacks(False, interactive=False) == []
    monkeypatch.setattr(progress_module, "is_interactive", lambda: False)
    trainer = build_trainer(TrainConfig(epochs=1, accelerator="cpu"), checkpoints=False)
    assert trainer.progress_bar_callback is None
    assert any(isinstance(c, EpochLog) for c in trainer.callbacks)


class _Tiny(L.LightningModule):
    """A linear classifier logging as loupe's module does: train metrics per epoch, validation metrics."""

    def __init__(self) -> None:
        super().__init__()
        self.layer = torch.nn.Linear(2, 2)

    def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> torch.Tensor:
        x, y = batch
        loss = torch.nn.functional.cross_entropy(self.layer(x), y)
        self.log("train_loss", loss, on_step=False, on_epoch=True)
        return loss

    def validation_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> None:
        x, y = batch
        self.log("val_acc", (self.layer(x).argmax(-1) == y).float().mean())

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.1)


def test_a_real_fit_in_a_log_prints_one_line_per_epoch_and_no_bar(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setattr(progress_module, "is_interactive", lambda: False)
    data = TensorDataset(torch.randn(8, 2), torch.randint(0, 2, (8,)))
    trainer = build_trainer(TrainConfig(epochs=3, accelerator="cpu"), checkpoints=False)
    with caplog.at_level(logging.INFO, logger="loupe"):
        trainer.fit(_Tiny(), DataLoader(data, batch_size=4), DataLoader(data, batch_size=4))
    lines = [r.getMessage() for r in caplog.records if r.name == "loupe"]
    assert [line.split(":")[0] for line in lines] == ["epoch 1/3", "epoch 2/3", "epoch 3/3"]
    assert all("train loss " in line and "val acc " in line for line in lines), lines
    assert "it/s" not in capsys.readouterr().err  # no bar redraws
