"""StreamingCLAM through train / evaluate / predict: a real training run on the demo's synthetic slides learns."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np
import pytest

from loupe.config import Config, DataConfig, ModelConfig, StreamingCLAMConfig, TrainConfig
from loupe.datasets.synthetic import SyntheticSpec, generate_dataset

# The demo's slides with the class planted at the lowest magnification (`loupe demo --signal-magnification lowest`),
# fewer of them, streamed whole at that magnification: 256×256 at 0.5 µm/px → 64×64 at 5x, 4×4 positions of the
# tiny CNN (stride 16), in tiles of 32 px (four tiles with their overlaps).
SPEC = SyntheticSpec(labels=("5x", "10x", "20x"), signal="lowest", splits={"train": 120, "val": 24, "test": 40}, seed=5)


def streaming_config(manifest: Path, epochs: int) -> Config:
    return Config(
        data=DataConfig(manifest=str(manifest), tissue=False, batch_size=4, read_threads=2),
        model=ModelConfig(
            architecture="streamingclam",
            magnifications=["2.0"],
            magnification_labels=["5x"],
            patch_backbone="tiny",  # stride 16: one grid cell of 16 px
            classifier_dropout=0.0,
        ),
        # With frozen (calibrated) normalisation the trunk needs a gentle rate: at 2e-3 it collapsed to chance.
        train=TrainConfig(epochs=epochs, lr=3e-4, lr_patience=50, progress_bar=False),
        streamingclam=StreamingCLAMConfig(
            tile_size=32, attention_dropout=0.0, instance_loss=True, freeze_encoder_epochs=1, k=4
        ),
    )


@pytest.fixture(scope="module")
def streaming_run(tmp_path_factory) -> tuple[Path, Path]:
    from loupe.workflows.training import train

    root = tmp_path_factory.mktemp("streamingclam")
    manifest = generate_dataset(root / "data", SPEC)
    return manifest, train(streaming_config(manifest, epochs=3), out=root / "run")


@pytest.mark.slow
def test_streamingclam_learns_the_demo_task(streaming_run, tmp_path):
    from loupe.workflows.evaluation import evaluate

    _, run = streaming_run
    metrics = evaluate(run, split="test", out=tmp_path / "eval")
    assert metrics["accuracy"] >= 0.8, metrics
    assert metrics["inference"]["mode"] == "exhaustive"
    assert metrics["attention_share"] == {"5x": pytest.approx(1.0)}


@pytest.mark.slow
def test_predict_writes_whole_slide_attention(streaming_run, tmp_path):
    from loupe.data.manifest import load_manifest
    from loupe.workflows.prediction import predict

    manifest, run = streaming_run
    paths = [r.path for r in load_manifest(manifest).subset("test").records[:2]]
    result = predict(run, paths, out=tmp_path / "predict", workers=0)
    assert result.counts()["done"] == 2
    folder = tmp_path / "predict" / "slides" / Path(paths[0]).stem
    info = json.loads((folder / "prediction.json").read_text())
    assert info["grid"] == {"5x": [4, 4]} and len(info["cells_read"]) == 4
    maps = np.load(folder / "attention.npz")
    assert maps["5x"].shape == (4, 4) and maps["5x"].sum() == pytest.approx(1.0, abs=1e-5)
    assert (folder / "attention.geojson").is_file() and not (folder / "heatmap_5x.png").exists()
    timings = info["timings_s"]
    assert timings["patches"] > 0 and timings["model"] > 0


def test_settings_of_other_architectures_are_refused_before_training(tmp_path):
    from loupe.config import JointConfig
    from loupe.errors import ConfigError

    manifest = tmp_path / "never-read.csv"
    with pytest.raises(ConfigError, match=r"joint\.patch_size: not used by model.architecture streamingclam"):
        dataclasses.replace(streaming_config(manifest, epochs=1), joint=JointConfig(patch_size=64))
