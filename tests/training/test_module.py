"""The Lightning module: loss = the model's (CE + α Σ P log P for the joint model), the cells it reads per mode,
gradients, optimiser and schedule, and the one place precision and memory format are decided."""

from __future__ import annotations

import typing

import pytest
import torch
import torch.nn.functional as F

from loupe.config import Config, JointConfig, ModelConfig, StreamingCLAMConfig, TrainConfig
from loupe.data.catalog import SlideCatalog
from loupe.data.loading import ThumbnailDataset, make_loader
from loupe.data.manifest import load_manifest
from loupe.data.pixels import SlidePixels
from loupe.datasets.synthetic import SyntheticSpec, generate_dataset
from loupe.models import InferenceSettings, SlideBatch, build_model
from loupe.models.runtime import Runtime
from loupe.training.module import SlideClassifierModule
from loupe.training.trainer import build_trainer

pytestmark = pytest.mark.filterwarnings("ignore:You are trying to `self.log\\(\\)`")

SHAPES = ((1, 1), (2, 2), (4, 4))  # 21 cells
P = 8


class Reader:
    """A batch cell reader that records (slide indices, cells) and returns random patches."""

    def __init__(self) -> None:
        self.calls: list[tuple[list[int], torch.Tensor]] = []

    embeddings = None  # the pixel source interface: no cached embeddings

    def cells(self, indices, cells):
        self.calls.append((list(indices), cells.clone()))
        gen = torch.Generator().manual_seed(int(cells.sum()))
        return torch.rand(*cells.shape, 3, P, P, generator=gen)

    def whole(self, slide, valid):
        raise AssertionError("the joint model reads cells only")


def _module(**joint_kw) -> tuple[SlideClassifierModule, Reader]:
    torch.manual_seed(0)
    train_kw = joint_kw.pop("train", {})
    model_kw = {"classifier_dropout": joint_kw.pop("classifier_dropout")} if "classifier_dropout" in joint_kw else {}
    cfg = Config(
        model=ModelConfig(**model_kw),
        train=TrainConfig(**train_kw),
        joint=JointConfig(patch_size=P, thumbnail_size=(32, 32), k=3, **joint_kw),
    )
    reader = Reader()
    module = SlideClassifierModule(build_model(cfg, 2), cfg.train, reader, ["a", "b", "c"])
    return module, reader


def _batch(b: int = 2) -> SlideBatch:
    gen = torch.Generator().manual_seed(0)
    return SlideBatch(
        thumbnails=torch.randint(0, 256, (b, 3, 32, 32), dtype=torch.uint8, generator=gen),
        valid=torch.ones(b, 21, dtype=torch.bool),
        labels=torch.arange(b) % 2,
        indices=torch.tensor([7, 3, 5, 1][:b]),
        shapes=SHAPES,
    )


def test_training_step_gives_a_finite_loss_with_gradients_everywhere():
    module, reader = _module()
    module.train()
    loss = module.training_step(_batch(), 0)
    assert loss.ndim == 0 and torch.isfinite(loss)
    # Sampling: train_draws draws of k cells of each batch slide, read at once for the right catalog indices.
    assert len(reader.calls) == 1
    indices, cells = reader.calls[0]
    assert indices == [7, 3] and cells.shape == (2, 3 * module.model.train_draws)
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
    # deterministic: BatchNorm uses batch statistics in train mode
    out = module.run(batch, InferenceSettings("exhaustive", 1, 3), None)
    expected = F.cross_entropy(out.logits, batch.labels) + 0.5 * out.regulariser.mean()
    torch.testing.assert_close(loss, expected)
    assert float(out.regulariser.detach().mean()) < 0  # Σ P log P is negative, so α > 0 rewards spread attention


def test_validation_uses_the_configured_inference_mode():
    module, reader = _module(inference="mean", inference_samples=4)
    module.eval()
    with torch.no_grad():
        module.validation_step(_batch(), 0)
    assert reader.calls[0][1].shape == (2, 3 * 4)
    module, reader = _module(inference="topk")
    module.eval()
    with torch.no_grad():
        module.validation_step(_batch(), 0)
    assert reader.calls[0][1].shape == (2, 3)


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
    cfg = Config(
        train=TrainConfig(epochs=1, lr=1e-3, accelerator="cpu", progress_bar=False),
        joint=JointConfig(patch_size=16, thumbnail_size=(32, 32), k=2, inference="mean"),
    )
    pixels = SlidePixels(catalog, threads=2)
    module = SlideClassifierModule(build_model(cfg, 2), cfg.train, pixels, ["a", "b", "c"])
    before = {k: v.clone() for k, v in module.model.attention.state_dict().items()}
    trainer = build_trainer(cfg.train, checkpoints=False)
    trainer.fit(module, make_loader(train, 2, True, 0), make_loader(val, 2, False, 0))
    metrics = trainer.callback_metrics
    assert {"train_loss", "val_acc", "val_loss"} <= set(metrics)
    assert torch.isfinite(metrics["train_loss"]) and 0.0 <= float(metrics["val_acc"]) <= 1.0
    after = module.model.attention.state_dict()
    assert any(not torch.equal(before[k], after[k]) for k in before)  # the attention network was trained
    pixels.close()
    catalog.close()


def test_channels_last_switch_changes_the_memory_layout_not_the_outputs():
    fast, _ = _module()
    plain, _ = _module(train={"channels_last": False})
    outs = []
    for module in (fast, plain):
        module.eval()
        with torch.no_grad():
            outs.append(module.run(_batch(), InferenceSettings("topk", 1, 3), None))
    conv = next(m for m in fast.model.patch_net.modules() if isinstance(m, torch.nn.Conv2d))
    assert fast.model.channels_last and conv.weight.is_contiguous(memory_format=torch.channels_last)
    conv = next(m for m in plain.model.patch_net.modules() if isinstance(m, torch.nn.Conv2d))
    assert not plain.model.channels_last and conv.weight.is_contiguous()
    assert torch.allclose(outs[0].logits, outs[1].logits, atol=1e-5)
    assert torch.allclose(outs[0].attention, outs[1].attention, atol=1e-6)


class _Spy(Runtime):
    """A runtime that records when its autocast is entered."""

    entered: typing.ClassVar[list[str]] = []

    def autocast(self, device=None):
        _Spy.entered.append(self.precision)
        return super().autocast(device)


def test_autocast_is_decided_in_one_place_for_every_device_and_precision():
    gpu, cpu = torch.device("cuda"), torch.device("cpu")
    assert isinstance(Runtime(gpu, "16-mixed").autocast(), torch.autocast)
    assert Runtime(gpu, "bf16-mixed").autocast().fast_dtype == torch.bfloat16
    assert not isinstance(Runtime(gpu, "32-true").autocast(), torch.autocast)  # full precision: none
    assert not isinstance(Runtime(cpu, "16-mixed").autocast(), torch.autocast)  # AMP is for the GPU


def test_streamingclam_inference_runs_under_the_run_autocast():
    """Evaluate and predict (the shared inference path) apply the run's autocast to StreamingCLAM as to the
    joint model: both go through Runtime.autocast, which on a GPU with 16-mixed is torch.autocast."""
    from loupe.models.interface import WholeImage
    from loupe.workflows.inference import predict_batch

    cfg = Config(model=ModelConfig(architecture="streamingclam", magnifications=["0.5"], patch_backbone="tiny"))
    model = build_model(cfg, 2)

    class Whole:
        embeddings = None  # the pixel source interface: no cached embeddings

        def cells(self, slides, cells):
            raise AssertionError

        def whole(self, slide, valid):
            return WholeImage(
                torch.zeros(1, 3, 32, 32, dtype=torch.uint8), torch.ones(2, 2, dtype=torch.bool), (0, 0, 2, 2)
            )

    batch = SlideBatch(
        torch.zeros(1, 3, 8, 8, dtype=torch.uint8), torch.ones(1, 4, dtype=torch.bool), torch.tensor([0]),
        torch.tensor([0]), ((2, 2),),
    )  # fmt: skip
    _Spy.entered = []
    (pred,) = predict_batch(
        model, batch, Whole(), InferenceSettings("exhaustive", 1, 2), _Spy(torch.device("cpu"), "16-mixed")
    )
    assert _Spy.entered == ["16-mixed"] and pred.probs.shape == (2,)
    assert model.channels_last  # the runtime's memory format reached the streamed model too


def _frozen_module(freeze: bool) -> tuple[SlideClassifierModule, Reader]:
    torch.manual_seed(0)
    cfg = Config(
        model=ModelConfig(freeze_patch_backbone=freeze),
        joint=JointConfig(patch_size=P, thumbnail_size=(32, 32), k=3),
    )
    reader = Reader()
    return SlideClassifierModule(build_model(cfg, 2), cfg.train, reader, ["a", "b", "c"]), reader


def test_a_frozen_patch_network_gets_no_gradient_and_stays_in_eval_mode_while_the_rest_trains():
    module, _ = _frozen_module(freeze=True)
    module.train()
    model = module.model
    assert not model.patch_net.training and model.thumbnail_net.training
    loss = module.training_step(_batch(), 0)
    assert loss is not None
    loss.backward()
    assert all(p.grad is None and not p.requires_grad for p in model.patch_net.parameters())
    for part in (model.attention, model.thumbnail_net, model.classifier):  # end to end through the estimator
        grads = [p.grad for p in part.parameters()]
        assert all(g is not None for g in grads) and sum(float(g.abs().sum()) for g in grads) > 0


def test_freezing_changes_no_output():
    frozen, _ = _frozen_module(freeze=True)
    plain, _ = _frozen_module(freeze=False)
    settings = InferenceSettings("exhaustive", 1, 3)
    frozen.eval()
    plain.eval()
    with torch.no_grad():
        a = frozen.run(_batch(), settings, None)
        b = plain.run(_batch(), settings, None)
    torch.testing.assert_close(a.logits, b.logits)


def test_a_frozen_patch_network_is_held_in_the_compute_dtype():
    module, _ = _frozen_module(freeze=True)
    module.model.set_compute_dtype(torch.bfloat16)
    assert all(p.dtype == torch.bfloat16 for p in module.model.patch_net.parameters())
    assert all(p.dtype == torch.float32 for p in module.model.attention.parameters())  # trained parts stay float32
    module.eval()
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        out = module.run(_batch(), InferenceSettings("topk", 1, 3), None)
    assert torch.isfinite(out.logits.float()).all()


def test_a_frozen_streamingclam_trunk_never_trains():
    cfg = Config(
        model=ModelConfig(
            architecture="streamingclam", magnifications=["0.5"], patch_backbone="tiny", freeze_patch_backbone=True
        ),
        streamingclam=StreamingCLAMConfig(freeze_encoder_epochs=1),
    )
    model = build_model(cfg, 2)
    model.begin_epoch(5)
    assert not any(p.requires_grad for p in model.trunk.parameters())
    assert any(p.requires_grad for p in model.attention.parameters())
