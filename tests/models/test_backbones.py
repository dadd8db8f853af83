"""Backbones h and f: the tiny CNN and timm models, feature sizes, and weights from a local checkpoint."""

from __future__ import annotations

import pytest
import torch

from loupe.errors import ConfigError
from loupe.models import Backbone, TinyCNN, create_backbone


def _randomised(state: dict[str, torch.Tensor], seed: int) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return {
        k: torch.randn(v.shape, generator=gen, dtype=v.dtype) if v.is_floating_point() else v.clone()
        for k, v in state.items()
    }


def test_tiny_backbone_gives_a_stride_16_map_and_pooled_embedding():
    b = create_backbone("tiny")
    assert isinstance(b, Backbone) and b.num_features == 64
    x = torch.rand(2, 3, 64, 96)
    fmap = b.feature_map(x)
    assert fmap.shape == (2, 64, 4, 6)
    emb = b(x)
    assert emb.shape == (2, 64)
    torch.testing.assert_close(emb, fmap.mean(dim=(2, 3)))


def test_backbone_normalises_inputs_with_its_mean_and_std():
    b = create_backbone("tiny").eval()
    x = torch.rand(1, 3, 32, 32)
    direct = b.net.forward_features((x - 0.5) / 0.25)
    torch.testing.assert_close(b.feature_map(x), direct)


def test_timm_backbone_gives_feature_map_and_embedding():
    b = create_backbone("resnet18")
    assert b.num_features == 512
    b.eval()
    x = torch.rand(2, 3, 64, 64)
    assert b.feature_map(x).shape == (2, 512, 2, 2)
    assert b(x).shape == (2, 512)
    torch.testing.assert_close(b.mean.flatten(), torch.tensor([0.485, 0.456, 0.406]))


def test_timm_backbone_loads_a_local_checkpoint(tmp_path):
    import timm

    reference = timm.create_model("resnet18", num_classes=1000, pretrained=False)
    state = _randomised(reference.state_dict(), seed=1)
    path = tmp_path / "resnet18.pth"
    torch.save(state, path)

    b = create_backbone("resnet18", pretrained=path)
    loaded = b.net.state_dict()
    assert "conv1.weight" in loaded and "fc.weight" not in loaded  # headless
    for name, value in loaded.items():
        assert torch.equal(value, state[name]), name
    # The same path given as a string works too.
    b2 = create_backbone("resnet18", pretrained=str(path))
    assert torch.equal(b2.net.state_dict()["layer4.1.conv2.weight"], state["layer4.1.conv2.weight"])


def test_tiny_backbone_loads_a_local_checkpoint(tmp_path):
    state = _randomised(TinyCNN().state_dict(), seed=2)
    path = tmp_path / "tiny.pt"
    torch.save(state, path)
    b = create_backbone("tiny", pretrained=str(path))
    for name, value in b.net.state_dict().items():
        assert torch.equal(value, state[name]), name
    # A Lightning-style {"state_dict": ...} wrapper is accepted as well.
    wrapped = tmp_path / "wrapped.ckpt"
    torch.save({"state_dict": state}, wrapped)
    b2 = create_backbone("tiny", pretrained=wrapped)
    assert torch.equal(b2.net.state_dict()["body.0.weight"], state["body.0.weight"])


def test_random_init_differs_from_a_checkpoint(tmp_path):
    state = _randomised(TinyCNN().state_dict(), seed=3)
    path = tmp_path / "tiny.pt"
    torch.save(state, path)
    assert not torch.equal(create_backbone("tiny").net.state_dict()["body.0.weight"], state["body.0.weight"])


@pytest.mark.parametrize("name", ["tiny", "resnet18"])
def test_missing_checkpoint_is_a_config_error(tmp_path, name):
    with pytest.raises(ConfigError, match="not found"):
        create_backbone(name, pretrained=tmp_path / "nope.pth")


def test_unknown_backbone_and_tiny_hub_weights_are_config_errors():
    with pytest.raises(ConfigError, match="unknown backbone"):
        create_backbone("not_a_real_model_xyz")
    with pytest.raises(ConfigError, match="no published weights"):
        create_backbone("tiny", pretrained=True)
