"""Every shipped config loads, and the paper presets have the paper's geometry."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import torch

from loupe.config import dump_config, load_config
from loupe.models import JointAttentionSampler, build_model
from loupe.slides import build_grid
from loupe.workflows.common import magnifications_of

PRESETS = sorted((Path(__file__).resolve().parents[1] / "src" / "loupe" / "configs").glob("*.yaml"))


def test_the_presets_are_shipped():
    assert {p.stem for p in PRESETS} >= {"bach", "tcga_prad", "demo"}


@pytest.mark.parametrize("path", PRESETS, ids=lambda p: p.stem)
def test_every_shipped_config_loads_and_round_trips(path: Path, tmp_path: Path):
    cfg = load_config(path)
    copy = tmp_path / "copy.yaml"
    copy.write_text(dump_config(cfg))
    assert load_config(copy) == cfg


@pytest.mark.parametrize(
    ("preset", "size", "grids", "features"),
    [
        # (rows, cols): the paper's 2×2, 4×3, 7×6. timm's InceptionV3 (valid padding) maps 299×224 to 8×5 where the
        # paper's Keras-style network reports 8×6; the adaptive pooling of A absorbs the difference.
        ("bach", (2048, 1536), [(2, 2), (3, 4), (6, 7)], (5, 8)),
        ("tcga_prad", (2000, 2000), [(2, 2), (4, 4), (7, 7)], (8, 8)),
    ],
)
def test_paper_presets_have_the_paper_geometry(preset, size, grids, features):
    cfg = load_config(next(p for p in PRESETS if p.stem == preset))
    assert cfg.joint.k == 5 and cfg.joint.entropy_alpha == 0.01 and cfg.train.lr == 1e-4
    assert cfg.train.epochs == 100 and cfg.train.lr_patience == 25 and cfg.train.lr_factor == 0.1
    assert cfg.joint.thumbnail_backbone == cfg.model.patch_backbone == "inception_v3"
    grid = build_grid(size, cfg.data.slide_mpp, magnifications_of(cfg), cfg.joint.patch_size, preset)
    assert [tuple(s) for s in grid.shapes] == grids

    # The InceptionV3 h turns the thumbnail into a 2048-channel map that A pools to every grid.
    cfg = dataclasses.replace(
        cfg,
        model=dataclasses.replace(cfg.model, patch_pretrained=False),
        joint=dataclasses.replace(cfg.joint, thumbnail_pretrained=False),
    )
    model = build_model(cfg, n_classes=4).eval()
    assert isinstance(model, JointAttentionSampler)
    w, h = cfg.joint.thumbnail_size
    with torch.no_grad():
        fmap = model.thumbnail_net.feature_map(torch.rand(1, 3, h, w))
        _, probs = model.attention(fmap, grid.shapes)
    assert fmap.shape[1:] == (2048, *features)
    assert probs.shape == (1, grid.n_cells) and torch.allclose(probs.sum(), torch.tensor(1.0))


@pytest.mark.parametrize("name", ["demo", "camelyon16_streamingclam", "bach_gated_mil"])
def test_a_loupe_0_1_config_reads_as_the_current_preset(name: str):
    """Run folders written by loupe 0.1 (joint settings under model/train, a `streaming` section) still load:
    the 0.1 form of each preset (tests/fixtures/configs) reads as the current preset."""
    old = Path(__file__).resolve().parent / "fixtures" / "configs" / f"v0.1-{name}.yaml"
    current = load_config(next(p for p in PRESETS if p.stem == name))
    # The discovery settings came after 0.1 (a 0.1 config gets their defaults; the demo preset sets its own).
    added = {f: getattr(current.joint, f) for f in ("uniform_mix", "novelty", "magnification_aware")}
    migrated = load_config(old)
    assert dataclasses.replace(migrated, joint=dataclasses.replace(migrated.joint, **added)) == current
