"""Bring your own encoder: a trained run's patch network, exported to a file, serves as the frozen encoder of a new
run, which then learns the demo task in fewer epochs than from scratch."""

from __future__ import annotations

import csv
import dataclasses
from pathlib import Path

import pytest
import torch

from loupe.cli import main
from loupe.config import Config
from loupe.datasets.synthetic import SyntheticSpec, generate_dataset
from loupe.workflows.common import load_run
from loupe.workflows.demo import demo_config
from loupe.workflows.evaluation import evaluate
from loupe.workflows.training import train

SCRATCH_EPOCHS, FROZEN_EPOCHS = 10, 8


def _config(manifest: Path, epochs: int, **model: object) -> Config:
    cfg = demo_config()
    return dataclasses.replace(
        cfg,
        data=dataclasses.replace(cfg.data, manifest=str(manifest)),
        model=dataclasses.replace(cfg.model, **model),
        train=dataclasses.replace(cfg.train, epochs=epochs, progress_bar=False),
        # One draw per step (the paper's): with the preset's 4 the demo is learned from scratch in 3 epochs, as
        # fast as the attention alone can move, and there is no head start left for an exported encoder to show.
        joint=dataclasses.replace(cfg.joint, train_draws=1),
    )


def _first_epoch_learned(run: Path, planted: str) -> int | None:
    """The number of epochs after which validation first had accuracy ≥ 0.9 and ≥ 60% of the attention on the
    planted magnification (None: never)."""
    rows = [r for r in csv.DictReader((run / "logs" / "version_0" / "metrics.csv").open()) if r.get("val_acc")]
    for r in rows:
        if float(r["val_acc"]) >= 0.9 and float(r[f"val_attention_{planted}"]) >= 0.6:
            return int(r["epoch"]) + 1
    return None


@pytest.mark.slow
def test_an_exported_encoder_frozen_in_a_new_run_learns_faster_than_from_scratch(tmp_path: Path):
    cfg = demo_config()
    labels = ("5x", "10x", "20x")
    spec = SyntheticSpec(labels=labels, magnifications=(2.0, 1.0, 0.5), patch_size=cfg.joint.patch_size)
    manifest = generate_dataset(tmp_path / "data", spec)
    planted = spec.labels[spec.signal_index()]

    scratch = train(_config(manifest, SCRATCH_EPOCHS), out=tmp_path / "scratch")
    encoder = tmp_path / "encoder.pt"
    assert main(["export-encoder", str(scratch), "--out", str(encoder)]) == 0
    exported = torch.load(encoder, weights_only=True)
    best = torch.load(scratch / "checkpoints" / "best.ckpt", weights_only=True)["state_dict"]
    for key, value in exported.items():  # the run's patch network, as the backbone loads it
        torch.testing.assert_close(value, best[f"model.patch_net.net.{key}"])

    frozen = train(
        _config(manifest, FROZEN_EPOCHS, patch_pretrained=str(encoder), freeze_patch_backbone=True),
        out=tmp_path / "frozen",
    )
    after = torch.load(frozen / "checkpoints" / "last.ckpt", weights_only=True)
    assert not any(k.startswith("model.patch_net.") for k in after["state_dict"])  # recorded by SHA-256 instead
    assert [e["file"] for e in after["loupe_frozen"].values()] == [str(encoder)]
    _, loaded, _ = load_run(frozen, "last")
    for key, value in exported.items():  # frozen: trained for FROZEN_EPOCHS and not changed
        torch.testing.assert_close(loaded.patch_net.net.state_dict()[key], value)

    learned_scratch = _first_epoch_learned(scratch, planted)
    learned_frozen = _first_epoch_learned(frozen, planted)
    assert learned_scratch is not None and learned_frozen is not None, (learned_scratch, learned_frozen)
    assert learned_frozen < learned_scratch, (learned_frozen, learned_scratch)  # measured here: 2 vs 6 epochs

    metrics = evaluate(frozen, split="test", out=tmp_path / "eval")
    assert metrics["accuracy"] >= 0.9, metrics
    assert metrics["attention_share"][planted] >= 0.6, metrics["attention_share"]


def test_a_streamed_model_has_no_patch_network_to_export(tmp_path: Path):
    from loupe.config import DataConfig, ModelConfig, dump_config
    from loupe.errors import ConfigError
    from loupe.models import build_model
    from loupe.workflows.export import export_patch_encoder

    cfg = Config(
        data=DataConfig(manifest=str(tmp_path / "m.csv"), classes=["a", "b"]),
        model=ModelConfig(architecture="streamingclam", magnifications=["0.5"], patch_backbone="tiny"),
    )
    run = tmp_path / "run"
    (run / "checkpoints").mkdir(parents=True)
    (run / "config.yaml").write_text(dump_config(cfg))
    state = {f"model.{k}": v for k, v in build_model(cfg, 2).state_dict().items()}
    torch.save({"state_dict": state}, run / "checkpoints" / "last.ckpt")
    with pytest.raises(ConfigError, match="no separate patch network"):
        export_patch_encoder(run, out=tmp_path / "x.pt")
