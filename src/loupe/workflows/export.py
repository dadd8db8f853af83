"""Exports of a trained run, for use elsewhere.

``loupe export-encoder``: a trained run's patch network as a weights file, to be loaded elsewhere as an encoder
(``--model.patch_backbone NAME --model.patch_pretrained FILE``, e.g. frozen with ``--model.freeze_patch_backbone``).

``loupe export``: a self-contained copy of a run for sharing: its config and one checkpoint holding every tensor,
a frozen encoder's included (training leaves those out, recording their weights file by SHA-256): loading it needs
no weights file."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

from loupe.atomic import atomic_write, write_text
from loupe.config import Config, dump_config
from loupe.errors import ConfigError, OutputError, prepare_output_folder
from loupe.models.backbones import Backbone
from loupe.models.factory import architecture
from loupe.training.checkpoint_io import load_weights_only
from loupe.workflows.common import RunPaths, load_model, load_run, run_checkpoint
from loupe.workflows.run_weights import frozen_record


def export_patch_encoder(run: str | Path, *, out: str | Path, checkpoint: str = "best") -> Path:
    """Write the patch network of run folder ``run`` to ``out``: the state dict of the backbone's network, in the
    form ``create_backbone(model.patch_backbone, out)`` loads (a PyTorch state dict, loaded weights-only)."""
    import torch

    cfg, model, _ = load_run(run, checkpoint)
    patch_net = model.patch_network()
    if patch_net is None:
        raise ConfigError(
            f"{run}: model.architecture {cfg.model.architecture} has no separate patch network to export"
            + (" (its trunk is streamed over the whole image)" if architecture(cfg).whole_image is not None else "")
        )
    net = patch_net.net if isinstance(patch_net, Backbone) else patch_net
    state = {k: v.detach().to("cpu", memory_format=torch.contiguous_format) for k, v in net.state_dict().items()}
    return atomic_write(out, lambda handle: torch.save(state, handle))


def export_run(
    run: str | Path, *, out: str | Path, checkpoint: str = "best", weights: str | Path | None = None
) -> Path:
    """Write a self-contained run folder ``out`` (``config.yaml`` and ``checkpoints/best.ckpt``) from run folder
    ``run``: the checkpoint holds every tensor, in float32 as trained; the config reads no weights file (its
    ``*_pretrained`` settings are ``false``: the weights are in the checkpoint), so evaluate, predict and
    export-encoder load it on any machine. ``weights``: where the run's frozen encoder's file is, when not where its
    config says (see :func:`loupe.workflows.common.load_run`). Returns ``out``."""
    import torch

    target = RunPaths(Path(out))
    if target.root.resolve() == RunPaths(Path(run)).root.resolve():
        raise OutputError(f"--out {out}: the run folder itself; give another folder")
    if target.config.exists() or target.checkpoints.exists():
        raise OutputError(f"{target.root} already holds a run (config.yaml or checkpoints/): give an empty folder")
    prepare_output_folder(target.root, "export folder (--out)")  # writable, before anything is loaded
    _, ckpt = run_checkpoint(run, checkpoint, weights=weights)
    left_out = frozen_record(ckpt)
    cfg, model, ckpt = load_model(run, checkpoint, weights=weights)
    state = {
        f"model.{k}": v.detach().to("cpu", memory_format=torch.contiguous_format) for k, v in model.state_dict().items()
    }
    saved: dict[str, Any] = {"state_dict": state, **_progress(ckpt)}
    saved["loupe_exported"] = {
        "from_run": str(Path(run).resolve()),
        "checkpoint": ckpt.name,
        "included": {
            prefix: {k: entry[k] for k in ("backbone", "file", "sha256")} for prefix, entry in left_out.items()
        },
    }
    atomic_write(target.best, lambda handle: torch.save(saved, handle))
    write_text(target.config, dump_config(_self_contained(cfg)))
    return target.root


def _progress(ckpt: Path) -> dict[str, Any]:
    """The epoch and step of a checkpoint (memory-mapped: its tensors are not read)."""
    state = load_weights_only(ckpt, mmap=True)
    return {k: state[k] for k in ("epoch", "global_step") if isinstance(state, dict) and k in state}


def _self_contained(cfg: Config) -> Config:
    """The config with no weights file to read (every network the architecture builds: its ``*_pretrained``
    setting false): every network's weights are in the exported checkpoint."""
    for prefix, _, _ in architecture(cfg).networks(cfg):  # e.g. "model.patch", "joint.thumbnail"
        section, key = prefix.split(".")
        part: Any = getattr(cfg, section)
        cfg = dataclasses.replace(cfg, **{section: dataclasses.replace(part, **{f"{key}_pretrained": False})})
    return cfg
