"""train / evaluate / predict on a tiny synthetic dataset: outputs, resume, weights-only checkpoints."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from loupe.errors import ConfigError
from loupe.workflows.evaluation import evaluate
from loupe.workflows.prediction import predict
from loupe.workflows.training import train


@pytest.mark.slow
def test_run_folder_holds_config_manifest_checkpoints_and_log(trained_run: Path):
    assert (trained_run / "config.yaml").is_file()
    assert (trained_run / "manifest.csv").is_file()
    assert (trained_run / "checkpoints" / "last.ckpt").is_file()
    assert (trained_run / "checkpoints" / "best.ckpt").is_file()
    assert (trained_run / "logs" / "version_0" / "metrics.csv").is_file()
    state = torch.load(trained_run / "checkpoints" / "best.ckpt", weights_only=True)
    assert any(k.startswith("model.attention.") for k in state["state_dict"])


@pytest.mark.slow
def test_evaluate_writes_metrics_predictions_and_plots(trained_run: Path, tmp_path: Path):
    m = evaluate(trained_run, split="test", out=tmp_path, inference="topk")
    saved = json.loads((tmp_path / "metrics.json").read_text())
    for key in ("accuracy", "balanced_accuracy", "auc_roc_micro", "auc_roc_macro", "ap_micro", "ap_macro"):
        assert key in saved
    assert saved["inference"] == {"mode": "topk", "samples": 1, "k": 5}
    assert set(saved["attention_share"]) == {"5x", "10x", "20x"}
    assert abs(sum(saved["attention_share"].values()) - 1) < 1e-5
    assert saved["n"] == 4 and m["confusion_matrix"] == saved["confusion_matrix"]
    rows = list(csv.DictReader((tmp_path / "predictions.csv").open()))
    assert len(rows) == 4 and {"prob_horizontal", "prob_vertical", "attention_20x"} <= set(rows[0])
    for png in ("roc.png", "pr.png", "confusion.png"):
        assert (tmp_path / png).stat().st_size > 1000


@pytest.mark.slow
def test_predict_survives_a_corrupt_slide(trained_run: Path, small_manifest: Path, tmp_path: Path):
    folder = tmp_path / "slides"
    folder.mkdir()
    images = sorted((small_manifest.parent / "images").glob("test_*.tif"))[:2]
    for img in images:
        (folder / img.name).write_bytes(img.read_bytes())
    (folder / "broken.svs").write_bytes(b"not a slide at all" * 100)
    status = predict(trained_run, [folder], out=tmp_path / "out", heatmaps=True).status.slides
    assert status["broken"]["status"] == "failed" and "broken.svs" in status["broken"]["reason"]
    done = [k for k, v in status.items() if v["status"] == "done"]
    assert len(done) == 2
    for slide_id in done:
        maps = dict(np.load(tmp_path / "out" / "slides" / slide_id / "attention.npz"))
        assert maps["5x"].shape == (2, 2) and maps["10x"].shape == (4, 4) and maps["20x"].shape == (8, 8)
        total = sum(float(maps[k].sum()) for k in ("5x", "10x", "20x"))
        assert abs(total - 1) < 1e-5
        assert (tmp_path / "out" / "slides" / slide_id / "overlay.png").stat().st_size > 1000
    saved = json.loads((tmp_path / "out" / "status.json").read_text())
    assert saved["slides"]["broken"]["status"] == "failed"
    rows = list(csv.DictReader((tmp_path / "out" / "predictions.csv").open()))
    assert sorted(r["slide_id"] for r in rows) == sorted(done)


@pytest.mark.slow
def test_training_resumes_from_the_last_checkpoint(small_manifest: Path, make_small_config, tmp_path: Path):
    run = train(make_small_config(small_manifest, epochs=1), out=tmp_path / "run")
    first = torch.load(run / "checkpoints" / "last.ckpt", weights_only=True)
    assert first["epoch"] == 0
    train(make_small_config(small_manifest, epochs=2), out=run)
    second = torch.load(run / "checkpoints" / "last.ckpt", weights_only=True)
    assert second["global_step"] == 2 * first["global_step"]
    assert (run / "logs" / "version_0" / "metrics.csv").is_file()  # the first session's log is kept
    assert (run / "logs" / "version_1" / "metrics.csv").is_file()


def test_cross_validation_folds_give_disjoint_test_sets_that_cover_every_slide(small_manifest: Path):
    from loupe.data.manifest import load_manifest
    from loupe.workflows.training import fold_splits

    manifest = load_manifest(small_manifest)
    tests = []
    for fold in range(3):
        m = fold_splits(manifest, folds=3, fold=fold, val_fraction=0.2, seed=0)
        splits = [r.split for r in m.records]
        assert set(splits) == {"train", "val", "test"}
        tests.append({r.slide_id for r in m.records if r.split == "test"})
    assert set().union(*tests) == {r.slide_id for r in manifest.records}
    assert sum(len(t) for t in tests) == len(manifest.records)
    with pytest.raises(ConfigError, match=r"data\.fold=3"):
        fold_splits(manifest, folds=3, fold=3, val_fraction=0.2, seed=0)


def test_a_joint_run_trained_before_magnification_maps_still_loads(trained_run: Path, tmp_path: Path):
    import shutil

    import yaml

    from loupe.workflows.common import load_run

    old = tmp_path / "old_run"
    shutil.copytree(trained_run, old)
    for name in ("best.ckpt", "last.ckpt"):  # what an earlier loupe wrote: no maps in the weights or the config
        path = old / "checkpoints" / name
        state = torch.load(path, map_location="cpu", weights_only=True)
        state["state_dict"] = {k: v for k, v in state["state_dict"].items() if ".magnification_maps." not in k}
        torch.save(state, path)
    raw = yaml.safe_load((old / "config.yaml").read_text())
    raw["joint"].pop("magnification_aware")  # the setting's default (true) would expect maps in the weights
    (old / "config.yaml").write_text(yaml.safe_dump(raw))
    cfg, model, _ = load_run(old)
    assert cfg.joint.magnification_aware is False and model.magnification_maps is None
