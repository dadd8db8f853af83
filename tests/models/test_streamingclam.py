"""StreamingCLAM: streamed equals whole-image, the instance loss, the preset builds, bad settings are refused."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import torch

from loupe.config import Config, ModelConfig, StreamingCLAMConfig, load_config
from loupe.errors import ConfigError
from loupe.models import SlideBatch, architecture
from loupe.models.backbones import create_backbone
from loupe.models.interface import WholeImage
from loupe.models.streamingclam import StreamingCLAM, cell_size

PRESET = Path(__file__).resolve().parents[2] / "src" / "loupe" / "configs" / "camelyon16_streamingclam.yaml"


def _randomise_norms(module: torch.nn.Module, seed: int = 0) -> None:
    g = torch.Generator().manual_seed(seed)
    for m in module.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.copy_(torch.randn(m.running_mean.shape, generator=g) * 0.1)
            m.running_var.copy_(torch.rand(m.running_var.shape, generator=g) + 0.5)


def _model(name: str = "tiny", tile: int = 64, local_pool: int = 1, **kw) -> StreamingCLAM:
    torch.manual_seed(0)
    backbone = create_backbone(name)
    _randomise_norms(backbone)
    model = StreamingCLAM(backbone, 3, tile_size=tile, local_pool=local_pool, attention_dropout=0.0, **kw)
    return model.double().eval()


@pytest.mark.parametrize(
    ("name", "local_pool", "segments"),
    [
        ("tiny", 1, True),
        ("tiny", 2, True),
        pytest.param("resnet18", 1, True, marks=pytest.mark.slow),  # 4-7 s each; the engine's own tests cover ResNet-18
        pytest.param("resnet18", 1, False, marks=pytest.mark.slow),
    ],
)
def test_streamed_logits_and_gradients_equal_the_whole_image(name, local_pool, segments):
    """Exact for a generic trunk and a ResNet (context trimmed per block; with per-block checkpointing, or without
    it and with BatchNorm folded)."""
    model = _model(name, tile=64, local_pool=local_pool, checkpoint_segments=segments, fold_normalisation=not segments)
    assert bool(model.stream.trims) == (name == "resnet18") and model.stream.checkpoint_segments == (
        segments and name == "resnet18"
    )
    image = torch.randint(0, 256, (1, 3, 150, 170), dtype=torch.uint8)
    stride = 16 if name == "tiny" else 32
    h = -(-150 // (stride * local_pool))
    w = -(-170 // (stride * local_pool))
    keep = torch.rand(h, w, generator=torch.Generator().manual_seed(1)) > 0.3
    keep[0, 0] = True

    grads = []
    outs = []
    for streamed in (True, False):
        model.zero_grad()
        out = model.classify_image(image, keep, streamed=streamed)
        (out.logits * torch.tensor([[0.3, -1.2, 0.7]], dtype=torch.float64)).sum().backward()
        outs.append(out)
        grads.append({n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None})
    assert outs[0].attention.shape == (h, w)
    assert torch.allclose(outs[0].logits, outs[1].logits, rtol=1e-9, atol=1e-12)
    assert (outs[0].attention[~keep] == 0).all()
    assert grads[0].keys() == grads[1].keys() and any(n.startswith("stream.") for n in grads[0])
    for n in grads[0]:
        assert torch.allclose(grads[0][n], grads[1][n], rtol=1e-9, atol=1e-12), n


def test_frozen_encoder_gets_no_gradient_and_norms_stay_frozen():
    model = _model()
    model.set_encoder_trainable(False)
    model.train()
    out = model.classify_image(torch.randint(0, 256, (1, 3, 64, 64), dtype=torch.uint8))
    out.logits.sum().backward()
    assert all(p.grad is None for p in model.trunk.parameters())
    assert model.attention.score.weight.grad is not None
    model.set_encoder_trainable(True)
    norms = [m for m in model.trunk.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    assert norms and all(not m.training and not m.weight.requires_grad for m in norms)


def test_instance_loss_pulls_top_and_bottom_positions_apart():
    model = _model(instance_classifiers=True, instance_k=2)
    out = model.classify_image(torch.randint(0, 256, (1, 3, 96, 96), dtype=torch.uint8))
    loss = model.instance_loss(out, label=1)
    assert loss.ndim == 0 and loss > 0
    loss.backward()
    assert all(head.weight.grad is not None for head in model.instance_classifiers)
    top = model.top_cells(out)
    assert len(top) == model.k
    flat = out.attention.reshape(-1)
    assert set(top.tolist()) == set(torch.topk(flat, model.k).indices.tolist())


def test_the_camelyon16_preset_builds_a_resnet34():
    cfg = load_config(PRESET)
    model_cfg = dataclasses.replace(cfg.model, patch_pretrained=False)
    model = StreamingCLAM.from_settings(model_cfg, cfg.streamingclam, 2)
    assert model.stream.output_shape(4096, 4096) == (512, 128, 128)
    assert model.instance_classifiers is not None and len(model.instance_classifiers) == 2
    assert model.k == 16 and model.calibrate is True  # random weights here: calibrated before training


@pytest.mark.parametrize(("segments", "fold"), [(True, False), (False, True)])
def test_the_streaming_settings_reach_the_engine(segments: bool, fold: bool):
    model_cfg = ModelConfig(architecture="streamingclam", magnifications=["0.5"], patch_backbone="resnet18")
    cfg = StreamingCLAMConfig(tile_size=256, checkpoint_segments=segments, fold_normalisation=fold)
    model = StreamingCLAM.from_settings(model_cfg, cfg, 2)
    assert model.stream.checkpoint_segments is segments
    assert model.stream.fold_normalisation is fold
    assert model.stream.stem is None  # the default stem sub-tile (512) is not below the tile: nothing to sub-stream
    sub = StreamingCLAM.from_settings(
        model_cfg, dataclasses.replace(cfg, tile_size=1024, stem_tile=128, stem_depth=3), 2
    )
    assert sub.stream.stem is not None and sub.stream.stem.tile_size == 128 and sub.stream.stem_depth == 3
    assert sub.stream.stem.fold_normalisation is fold
    off = StreamingCLAM.from_settings(model_cfg, dataclasses.replace(cfg, tile_size=1024, stem_tile=0), 2)
    assert off.stream.stem is None
    with pytest.raises(ConfigError, match="stem_tile 130"):  # not a multiple of the stem's stride (4)
        StreamingCLAM.from_settings(model_cfg, dataclasses.replace(cfg, tile_size=1024, stem_tile=130), 2)


def test_the_grid_cell_is_derived_from_the_trunk_and_local_pool():
    assert cell_size(ModelConfig(patch_backbone="resnet34"), StreamingCLAMConfig()) == 32
    assert cell_size(ModelConfig(patch_backbone="tiny"), StreamingCLAMConfig(local_pool=2)) == 32
    cfg = Config(model=ModelConfig(architecture="streamingclam", magnifications=["0.5"], patch_backbone="tiny"))
    assert architecture(cfg).cell_size(cfg) == 16


def test_settings_that_do_not_fit_are_refused():
    with pytest.raises(ConfigError, match="one magnification"):
        Config(model=ModelConfig(architecture="streamingclam", magnifications=["1.0", "0.5"]))


class WholePixels:
    """A pixel source of whole images: a fixed image per slide, cropped to rows 1..3 of a 4×5 grid of 16 px."""

    def __init__(self) -> None:
        gen = torch.Generator().manual_seed(2)
        self.images = {i: torch.randint(0, 256, (1, 3, 48, 80), dtype=torch.uint8, generator=gen) for i in (4, 6)}

    embeddings = None  # the pixel source interface: no cached embeddings

    def cells(self, slides, cells):
        raise AssertionError("StreamingCLAM reads whole images")

    def whole(self, slide, valid):
        keep = torch.ones(3, 5, dtype=torch.bool)
        return WholeImage(self.images[slide], keep, (1, 0, 4, 5))


def test_the_interface_forward_maps_each_crop_onto_the_slide_grid_with_its_loss():
    from loupe.models import InferenceSettings

    model = _model(instance_classifiers=True, instance_k=2).float()
    batch = SlideBatch(
        torch.zeros(2, 3, 8, 8, dtype=torch.uint8),
        torch.ones(2, 20, dtype=torch.bool),
        torch.tensor([0, 2]),
        torch.tensor([4, 6]),
        ((4, 5),),
    )
    pixels = WholePixels()
    with torch.no_grad():
        out = model(batch, pixels, InferenceSettings("exhaustive", 1, 3), labels=batch.labels)
        alone = model.classify_image(pixels.images[6], torch.ones(3, 5, dtype=torch.bool))
    assert out.attention.shape == (2, 20) and out.cells.shape == (2, 3)
    assert torch.all(out.attention[:, :5] == 0)  # row 0 is outside the crop
    torch.testing.assert_close(out.attention[1, 5:].view(3, 5), alone.attention)
    torch.testing.assert_close(out.logits[1], alone.logits[0])
    assert torch.all(out.cells >= 5)  # the most attended cells, in slide-grid indices
    assert out.loss is not None and out.loss.shape == (2,)
    torch.testing.assert_close(out.loss[1], model.loss(alone, 2))


class _Regions:
    """An image read crop by crop (as :class:`~loupe.data.whole_image.SlideRegions` reads a large slide)."""

    def __init__(self, image: torch.Tensor) -> None:
        self.image = image
        self.reads = 0

    @property
    def shape(self) -> tuple[int, int, int, int]:
        return (1, 3, int(self.image.shape[2]), int(self.image.shape[3]))

    def crop(self, rows: slice, cols: slice) -> torch.Tensor:
        self.reads += 1
        return self.image[..., rows, cols].clone()


@pytest.mark.slow  # ~10 s for both: a ResNet-18 streamed in float64, sub-tiles of sub-tiles
@pytest.mark.parametrize("stem_depth", [1, 3])
def test_sub_streamed_stem_kept_rows_and_an_image_read_per_crop_equal_the_whole_image(stem_depth):
    """The memory levers together (a ResNet-18's stem, or stem + layer1, in 32-px sub-tiles; only the kept positions
    stitched; the image read crop by crop): logits, attention and every gradient equal the whole-image step."""
    model = _model("resnet18", tile=96, stem_tile=32, stem_depth=stem_depth)
    assert model.stream.stem is not None and model.stream.stem_depth == stem_depth
    image = torch.randint(0, 256, (1, 3, 250, 200), dtype=torch.uint8, generator=torch.Generator().manual_seed(4))
    keep = torch.rand(8, 7, generator=torch.Generator().manual_seed(2)) > 0.4
    regions = _Regions(image)
    outs, grads = [], []
    for source, streamed in ((regions, True), (image, False)):
        model.zero_grad()
        out = model.classify_image(source, keep, streamed=streamed)
        model.loss(out, 1).backward()
        outs.append(out)
        grads.append({n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None})
    assert regions.reads > len(model.stream.tiles(250, 200))  # read per tile, in the forward and the backward
    assert outs[0].features.shape == (int(keep.sum()), 512)  # only the kept positions were stitched
    assert torch.allclose(outs[0].logits, outs[1].logits, rtol=1e-9, atol=1e-12)
    assert torch.allclose(outs[0].attention, outs[1].attention, rtol=1e-9, atol=1e-12)
    assert grads[0].keys() == grads[1].keys() and any(n.startswith("stream.") for n in grads[0])
    for n in grads[0]:
        assert torch.allclose(grads[0][n], grads[1][n], rtol=1e-9, atol=1e-12), n
    with pytest.raises(ValueError, match="needs the image as a tensor"):
        model.classify_image(regions, keep, streamed=False)
