"""Gated-attention MIL: every valid cell read once, attention = the gated weights on the grid, built from configs,
and trained / evaluated / predicted through the same workflows as the joint model."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import Tensor

from loupe.config import Config, GatedMILConfig, JointConfig, ModelConfig, TrainConfig
from loupe.errors import ConfigError
from loupe.models import SlideBatch, SlideOutput, build_model, create_backbone
from loupe.models.gated_mil import GatedAttentionMIL
from loupe.training.module import SlideClassifierModule

pytestmark = pytest.mark.filterwarnings("ignore:You are trying to `self.log\\(\\)`")

PRESETS = Path(__file__).resolve().parents[2] / "src" / "loupe" / "configs"
SHAPE = (3, 4)  # 12 cells
P = 16


class Reader:
    """A patch reader that records the cells asked for; each cell's patch has its own brightness."""

    def __init__(self) -> None:
        self.calls: list[Tensor] = []
        gen = torch.Generator().manual_seed(0)
        self.table = torch.rand(SHAPE[0] * SHAPE[1], 3, P, P, generator=gen)

    def __call__(self, cells: Tensor) -> Tensor:
        self.calls.append(cells.clone())
        return self.table[cells.reshape(-1)].reshape(*cells.shape, 3, P, P)

    embeddings = None  # the pixel source interface: no cached embeddings

    def cells(self, slides, cells: Tensor) -> Tensor:  # the pixel source interface
        return self(cells)

    def whole(self, slide, valid):
        raise AssertionError("gated MIL reads cells only")


def _batch(valid: Tensor, labels: list[int] | None = None) -> SlideBatch:
    b = valid.shape[0]
    thumbs = torch.randint(0, 256, (b, 3, 8, 8), dtype=torch.uint8)
    return SlideBatch(thumbs, valid, torch.tensor(labels or [0] * b), torch.arange(b), (SHAPE,))


def _model(n_classes: int = 3) -> GatedAttentionMIL:
    torch.manual_seed(0)
    return GatedAttentionMIL(create_backbone("tiny"), n_classes, classifier_dropout=0.0).eval()


def test_reads_every_valid_cell_once_and_puts_the_gated_weights_on_the_grid():
    model, reader = _model(), Reader()
    valid = torch.ones(2, 12, dtype=torch.bool)
    valid[0, [0, 5, 11]] = False  # slide 0: 9 valid cells; slide 1: all 12
    out = model(_batch(valid), reader)
    assert isinstance(out, SlideOutput) and out.logits.shape == (2, 3)
    (cells,) = reader.calls
    assert cells.shape == (2, 12)
    assert set(cells[0].tolist()) == set(range(12)) - {0, 5, 11}
    assert sorted(cells[1].tolist()) == list(range(12))
    assert torch.all(out.attention[~valid] == 0)
    assert torch.all(out.attention[valid] > 0)
    assert torch.allclose(out.attention.sum(-1), torch.ones(2))
    assert out.regulariser is None and out.loss is None


def test_the_bag_embedding_is_the_attention_weighted_mean_of_the_valid_patches():
    model, reader = _model(), Reader()
    valid = torch.zeros(1, 12, dtype=torch.bool)
    valid[0, [2, 7]] = True
    out = model(_batch(valid), reader)
    with torch.no_grad():
        feats = model.patch_net(reader.table[[2, 7]])
        expected = (out.attention[0, [2, 7]].unsqueeze(-1) * feats).sum(0)
        assert torch.allclose(model.classifier(expected.unsqueeze(0)), out.logits, atol=1e-5)


def test_padding_and_chunking_do_not_change_the_result():
    model, reader = _model(), Reader()
    valid = torch.ones(2, 12, dtype=torch.bool)
    valid[1, 3:] = False  # slide 1 is padded with repeats that must carry no weight
    batch = _batch(valid)
    both = model(batch, reader)
    alone = model(batch.select([1]), reader)
    assert torch.allclose(both.logits[1], alone.logits[0], atol=1e-5)
    assert torch.allclose(both.attention[1], alone.attention[0], atol=1e-6)
    model.patch_chunk = 5
    chunked = model(batch, reader)
    assert torch.allclose(chunked.logits, both.logits, atol=1e-5)


def test_it_trains_through_the_lightning_module_and_gradients_reach_f_and_the_head():
    cfg = Config(
        model=ModelConfig(architecture="gated_mil", magnifications=["0.5"]), gated_mil=GatedMILConfig(patch_size=P)
    )
    torch.manual_seed(0)
    module = SlideClassifierModule(build_model(cfg, 2), TrainConfig(), Reader(), ["0.5"])
    module.train()
    loss = module.training_step(_batch(torch.ones(2, 12, dtype=torch.bool), [0, 1]), 0)
    assert loss is not None
    loss.backward()
    for name in ("patch_net", "pool", "classifier"):
        grads = [p.grad for p in getattr(module.model, name).parameters()]
        assert all(g is not None for g in grads) and any(g.abs().sum() > 0 for g in grads), name


def test_build_model_makes_gated_mil_only_for_one_magnification():
    one = Config(model=ModelConfig(architecture="gated_mil", magnifications=["0.5"]))
    assert isinstance(build_model(one, 2), GatedAttentionMIL)
    with pytest.raises(ConfigError, match="one magnification"):
        Config(model=ModelConfig(architecture="gated_mil"))


def test_joint_settings_are_refused_for_gated_mil():
    with pytest.raises(ConfigError, match=r"joint\.k: not used by model\.architecture gated_mil"):
        Config(model=ModelConfig(architecture="gated_mil", magnifications=["0.5"]), joint=JointConfig(k=3))


@pytest.mark.slow
def test_gated_mil_trains_evaluates_and_predicts_maps_through_the_workflows(tmp_path: Path):
    from loupe.config import load_config
    from loupe.datasets.synthetic import SyntheticSpec, generate_dataset
    from loupe.workflows.evaluation import evaluate
    from loupe.workflows.prediction import predict
    from loupe.workflows.training import train

    spec = SyntheticSpec(labels=("5x", "10x", "20x"), splits={"train": 4, "val": 2, "test": 2}, seed=3)
    manifest = generate_dataset(tmp_path / "data", spec)
    cfg = load_config(PRESETS / "demo.yaml")
    cfg = dataclasses.replace(
        cfg,
        data=dataclasses.replace(cfg.data, manifest=str(manifest), batch_size=2),
        model=dataclasses.replace(cfg.model, architecture="gated_mil", magnifications=["10x"]),
        train=dataclasses.replace(cfg.train, epochs=1, progress_bar=False),
        joint=JointConfig(),
        gated_mil=GatedMILConfig(patch_size=cfg.joint.patch_size),
    )
    run = train(cfg, out=tmp_path / "run")
    metrics = evaluate(run, split="test", out=tmp_path / "eval")
    assert metrics["n"] == 2 and metrics["attention_share"] == pytest.approx({"10x": 1.0})
    image = sorted((manifest.parent / "images").glob("test_*.tif"))[0]
    predict(run, [image], out=tmp_path / "predict", workers=0)
    folder = tmp_path / "predict" / "slides" / image.stem
    maps = dict(np.load(folder / "attention.npz"))
    assert maps["10x"].shape == (4, 4) and abs(float(maps["10x"].sum()) - 1) < 1e-5
    geo = json.loads((folder / "attention.geojson").read_text())
    assert geo["features"]
