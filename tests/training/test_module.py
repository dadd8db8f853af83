"""The Lightning module: loss = CE + α Σ P log P, the cells it reads per mode, gradients, optimiser and schedule."""

from __future__ import annotations

import lightning as L
import pytest
import torch
import torch.nn.functional as F

from loupe.config import ModelConfig, TrainConfig
from loupe.data.catalog import SlideCatalog
from loupe.data.loading import CellReader, ThumbnailDataset, make_loader
from loupe.data.manifest import load_manifest
from loupe.data.synthetic import SyntheticSpec, generate_dataset
from loupe.models import build_model
from loupe.training.module import AttentionSamplingModule

pytestmark = pytest.mark.filterwarnings("ignore:You are trying to `self.log\\(\\)`")

SHAPES = [[1, 1], [2, 2], [4, 4]]  # 21 cells
P = 8


class Reader:
    """A batch cell reader that records (slide indices, cells) and returns random patches."""

    def __init__(self) -> None:
        self.calls: list[tuple[list[int], torch.Tensor]] = []

    def __call__(self, indices, cells):
        self.calls.append((list(indices), cells.clone()))
        gen = torch.Generator().manual_seed(int(cells.sum()))
        return torch.rand(*cells.shape, 3, P, P, generator=gen)


def _module(**model_kw) -> tuple[AttentionSamplingModule, Reader]:
    torch.manual_seed(0)
    train_kw = model_kw.pop("train", {})
    cfg = ModelConfig(patch_size=P, thumbnail_size=(32, 32), k=3, **model_kw)
    module = AttentionSamplingModule(build_model(cfg, 2), cfg, TrainConfig(**train_kw))
    module.cell_reader = reader = Reader()
    return module, reader


def _batch(b: int = 2) -> dict:
    gen = torch.Generator().manual_seed(0)
    return {
        "thumbnail": torch.randint(0, 256, (b, 3, 32, 32), dtype=torch.uint8, generator=gen),
        "label": torch.arange(b) % 2,
        "index": torch.tensor([7, 3, 5, 1][:b]),
        "shapes": torch.tensor([SHAPES] * b),
    }


def test_training_step_gives_a_finite_loss_with_gradients_everywhere():
    module, reader = _module()
    module.train()
    loss = module.training_step(_batch(), 0)
    assert loss.ndim == 0 and torch.isfinite(loss)
    # Sampling: k cells of each batch slide, read for the right catalog indices.
    assert len(reader.calls) == 1
    indices, cells = reader.calls[0]
    assert indices == [7, 3] and cells.shape == (2, 3)
    loss.backward()
    model = module.model
    for name, part in [
        ("attention", model.attention),
        ("thumbnail", model.thumbnail_net),
        ("patch", model.patch_net),
        ("classifier", model.classifier),
    ]:
        grads = [p.grad for p in part.parameters()]
        assert all(g is not None and torch.all(torch.isfinite(g)) for g in grads), name
        assert sum(float(g.abs().sum()) for g in grads) > 0, name


def test_loss_is_cross_entropy_plus_alpha_times_the_regulariser():
    module, reader = _module(estimator="exhaustive", classifier_dropout=0.0, entropy_alpha=0.5)
    module.train()
    batch = _batch()
    loss = module.training_step(batch, 0)
    assert reader.calls[0][1].shape == (2, 21)  # exhaustive: every cell
    out = module.run(batch, "exhaustive")  # deterministic: BatchNorm uses batch statistics in train mode
    expected = F.cross_entropy(out.logits, batch["label"]) + 0.5 * out.regulariser.mean()
    torch.testing.assert_close(loss, expected)
    assert float(out.regulariser.detach().mean()) < 0  # Σ P log P is negative, so α > 0 rewards spread attention


def test_validation_uses_the_configured_inference_mode():
    module, reader = _module(train={"inference": "mean", "inference_samples": 4})
    module.eval()
    with torch.no_grad():
        module.validation_step(_batch(), 0)
    assert reader.calls[0][1].shape == (2, 3 * 4)
    module, reader = _module(train={"inference": "topk"})
    module.eval()
    with torch.no_grad():
        module.validation_step(_batch(), 0)
    assert reader.calls[0][1].shape == (2, 3)


def test_running_without_a_cell_reader_is_an_error():
    module, _ = _module()
    module.cell_reader = None
    with pytest.raises(RuntimeError, match="cell_reader"):
        module.training_step(_batch(), 0)


def test_configure_optimizers_gives_adam_and_plateau_schedule_on_val_acc():
    module, _ = _module(train={"lr": 3e-4, "weight_decay": 1e-5, "lr_patience": 7, "lr_factor": 0.2})
    conf = module.configure_optimizers()
    opt = conf["optimizer"]
    assert isinstance(opt, torch.optim.Adam)
    assert opt.param_groups[0]["lr"] == 3e-4 and opt.param_groups[0]["weight_decay"] == 1e-5
    optimised = {id(p) for g in opt.param_groups for p in g["params"]}
    assert optimised == {id(p) for p in module.model.parameters()}
    sched = conf["lr_scheduler"]
    assert sched["monitor"] == "val_acc"
    plateau = sched["scheduler"]
    assert isinstance(plateau, torch.optim.lr_scheduler.ReduceLROnPlateau)
    assert plateau.mode == "max" and plateau.factor == 0.2 and plateau.patience == 7
    # Higher accuracy is better: the LR drops only after patience epochs without improvement.
    for acc in [0.5] + [0.4] * 7:
        plateau.step(acc)
    assert opt.param_groups[0]["lr"] == 3e-4
    plateau.step(0.4)
    assert opt.param_groups[0]["lr"] == pytest.approx(3e-4 * 0.2)


@pytest.mark.slow
def test_one_epoch_with_a_trainer_on_synthetic_slides(tmp_path):
    spec = SyntheticSpec(image_size=64, patch_size=16, splits={"train": 4, "val": 2})
    manifest = load_manifest(generate_dataset(tmp_path / "ds", spec))
    catalog = SlideCatalog(manifest.records, spec.magnifications, spec.patch_size, thumbnail_size=(32, 32))
    labels = manifest.label_indices().tolist()
    train = ThumbnailDataset(catalog, [0, 1, 2, 3], labels[:4])
    val = ThumbnailDataset(catalog, [4, 5], labels[4:])
    cfg = ModelConfig(patch_size=16, thumbnail_size=(32, 32), k=2)
    module = AttentionSamplingModule(build_model(cfg, 2), cfg, TrainConfig(epochs=1, lr=1e-3, inference="mean"))
    module.cell_reader = CellReader(catalog, threads=2)
    before = {k: v.clone() for k, v in module.model.attention.state_dict().items()}
    trainer = L.Trainer(
        max_epochs=1,
        accelerator="cpu",
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=tmp_path,
    )
    trainer.fit(module, make_loader(train, 2, True, 0), make_loader(val, 2, False, 0))
    metrics = trainer.callback_metrics
    assert {"train_loss", "val_acc", "val_loss"} <= set(metrics)
    assert torch.isfinite(metrics["train_loss"]) and 0.0 <= float(metrics["val_acc"]) <= 1.0
    after = module.model.attention.state_dict()
    assert any(not torch.equal(before[k], after[k]) for k in before)  # the attention network was trained
    module.cell_reader.close()
    catalog.close()


def test_channels_last_switch_changes_the_memory_layout_not_the_outputs():
    fast, _ = _module()
    plain, _ = _module(train={"channels_last": False})
    outs = []
    for module in (fast, plain):
        module.eval()
        with torch.no_grad():
            outs.append(module.run(_batch(), "topk"))
    conv = next(m for m in fast.model.patch_net.modules() if isinstance(m, torch.nn.Conv2d))
    assert fast.model.channels_last and conv.weight.is_contiguous(memory_format=torch.channels_last)
    conv = next(m for m in plain.model.patch_net.modules() if isinstance(m, torch.nn.Conv2d))
    assert not plain.model.channels_last and conv.weight.is_contiguous()
    assert torch.allclose(outs[0].logits, outs[1].logits, atol=1e-5)
    assert torch.allclose(outs[0].attention, outs[1].attention, atol=1e-6)
