"""StreamingCLAM: streamed equals whole-image, the instance loss, the preset builds, bad settings are refused."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import torch

from loupe.config import StreamingConfig, load_config
from loupe.errors import ConfigError
from loupe.models.backbones import create_backbone
from loupe.models.streamingclam import StreamingCLAM, build_streamingclam

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


@pytest.mark.parametrize(("name", "local_pool"), [("tiny", 1), ("tiny", 2), ("resnet18", 1)])
def test_streamed_logits_and_gradients_equal_the_whole_image(name, local_pool):
    model = _model(name, tile=64, local_pool=local_pool)
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
        out = model(image, keep, streamed=streamed)
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
    out = model(torch.randint(0, 256, (1, 3, 64, 64), dtype=torch.uint8))
    out.logits.sum().backward()
    assert all(p.grad is None for p in model.trunk.parameters())
    assert model.attention.score.weight.grad is not None
    model.set_encoder_trainable(True)
    norms = [m for m in model.trunk.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    assert norms and all(not m.training and not m.weight.requires_grad for m in norms)


def test_instance_loss_pulls_top_and_bottom_positions_apart():
    model = _model(instance_classifiers=True, instance_k=2)
    out = model(torch.randint(0, 256, (1, 3, 96, 96), dtype=torch.uint8))
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
    model = build_streamingclam(model_cfg, cfg.streaming, 2)
    assert model.stream.output_shape(4096, 4096) == (512, 128, 128)
    assert model.instance_classifiers is not None and len(model.instance_classifiers) == 2


def test_settings_that_do_not_fit_are_refused():
    cfg = load_config(PRESET)
    model_cfg = dataclasses.replace(cfg.model, patch_pretrained=False, patch_backbone="tiny")
    with pytest.raises(ConfigError, match=r"model\.patch_size 16"):
        build_streamingclam(model_cfg, StreamingConfig(), 2)
    with pytest.raises(ConfigError, match="one magnification"):
        build_streamingclam(dataclasses.replace(model_cfg, magnifications=["1.0", "0.5"]), StreamingConfig(), 2)
