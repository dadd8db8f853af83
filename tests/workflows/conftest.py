"""A tiny synthetic dataset and a briefly trained run, shared by the workflow tests."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest

from loupe.config import load_config
from loupe.datasets.synthetic import SyntheticSpec, generate_dataset

PRESETS = Path(__file__).resolve().parents[2] / "src" / "loupe" / "configs"
SMALL = SyntheticSpec(labels=("5x", "10x", "20x"), splits={"train": 8, "val": 4, "test": 4}, seed=3)


@pytest.fixture(scope="session")
def small_manifest(tmp_path_factory) -> Path:
    return generate_dataset(tmp_path_factory.mktemp("synthetic"), SMALL)


def small_config(manifest: Path, epochs: int = 1):
    cfg = load_config(PRESETS / "demo.yaml")
    return dataclasses.replace(
        cfg,
        data=dataclasses.replace(cfg.data, manifest=str(manifest), batch_size=4),
        train=dataclasses.replace(cfg.train, epochs=epochs, progress_bar=False),
    )


@pytest.fixture(scope="session")
def make_small_config():
    """small_config for tests that build their own run (test modules cannot import conftest under importlib mode)."""
    return small_config


@pytest.fixture(scope="session")
def trained_run(tmp_path_factory, small_manifest) -> Path:
    from loupe.workflows.training import train

    return train(small_config(small_manifest), out=tmp_path_factory.mktemp("run") / "run")
