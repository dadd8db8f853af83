"""The registry of published pathology encoders: every entry builds (on the meta device) with its embedding size,
the small ones load a file in their published format and compute what their authors' network computes, the
embedding rules match the model cards, and a missing or wrong file or ``pretrained: true`` is one clear line."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import timm
import torch
import torch.nn.functional as F

from loupe.errors import ConfigError
from loupe.models import create_backbone
from loupe.models.encoders import (
    ENCODERS,
    LOUPE_TIMM_OVERRIDES,
    ConvEncoderBackbone,
    EncoderBackbone,
    EncoderSpec,
    build_encoder,
    convert_state_dict,
    create_encoder,
)

FIELDS = {f.name for f in dataclasses.fields(EncoderSpec)}


def _randomise(module: torch.nn.Module, seed: int) -> None:
    """Every parameter random (layer norms and layer scales included), so that no equality holds by accident."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            scale = name.endswith(("weight", "gamma", "lambda1")) and p.ndim == 1  # norms and layer scales near 1
            p.copy_(torch.randn(p.shape, generator=gen) * (0.1 if scale else 0.05) + (1.0 if scale else 0.0))


def _normalised(spec: EncoderSpec, x: torch.Tensor) -> torch.Tensor:
    return (x - torch.tensor(spec.mean).view(1, 3, 1, 1)) / torch.tensor(spec.std).view(1, 3, 1, 1)


def _small(name: str, **timm_kwargs: object) -> EncoderSpec:
    """A registry entry shrunk (same architecture family, few narrow layers) for fast real computations."""
    spec = ENCODERS[name]
    kwargs = {**spec.timm_kwargs, "embed_dim": 32, "depth": 2, "num_heads": 2, **timm_kwargs}
    factor = 2 if spec.pooling == "cls+mean_patch" else 1
    return dataclasses.replace(spec, timm_kwargs=kwargs, embed_dim=32 * factor)


# --- every entry ----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", list(ENCODERS))
def test_spec_is_complete(name):
    spec = ENCODERS[name]
    assert spec.name and spec.timm_model and spec.input_size > 0 and spec.embed_dim > 0
    assert len(spec.mean) == len(spec.std) == 3 and all(s > 0 for s in spec.std)
    assert all(0 < m <= 16 for m in spec.native_mpp) and spec.tile_size > 0
    assert spec.native_mpp or "ImageNet" in spec.name  # photographs have no µm/px; every pathology encoder has one
    assert spec.weights_url.startswith("https://") and spec.weights_file
    assert spec.licence and spec.licence_url.startswith("https://")
    if spec.hf_repo is not None:
        assert spec.weights_url == f"https://huggingface.co/{spec.hf_repo}"
    assert spec.weights_file.endswith(".safetensors") == (spec.weights_format == "safetensors")
    assert set(spec.unconfirmed) <= FIELDS, "unconfirmed names a field that does not exist"
    assert (spec.pooling == "attn_pool") == (spec.pool_heads > 0)


@pytest.mark.parametrize("name", list(ENCODERS))
def test_every_encoder_builds_on_meta_with_its_embedding_size(name):
    spec = ENCODERS[name]
    size = spec.input_size
    with torch.device("meta"):
        b = create_encoder(name, None)
        emb = b(torch.rand(1, 3, size, size))
        resized = b(torch.rand(2, 3, 64, 64))  # any patch size: resized to the input size
        fmap = b.feature_map(torch.rand(1, 3, size, size))
    assert b.num_features == spec.embed_dim
    assert emb.shape == (1, spec.embed_dim) and resized.shape == (2, spec.embed_dim)
    if spec.family == "cnn":  # a stride-32 feature map of the input at its own size
        assert isinstance(b, ConvEncoderBackbone) and fmap.shape == (1, b.map_channels, size // 32, size // 32)
        return
    assert isinstance(b, EncoderBackbone)
    assert fmap.shape == (1, b.map_channels, size // b.patch_size, size // b.patch_size)
    if spec.pooling == "cls":  # the published model(x) is the class token: timm's head takes it as it is
        assert b.vit.global_pool == "token" and isinstance(b.vit.fc_norm, torch.nn.Identity)


def test_registry_holds_the_required_encoders():
    required = {"uni", "uni2-h", "virchow2", "h-optimus-0", "h-optimus-1", "prov-gigapath", "phikon-v2", "conch"}
    assert required <= set(ENCODERS) and any(n.startswith("kaiko") for n in ENCODERS)


@pytest.mark.parametrize(
    ("name", "prefix_tokens", "patch", "width"),
    [
        ("uni", 1, 16, 1024),
        ("uni2-h", 9, 14, 1536),  # class + 8 registers
        ("virchow2", 5, 14, 1280),  # class + 4 registers: the card's output[:, 5:]
        ("h-optimus-0", 5, 14, 1536),
        ("prov-gigapath", 1, 16, 1536),
        ("conch", 1, 16, 768),
    ],
)
def test_published_token_layout(name, prefix_tokens, patch, width):
    with torch.device("meta"):
        b = create_encoder(name, None)
    assert (b.num_prefix_tokens, b.patch_size, b.map_channels) == (prefix_tokens, patch, width)


# --- the embedding rules -----------------------------------------------------------------------------------------


def test_virchow2_embedding_is_class_token_and_mean_of_patch_tokens_without_registers():
    spec = _small("virchow2")
    b = build_encoder("virchow2", spec, None).eval()
    x = torch.rand(2, 3, 224, 224)
    with torch.no_grad():
        output = b.net(_normalised(spec, x))  # the card's model(x): all tokens (global_pool="")
        emb = b(x)
    assert output.shape == (2, 1 + 4 + 16 * 16, 32)
    expected = torch.cat([output[:, 0], output[:, 5:].mean(1)], dim=-1)
    torch.testing.assert_close(emb, expected)
    assert emb.shape == (2, 64)


def test_mean_patch_pooling_and_the_feature_map_are_the_patch_tokens():
    spec = dataclasses.replace(_small("uni"), pooling="mean_patch")
    b = build_encoder("uni", spec, None).eval()
    x = torch.rand(1, 3, 224, 224)
    with torch.no_grad():
        tokens = b.net.forward_features(_normalised(spec, x))
        fmap = b.feature_map(x)
        emb = b(x)
    assert fmap.shape == (1, 32, 14, 14)
    torch.testing.assert_close(fmap.flatten(2).transpose(1, 2), tokens[:, 1:])  # row-major patch order
    torch.testing.assert_close(emb, tokens[:, 1:].mean(1))
    torch.testing.assert_close(emb, fmap.mean(dim=(2, 3)))


def test_forward_resizes_patches_bilinearly_and_feature_map_keeps_their_size():
    spec = _small("kaiko-vitb16")
    b = build_encoder("kaiko-vitb16", spec, None).eval()
    x = torch.rand(2, 3, 96, 96)
    with torch.no_grad():
        direct = b(F.interpolate(x, size=(224, 224), mode="bilinear", antialias=True, align_corners=False))
        torch.testing.assert_close(b(x), direct)
        assert b.feature_map(x).shape == (2, 32, 6, 6)  # 96 / 16
        assert b.feature_map(torch.rand(1, 3, 100, 90)).shape == (1, 32, 6, 6)  # rounded to the patch grid


def test_dynamic_size_changes_nothing_at_the_native_size():
    """loupe builds every encoder with dynamic_img_size=True (feature maps of any size); at the native size the
    position embedding is used as is, so H-optimus' published dynamic_img_size=False network computes the same."""
    spec = _small("h-optimus-0")
    b = build_encoder("h-optimus-0", spec, None).eval()
    import timm

    published = timm.create_model(spec.timm_model, **{**spec.timm_kwargs, "pretrained": False}).eval()
    published.load_state_dict(b.net.state_dict())
    x = torch.rand(1, 3, 224, 224)
    with torch.no_grad():
        torch.testing.assert_close(b(x), published(_normalised(spec, x)))


# --- the small ones, built for real, loaded from files in their published format ---------------------------------


@pytest.mark.slow
def test_kaiko_loads_its_published_state_dict_and_matches_the_authors_network(tmp_path):
    import timm

    # hubconf.py: timm.create_model("vit_base_patch16_224", dynamic_img_size=True, num_classes=0), vitb16.pth
    source = timm.create_model("vit_base_patch16_224", dynamic_img_size=True, num_classes=0, pretrained=False)
    _randomise(source, seed=1)
    path = tmp_path / "vitb16.pth"
    torch.save(source.state_dict(), path)

    b = create_encoder("kaiko-vitb16", path).eval()
    source.eval()
    spec = ENCODERS["kaiko-vitb16"]
    x = torch.rand(1, 3, 224, 224)
    with torch.no_grad():
        torch.testing.assert_close(b(x), source(_normalised(spec, x)), rtol=0, atol=0)
        small = torch.rand(1, 3, 112, 112)
        up = F.interpolate(small, size=(224, 224), mode="bilinear", antialias=True, align_corners=False)
        torch.testing.assert_close(b(small), source(_normalised(spec, up)), rtol=0, atol=0)


class _ConchReference(torch.nn.Module):
    """CONCH's vision tower as its code builds it (timm VisionTransformer + CoCa attentional pooler), with the
    pooling written out by hand: ln_contrast(attention of ln_q(query) over ln_k(all tokens))[:, 0]."""

    def __init__(self) -> None:
        super().__init__()
        from timm.models.vision_transformer import VisionTransformer

        self.trunk = VisionTransformer(
            embed_dim=768,
            depth=12,
            num_heads=12,
            mlp_ratio=4,
            img_size=448,
            patch_size=16,
            num_classes=0,
            dynamic_img_size=True,
        )
        d, c = 512, 768
        self.query = torch.nn.Parameter(torch.randn(1, d))
        self.q_proj_weight = torch.nn.Parameter(torch.randn(d, d) * 0.05)
        self.k_proj_weight = torch.nn.Parameter(torch.randn(d, c) * 0.05)
        self.v_proj_weight = torch.nn.Parameter(torch.randn(d, c) * 0.05)
        self.in_proj_bias = torch.nn.Parameter(torch.randn(3 * d) * 0.05)
        self.out_proj = torch.nn.Linear(d, d)
        self.ln_q, self.ln_k, self.ln_contrast = torch.nn.LayerNorm(d), torch.nn.LayerNorm(c), torch.nn.LayerNorm(d)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        tokens = self.ln_k(self.trunk.forward_features(x))  # (B, N, 768)
        q = self.ln_q(self.query)  # (1, 512)
        bq, bk, bv = self.in_proj_bias.chunk(3)
        heads, d = 8, 512
        qh = (q @ self.q_proj_weight.T + bq).view(1, heads, d // heads).transpose(0, 1)  # (h, 1, 64)
        kh = (tokens @ self.k_proj_weight.T + bk).view(x.shape[0], -1, heads, d // heads).transpose(1, 2)
        vh = (tokens @ self.v_proj_weight.T + bv).view(x.shape[0], -1, heads, d // heads).transpose(1, 2)
        attn = torch.softmax(qh.unsqueeze(0) @ kh.transpose(-1, -2) / (d // heads) ** 0.5, dim=-1)  # (B, h, 1, N)
        pooled = (attn @ vh).transpose(1, 2).reshape(x.shape[0], d)
        return self.ln_contrast(self.out_proj(pooled))

    def published_state_dict(self) -> dict[str, torch.Tensor]:
        """The whole CoCa checkpoint's layout: visual.* (with the parts that are not the encoder) and the text tower."""
        sd = {f"visual.trunk.{k}": v for k, v in self.trunk.state_dict().items()}
        pool = {
            "query": self.query,
            "attn.q_proj_weight": self.q_proj_weight,
            "attn.k_proj_weight": self.k_proj_weight,
            "attn.v_proj_weight": self.v_proj_weight,
            "attn.in_proj_bias": self.in_proj_bias,
            "attn.out_proj.weight": self.out_proj.weight,
            "attn.out_proj.bias": self.out_proj.bias,
            "ln_q.weight": self.ln_q.weight,
            "ln_q.bias": self.ln_q.bias,
            "ln_k.weight": self.ln_k.weight,
            "ln_k.bias": self.ln_k.bias,
        }
        sd |= {f"visual.attn_pool_contrast.{k}": v.detach() for k, v in pool.items()}
        sd |= {f"visual.ln_contrast.{k}": v for k, v in self.ln_contrast.state_dict().items()}
        sd["visual.proj_contrast"] = torch.randn(512, 512)
        sd["visual.attn_pool_caption.query"] = torch.randn(256, 768)
        sd["visual.ln_caption.weight"] = torch.ones(768)
        sd["text.token_embedding.weight"] = torch.randn(10, 768)
        sd["logit_scale"] = torch.tensor(2.0)
        return sd


@pytest.mark.slow
def test_conch_loads_the_whole_coca_checkpoint_and_matches_its_vision_embedding(tmp_path):
    torch.manual_seed(2)
    reference = _ConchReference()
    _randomise(reference, seed=2)
    path = tmp_path / "pytorch_model.bin"
    torch.save(reference.published_state_dict(), path)

    b = create_encoder("conch", path).eval()
    reference.eval()
    spec = ENCODERS["conch"]
    x = torch.rand(1, 3, 448, 448)
    with torch.no_grad():
        torch.testing.assert_close(b(x), reference(_normalised(spec, x)), rtol=1e-5, atol=1e-5)


# --- Phikon-v2: Hugging Face transformers' Dinov2Model names -------------------------------------------------------

#: Tiny transformers Dinov2Model state dicts and their outputs, made once by the script in this folder (which says
#: how and lists the keys): v4 is the layout of Phikon-v2's model.safetensors, v5 transformers 5's in-memory names.
HF_DINOV2 = Path(__file__).resolve().parents[1] / "fixtures" / "encoders"


def _tiny_phikon() -> EncoderSpec:
    """Phikon-v2 shrunk to the fixture's network: 16 px input, 8 px patches, width 32, 2 layers, 2 heads."""
    return dataclasses.replace(_small("phikon-v2", img_size=16, patch_size=8), input_size=16)


@pytest.mark.parametrize("version", ["v4", "v5"])
def test_phikon_v2_converts_the_transformers_state_dict_exactly(version):
    from safetensors.torch import load_file

    spec = _tiny_phikon()
    published = load_file(str(HF_DINOV2 / f"hf_dinov2_tiny_{version}.safetensors"))
    converted = convert_state_dict(spec, published)
    net = timm.create_model(spec.timm_model, **{**spec.timm_kwargs, **LOUPE_TIMM_OVERRIDES})
    net.load_state_dict(converted, strict=True)  # every key of the network, none other, every shape
    assert len(converted) == len(published) - 1 - 2 * 2 * 2  # mask token dropped; per layer q, k, v → qkv (w, b)
    for key, value in net.state_dict().items():
        assert torch.equal(value, converted[key]), key
    for i in range(2):
        qkv = net.state_dict()[f"blocks.{i}.attn.qkv.weight"]
        q = published.get(f"encoder.layer.{i}.attention.attention.query.weight")
        q = published[f"encoder.layer.{i}.attention.q_proj.weight"] if q is None else q
        assert torch.equal(qkv[:32], q)  # fused in timm's order: query first


@pytest.mark.parametrize("version", ["v4", "v5"])
def test_phikon_v2_computes_what_transformers_dinov2_computes(version):
    """Against transformers' own output for the fixture's weights (the card's embedding is the class token)."""
    from safetensors.torch import load_file

    golden = load_file(str(HF_DINOV2 / f"hf_dinov2_tiny_{version}.golden.safetensors"))
    b = build_encoder("phikon-v2", _tiny_phikon(), HF_DINOV2 / f"hf_dinov2_tiny_{version}.safetensors").eval()
    image, hidden = golden["image"], golden["last_hidden_state"]
    with torch.no_grad():
        torch.testing.assert_close(b(image), hidden[:, 0], rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(b.feature_map(image).flatten(2).transpose(1, 2), hidden[:, 1:], rtol=1e-5, atol=1e-5)


# --- errors -------------------------------------------------------------------------------------------------------


def _one_line(err: pytest.ExceptionInfo[ConfigError]) -> str:
    text = str(err.value)
    assert "\n" not in text
    return text


def test_missing_weights_file_names_the_model_where_its_weights_are_and_the_setting(tmp_path):
    with pytest.raises(ConfigError) as err:
        create_encoder("uni", tmp_path / "nope.bin")
    text = _one_line(err)
    for part in ("UNI", "not found", "huggingface.co/MahmoodLab/UNI", "pytorch_model.bin", "--model.patch_pretrained"):
        assert part in text, part


def test_a_file_with_other_weights_is_refused_with_the_differences(tmp_path):
    path = tmp_path / "pytorch_model.bin"
    torch.save({"conv1.weight": torch.zeros(1), "pos_embed": torch.zeros(1, 5, 7)}, path)
    with pytest.raises(ConfigError) as err:
        create_encoder("virchow2", path)
    text = _one_line(err)
    assert "Virchow2" in text and "paige-ai/Virchow2" in text and "--model.patch_pretrained" in text
    assert "missing keys" in text and "1 unexpected keys (conv1.weight)" in text
    assert "wrong shapes (pos_embed (file (1, 5, 7), network (1, 261, 1280)))" in text


def test_an_unreadable_or_non_state_dict_file_is_refused(tmp_path):
    garbage = tmp_path / "pytorch_model.bin"
    garbage.write_bytes(b"not a checkpoint")
    with pytest.raises(ConfigError, match="cannot read") as err:
        create_encoder("h-optimus-0", garbage)
    assert "bioptimus/H-optimus-0" in _one_line(err)
    listed = tmp_path / "list.bin"
    torch.save([torch.zeros(1)], listed)
    with pytest.raises(ConfigError, match="not a state dict"):
        create_encoder("h-optimus-0", listed)
    bad = tmp_path / "model.safetensors"
    bad.write_bytes(b"\x00" * 16)
    with pytest.raises(ConfigError, match="cannot read"):
        create_encoder("phikon-v2", bad)


def test_pretrained_true_is_refused_loupe_never_downloads():
    with pytest.raises(ConfigError) as err:
        create_backbone("prov-gigapath", pretrained=True)
    text = _one_line(err)
    assert "never downloads" in text and "prov-gigapath/prov-gigapath" in text
    assert "--model.patch_pretrained /path/to/pytorch_model.bin" in text


def test_unknown_encoder_name():
    with pytest.raises(ConfigError, match="unknown encoder"):
        create_encoder("uni3", None)


# --- the hooks ------------------------------------------------------------------------------------------------------


def test_create_backbone_dispatches_registry_names(tmp_path):
    with torch.device("meta"):
        b = create_backbone("uni")
    assert isinstance(b, EncoderBackbone) and b.num_features == 1024
    with pytest.raises(ConfigError, match="not found"):
        create_backbone("conch", pretrained=str(tmp_path / "missing.bin"))
    assert create_backbone("tiny").map_channels == create_backbone("tiny").num_features == 64


def test_config_accepts_registry_names():
    from loupe.models.backbones import is_backbone

    assert all(is_backbone(name) for name in ENCODERS)
    assert is_backbone("tiny") and is_backbone("resnet18") and not is_backbone("uni3") and not is_backbone(" ")


def test_the_state_dict_holds_each_weight_once():
    with torch.device("meta"):
        b = create_encoder("conch", None)
    keys = list(b.state_dict())
    assert all(k.startswith("net.") for k in keys) and "net.trunk.pos_embed" in keys
    assert len(keys) == len(list(b.net.state_dict()))


def test_device_places_the_network_and_its_normalisation():
    b = create_encoder("uni", None, device="meta")
    assert all(t.is_meta for t in [*b.parameters(), *b.buffers()])
