"""`loupe bench accuracy`: k-fold cross-validation of every method on tiny generated images: the folds, the rows and
their summary, the files, resumability (a finished fold × method is never trained again), a frozen encoder's cells
embedded once, and the command line."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from loupe.bench import cohort
from loupe.bench.cohort import METRICS, run_cohort, summarise
from loupe.bench.data import Geometry, generate_images, geometry_config
from loupe.cli import main
from loupe.config import dump_config
from loupe.data.embeddings import EmbeddingCache
from loupe.data.manifest import load_manifest
from loupe.errors import ConfigError

TINY = Geometry(
    width=160, height=128, mpp=0.5, magnifications=("2.0", "1.0", "0.5"), labels=("5x", "10x", "20x"),
    patch_size=32, thumbnail_size=(40, 32), k=3, classes=("a", "b"),
)  # fmt: skip
METHODS = ["joint", "single 5x", "single 10x", "single 20x", "all patches", "gated MIL 20x"]


def _config(tmp: Path):
    manifest = generate_images(tmp / "data", 6, 2, TINY)  # 6 train, 1 val, 2 test rows: 9 slides, folds ignore it
    cfg = geometry_config(manifest, TINY, batch_size=2)
    return dataclasses.replace(
        cfg,
        model=dataclasses.replace(cfg.model, freeze_patch_backbone=True),
        data=dataclasses.replace(cfg.data, cache_dir=str(tmp / "cache")),
    )


@pytest.fixture(scope="module")
def bench(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("cohort")
    cfg = _config(tmp)
    stored: list[tuple[str, str, int]] = []
    original = EmbeddingCache._store

    def spy(self, i, j, cells, features):
        stored.extend((self.key, str(self.folder(i, j)), int(c)) for c in cells)
        return original(self, i, j, cells, features)

    mp = pytest.MonkeyPatch()
    mp.setattr(EmbeddingCache, "_store", spy)
    try:
        result = run_cohort(config=cfg, out=tmp / "cv", folds=2, epochs=1, budgets=(3, 6), log=lambda *_: None)
    finally:
        mp.undo()
    return tmp, cfg, result, stored


@pytest.mark.slow
def test_every_method_on_every_fold_with_the_figures_and_their_summary(bench):
    tmp, _, result, _ = bench
    assert [e["method"] for e in result["summary"]] == METHODS
    assert sorted((r["fold"], r["method"]) for r in result["rows"]) == sorted((f, m) for f in (0, 1) for m in METHODS)
    for r in result["rows"]:
        assert 0.0 <= r["accuracy"] <= 1.0 and r["train_s_per_epoch"] > 0 and r["infer_s_per_slide"] > 0
        assert r["epochs_timed"] == 1
    by = {(r["method"], r["fold"]): r for r in result["rows"]}
    # Patches read: all patches / gated MIL read every cell of theirs (2×1 + 3×2 + 5×4 cells; 20 at 20x).
    assert by[("all patches", 0)]["patches_per_slide"] == 28 and by[("gated MIL 20x", 1)]["patches_per_slide"] == 20
    assert by[("single 5x", 0)]["patches_per_slide"] == 2  # k = 3 draws without replacement of 2 cells
    joint = next(e for e in result["summary"] if e["method"] == "joint")
    accs = [by[("joint", f)]["accuracy"] for f in (0, 1)]
    assert joint["accuracy"] == pytest.approx(np.mean(accs)) and joint["accuracy_sd"] == pytest.approx(np.std(accs))
    fixed = {e["budget"]: e for e in result["budgets"] if e["mode"] == "fixed"}
    assert fixed[3]["patches_per_slide"] == 3 and fixed[6]["patches_per_slide"] == 6  # one draw of B, distinct
    adaptive = [r for r in result["budget_rows"] if r["mode"] == "adaptive"]
    assert sorted((r["fold"], r["budget"]) for r in adaptive) == [(0, 3), (0, 6), (1, 3), (1, 6)]
    assert all(0 < r["patches_per_slide"] <= r["budget"] and r["inference"]["budget"] == r["budget"] for r in adaptive)
    saved = json.loads((tmp / "cv" / "cohort.json").read_text())
    assert saved["summary"] == result["summary"]  # finite floats survive JSON exactly
    md = (tmp / "cv" / "cohort.md").read_text()
    assert "| gated MIL 20x |" in md and "| fixed | 6 |" in md and "2-fold cross-validation" in md
    with Image.open(tmp / "cv" / "cohort.png") as png:
        assert png.size[0] > 300


@pytest.mark.slow
def test_the_folds_are_the_ones_loupe_makes_and_the_test_sets_partition_the_cohort(bench):
    tmp, cfg, _, _ = bench
    tests = []
    for f in (0, 1):
        for name in ("joint", "gated_MIL_20x"):
            m = load_manifest(tmp / "cv" / f"fold{f}" / name / "run" / "manifest.csv")
            tests.append((f, name, sorted(r.slide_id for r in m.records if r.split == "test")))
    assert tests[0][2] == tests[1][2] and tests[2][2] == tests[3][2]  # every method on the same folds
    everything = sorted(r.slide_id for r in load_manifest(cfg.data.manifest).records)
    assert sorted(tests[0][2] + tests[2][2]) == everything and not set(tests[0][2]) & set(tests[2][2])


@pytest.mark.slow
def test_a_frozen_encoders_cells_are_embedded_at_most_once_across_methods_and_folds(bench):
    _, _, _, stored = bench
    assert stored and len(stored) == len(set(stored))


@pytest.mark.slow
def test_finished_fold_methods_are_reused_and_a_removed_one_alone_is_redone(bench, monkeypatch):
    tmp, cfg, result, _ = bench
    trained: list[str] = []

    def fake(config, folder):
        trained.append(str(folder))
        raise AssertionError("a finished fold × method was trained again")

    monkeypatch.setattr(cohort, "run_method", fake)
    monkeypatch.setattr(cohort, "score", lambda *a, **k: (_ for _ in ()).throw(AssertionError("scored again")))
    again = run_cohort(config=cfg, out=tmp / "cv", folds=2, epochs=1, budgets=(3, 6), log=lambda *_: None)
    assert trained == [] and again["summary"] == result["summary"]

    done = tmp / "cv" / "fold1" / "single_10x" / "row.json"
    row = json.loads(done.read_text())
    done.unlink()  # as if killed before this one finished
    monkeypatch.setattr(cohort, "run_method", lambda config, folder: trained.append(folder.name) or row)
    run_cohort(config=cfg, out=tmp / "cv", folds=2, epochs=1, budgets=(3, 6), log=lambda *_: None)
    assert trained == ["single_10x"] and done.is_file()


def test_summary_is_mean_and_population_sd_over_folds():
    rows = [{"method": "m", "fold": f, **dict.fromkeys(METRICS, float(f))} for f in range(3)]
    rows[2]["train_s_per_epoch"] = None  # not measured (the training had already finished)
    (entry,) = summarise(rows, ["m", "absent"])
    assert entry["folds"] == 3 and entry["accuracy"] == 1.0 and entry["accuracy_sd"] == pytest.approx(np.std([0, 1, 2]))
    assert entry["train_s_per_epoch"] == 0.5 and entry["train_s_per_epoch_sd"] == pytest.approx(0.5)


def test_bad_options_are_one_message(tmp_path: Path):
    cfg = geometry_config(tmp_path / "m.csv", TINY)
    for kwargs, word in (
        ({"folds": 1}, "--folds"),
        ({"methods": ["nope"]}, "unknown method"),
        ({"budgets": [0]}, "--budgets"),
        ({"epsilon": 0.0}, "--epsilon"),
        ({"budgets": [2]}, "at least k = 3"),  # adaptive reads whole rounds of k: refused before any training
    ):
        with pytest.raises(ConfigError, match=word):
            run_cohort(config=cfg, out=tmp_path / "o", **kwargs)


@pytest.mark.slow
def test_the_command_line_runs_the_cross_validation(tmp_path: Path, capsys):
    cfg = _config(tmp_path)
    config = tmp_path / "cfg.yaml"
    config.write_text(dump_config(cfg))
    args = ["bench", "accuracy", "--config", str(config), "--out", str(tmp_path / "cv"), "--folds", "2"]
    assert main([*args, "--epochs", "1", "--methods", "joint,single 20x", "--budgets", "3"]) == 0
    out = capsys.readouterr().out
    assert "joint: accuracy" in out and "single 20x: accuracy" in out and "cohort.md" in out
    assert main([*args, "--budgets", "3,x"]) == 2
