"""The embedding cache of a frozen encoder: only missing cells are embedded, values equal the encoder's, entries
survive the process, and a changed encoder, weights or slide file never reads a stale embedding."""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import Tensor

from loupe.data import embeddings as embeddings_module
from loupe.data.catalog import SlideCatalog
from loupe.data.embeddings import EmbeddingCache, encoder_key
from loupe.data.manifest import load_manifest
from loupe.datasets.synthetic import SyntheticSpec, generate_dataset
from loupe.models import create_backbone

SPEC = SyntheticSpec(image_size=128, splits={"train": 3})
MAGS = ("2.0", "1.0", "0.5")  # 1 + 4 + 16 = 21 cells


@pytest.fixture(scope="module")
def catalog(tmp_path_factory) -> SlideCatalog:
    manifest = load_manifest(generate_dataset(tmp_path_factory.mktemp("emb"), SPEC))
    return SlideCatalog(manifest.records, MAGS, SPEC.patch_size)


class Encoder:
    """Embeds cells (B, m) deterministically from their index and counts what it was asked to embed."""

    def __init__(self, dim: int = 4) -> None:
        self.dim = dim
        self.asked: list[Tensor] = []

    def value(self, slide: int, cells: Tensor) -> Tensor:
        base = cells.to(torch.float32).unsqueeze(-1) + 100 * slide
        return base * torch.arange(1, self.dim + 1, dtype=torch.float32)

    def for_batch(self, slides: list[int]):
        def compute(cells: Tensor) -> Tensor:
            self.asked.append(cells.clone())
            return torch.stack([self.value(s, cells[r]) for r, s in enumerate(slides)])

        return compute


def test_only_missing_cells_are_embedded_and_values_are_the_encoders(catalog, tmp_path: Path):
    cache = EmbeddingCache(catalog, "k1", tmp_path)
    enc = Encoder()
    first = torch.tensor([[3, 5, 5, 7], [0, 1, 2, 3]])
    out = cache.features([0, 1], first, enc.for_batch([0, 1]))
    torch.testing.assert_close(out, torch.stack([enc.value(0, first[0]), enc.value(1, first[1])]))
    assert sorted(enc.asked[0][0].tolist()) == [3, 5, 7, 7]  # unique cells, padded with a cell of the row
    second = torch.tensor([[5, 7, 9, 3], [3, 2, 1, 0]])
    out = cache.features([0, 1], second, enc.for_batch([0, 1]))
    torch.testing.assert_close(out, torch.stack([enc.value(0, second[0]), enc.value(1, second[1])]))
    assert enc.asked[1].shape == (2, 1) and int(enc.asked[1][0, 0]) == 9  # only cell 9 of slide 0 was new
    assert cache.embedded == 3 + 4 + 1 and cache.reused == 3 + 4
    out = cache.features([1, 0], torch.tensor([[3], [9]]), enc.for_batch([1, 0]))
    assert len(enc.asked) == 2  # everything cached: no call


def test_entries_survive_the_process_and_stale_ones_are_never_read(catalog, tmp_path: Path):
    cells = torch.tensor([[2, 4, 6]])
    EmbeddingCache(catalog, "k1", tmp_path).features([2], cells, Encoder().for_batch([2]))
    enc = Encoder()
    again = EmbeddingCache(catalog, "k1", tmp_path).features([2], cells, enc.for_batch([2]))
    assert enc.asked == [] and torch.equal(again, enc.value(2, cells[0])[None])
    other = Encoder()
    EmbeddingCache(catalog, "k2", tmp_path).features([2], cells, other.for_batch([2]))  # another encoder
    assert len(other.asked) == 1
    path = Path(catalog.records[2].path)
    stat = path.stat()
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))  # the slide file changed
    changed = Encoder()
    EmbeddingCache(catalog, "k1", tmp_path).features([2], cells, changed.for_batch([2]))
    assert len(changed.asked) == 1


def test_many_small_chunks_are_merged_without_losing_any(catalog, tmp_path: Path, monkeypatch):
    monkeypatch.setattr(embeddings_module, "MAX_CHUNKS", 3)
    cache = EmbeddingCache(catalog, "k1", tmp_path)
    enc = Encoder()
    for c in range(5, 13):  # eight cells of the 0.5 µm/px grid (flat 5..20): one folder
        cache.features([0], torch.tensor([[c]]), enc.for_batch([0]))
    assert len(list(cache.folder(0, 2).glob("chunk-*.npz"))) <= 3
    fresh = Encoder()
    cells = torch.arange(5, 13)[None]
    out = EmbeddingCache(catalog, "k1", tmp_path).features([0], cells, fresh.for_batch([0]))
    assert fresh.asked == [] and torch.equal(out, fresh.value(0, cells[0])[None])


def test_a_catalog_of_one_magnification_reuses_the_cells_another_catalog_embedded(catalog, tmp_path: Path):
    """Cells are stored per magnification: a single-magnification model (or gated MIL) reads what the joint
    model's catalog embedded, whatever the other magnifications."""
    enc = Encoder()
    EmbeddingCache(catalog, "k1", tmp_path).features([1], torch.tensor([[0, 2, 5, 9, 20]]), enc.for_batch([1]))
    single = SlideCatalog(catalog.records, MAGS[2:], SPEC.patch_size)  # 0.5 µm/px alone: cells 0..15
    again = Encoder()
    out = EmbeddingCache(single, "k1", tmp_path).features([1], torch.tensor([[0, 4, 15]]), again.for_batch([1]))
    assert again.asked == []
    assert torch.equal(out, enc.value(1, torch.tensor([5, 9, 20]))[None])  # flat 5, 9, 20 of the joint grid
    some = Encoder()
    EmbeddingCache(single, "k1", tmp_path).features([1], torch.tensor([[1, 4]]), some.for_batch([1]))
    assert some.asked[0].tolist() == [[1]]  # only the new cell


def test_an_unwritable_cache_warns_once_and_still_gives_the_right_values(catalog, tmp_path: Path, caplog):
    blocked = tmp_path / "file"
    blocked.write_text("not a folder")
    cache = EmbeddingCache(catalog, "k1", blocked)
    enc = Encoder()
    with caplog.at_level(logging.WARNING, logger="loupe"):
        for cells in ([[1, 2]], [[2, 3]]):
            out = cache.features([0], torch.tensor(cells), enc.for_batch([0]))
            assert torch.equal(out, enc.value(0, torch.tensor(cells[0]))[None])
    assert sum("not writable" in r.message for r in caplog.records) == 1


def test_the_encoder_key_follows_the_exact_weights():
    torch.manual_seed(0)
    a = create_backbone("tiny")
    b = create_backbone("tiny")
    b.load_state_dict(a.state_dict())
    assert encoder_key(a) == encoder_key(b)
    with torch.no_grad():
        next(b.parameters()).view(-1)[0] += 1e-6
    assert encoder_key(a) != encoder_key(b)


@pytest.mark.slow
def test_a_frozen_encoder_embeds_fewer_new_cells_each_epoch_and_evaluate_reuses_them(tmp_path: Path):
    import dataclasses

    from loupe.workflows.demo import demo_config
    from loupe.workflows.evaluation import evaluate
    from loupe.workflows.training import train

    spec = SyntheticSpec(splits={"train": 16, "val": 4, "test": 4}, seed=2)
    manifest = generate_dataset(tmp_path / "data", spec)
    cfg = demo_config()

    def config(epochs: int):
        return dataclasses.replace(
            cfg,
            data=dataclasses.replace(cfg.data, manifest=str(manifest), cache_dir=str(tmp_path / "cache")),
            model=dataclasses.replace(cfg.model, freeze_patch_backbone=True),
            train=dataclasses.replace(cfg.train, epochs=epochs, progress_bar=False),
        )

    run = train(config(1), out=tmp_path / "run")
    first = json.loads((run / "embeddings.json").read_text())
    train(config(3), out=run)  # resumed: epochs 2 and 3 in a new process-like session
    later = json.loads((run / "embeddings.json").read_text())
    assert first["embedded_now"] > 0 and 0 < first["fraction_embedded"] < 1
    assert later["embedded_now"] < 2 * first["embedded_now"] and later["reused_now"] > 0
    assert later["cells_embedded"] == first["cells_embedded"] + later["embedded_now"]
    assert first["fraction_embedded"] < later["fraction_embedded"] < 1

    files_before = sorted(p.name for p in (tmp_path / "cache" / "embeddings").rglob("chunk-*.npz"))
    evaluate(run, split="val", out=tmp_path / "eval")  # val cells were embedded in validation: reused
    files_after = sorted(p.name for p in (tmp_path / "cache" / "embeddings").rglob("chunk-*.npz"))
    # At most a few new cells per val slide (mean mode draws): one chunk per slide and magnification they fall in.
    assert len(files_after) <= len(files_before) + 4 * 3
    assert np.isfinite(later["fraction_embedded"])


@pytest.mark.slow
def test_training_through_the_cache_gives_the_same_run_as_without_it(tmp_path: Path):
    import csv
    import dataclasses

    from loupe.workflows.demo import demo_config
    from loupe.workflows.training import train

    manifest = generate_dataset(tmp_path / "data", SyntheticSpec(splits={"train": 24, "val": 8}, seed=4))
    cfg = demo_config()
    losses = []
    for cache in (False, True):
        run_cfg = dataclasses.replace(
            cfg,
            data=dataclasses.replace(
                cfg.data, manifest=str(manifest), cache_dir=str(tmp_path / "cache"), embedding_cache=cache
            ),
            model=dataclasses.replace(cfg.model, freeze_patch_backbone=True),
            train=dataclasses.replace(cfg.train, epochs=3, progress_bar=False),
        )
        run = train(run_cfg, out=tmp_path / f"run-{cache}")
        rows = [r for r in csv.DictReader((run / "logs" / "version_0" / "metrics.csv").open()) if r.get("val_loss")]
        losses.append([float(r["val_loss"]) for r in rows])
    assert (tmp_path / "run-True" / "embeddings.json").is_file() and not (
        tmp_path / "run-False" / "embeddings.json"
    ).exists()
    np.testing.assert_allclose(losses[1], losses[0], rtol=1e-5)  # the same sampled cells, the same embeddings
