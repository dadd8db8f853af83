"""Frozen encoders stay out of checkpoints: a frozen patch network whose weights came from a file (a registry
encoder's published file, a packaged encoder's installed file, any backbone's ``patch_pretrained`` path) is recorded
in every checkpoint by its name, the file and the file's SHA-256 instead of its tensors, which a frozen network
never changes. A run with a frozen H-optimus-0 then no longer writes ~4.5 GB into each checkpoint.

A checkpoint's record is ``checkpoint[FROZEN]``: one entry per network left out, keyed by the state-dict prefix
(``"model.patch_net."``). Loading fills those tensors back from the network built from the run's config, after
checking that its file has the recorded SHA-256 (:func:`fill_frozen`; resuming training: :func:`restore_frozen`).
Hashing a multi-GB file takes seconds: hashes are kept by (path, size, mtime), in memory and, where a cache file is
given, on disk.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
from collections.abc import Mapping, MutableMapping
from pathlib import Path
from typing import Any

from torch import Tensor

from loupe.atomic import write_text
from loupe.errors import CheckpointError
from loupe.models.backbone_base import Backbone
from loupe.models.interface import SlideClassifier

__all__ = ["FROZEN", "file_sha256", "fill_frozen", "frozen_networks", "restore_frozen", "strip_frozen"]

#: The checkpoint key of the record of networks left out.
FROZEN = "loupe_frozen"

#: The frozen networks that may be left out: (state-dict prefix inside the Lightning module, the setting that
#: names their weights file). Only the patch network is ever frozen (``model.freeze_patch_backbone``).
_NETWORKS = (("model.patch_net.", "model.patch_pretrained"),)

_MEMO: dict[tuple[str, int, int], str] = {}


def file_sha256(path: str | os.PathLike[str], cache: Path | None = None) -> str:
    """The SHA-256 of a file (hex), remembered by (resolved path, size, mtime) in this process and, with ``cache`` (a
    JSON file), across processes; a cache that cannot be read or written is ignored."""
    real = Path(path).expanduser().resolve()
    stat = real.stat()
    key = (str(real), stat.st_size, stat.st_mtime_ns)
    if key in _MEMO:
        return _MEMO[key]
    known: dict[str, Any] = {}
    if cache is not None:
        with contextlib.suppress(OSError, ValueError):
            known = dict(json.loads(cache.read_text()))
        entry = known.get(key[0])
        if isinstance(entry, dict) and (entry.get("size"), entry.get("mtime_ns")) == key[1:]:
            _MEMO[key] = str(entry["sha256"])
            return _MEMO[key]
    digest = hashlib.sha256()
    with real.open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 24), b""):
            digest.update(block)
    _MEMO[key] = digest.hexdigest()
    if cache is not None:
        known[key[0]] = {"size": key[1], "mtime_ns": key[2], "sha256": _MEMO[key]}
        with contextlib.suppress(OSError):
            write_text(cache, json.dumps(known, indent=1) + "\n")
    return _MEMO[key]


def frozen_networks(model: SlideClassifier) -> dict[str, tuple[str, Backbone]]:
    """The networks of ``model`` that are left out of its checkpoints, by prefix: frozen, and loaded from a file."""
    out: dict[str, tuple[str, Backbone]] = {}
    for prefix, setting in _NETWORKS:
        net = model.patch_network()
        if model.patch_network_frozen and isinstance(net, Backbone) and net.weights_file is not None:
            out[prefix] = (setting, net)
    return out


def strip_frozen(checkpoint: MutableMapping[str, Any], model: SlideClassifier) -> None:
    """Leave the frozen file-loaded networks of ``model`` out of ``checkpoint["state_dict"]`` and record each by
    backbone name, file, size and SHA-256 (``checkpoint[FROZEN]``)."""
    state: MutableMapping[str, Tensor] = checkpoint["state_dict"]
    record: dict[str, dict[str, Any]] = {}
    for prefix, (setting, net) in frozen_networks(model).items():
        keys = [k for k in state if k.startswith(prefix)]
        if not keys:
            continue
        path = net.weights_file
        assert path is not None
        record[prefix] = {
            "setting": setting,
            "backbone": net.name,
            "file": str(path),
            "file_name": path.name,
            "size": path.stat().st_size,
            "sha256": file_sha256(path),
            "tensors": len(keys),
        }
        for k in keys:
            del state[k]
    if record:
        checkpoint[FROZEN] = record


def check_file(entry: Mapping[str, Any], path: str | os.PathLike[str], cache: Path | None = None) -> None:
    """Refuse ``path`` as the weights of the recorded network ``entry`` when its SHA-256 differs: one message
    naming both files and both hashes."""
    found = file_sha256(path, cache)
    if found != entry["sha256"]:
        raise CheckpointError(
            f"{entry['setting']}: {path} (SHA-256 {found}) is not the file this run's frozen {entry['backbone']} was "
            f"trained with: {entry['file']} (SHA-256 {entry['sha256']}, {entry['size']} bytes). Give that file "
            "(LOUPE_WEIGHTS=FILE_OR_FOLDER), or load a self-contained checkpoint written by `loupe export`"
        )


def fill_frozen(
    state: MutableMapping[str, Tensor], record: Mapping[str, Mapping[str, Any]], model: SlideClassifier, prefix: str
) -> None:
    """Put back into ``state`` (keys under ``prefix``: "model." in a Lightning checkpoint, "" in a model's own
    state dict) the tensors of the networks ``record`` says were left out, from ``model``, which was built from the
    run's config with the recorded files (already checked by :func:`check_file`). A network the record names that
    ``model`` does not have frozen from a file, or a left-out tensor found in ``state``, is a CheckpointError."""
    networks = frozen_networks(model)
    own = model.state_dict()
    for left_out, entry in record.items():
        if left_out not in networks:
            raise CheckpointError(
                f"the checkpoint left out the frozen {entry.get('backbone')} ({left_out.rstrip('.')}), but the "
                f"model built from the run's config has no frozen network there loaded from a file "
                f"({entry.get('setting')}): load it with the run's own config"
            )
        inner = left_out.removeprefix("model.")
        for key, tensor in own.items():
            if key.startswith(inner):
                if prefix + key in state:
                    raise CheckpointError(f"the checkpoint holds {prefix + key}, which its record says was left out")
                state[prefix + key] = tensor


def restore_frozen(checkpoint: MutableMapping[str, Any], model: SlideClassifier) -> None:
    """Resuming training: check each left-out network's file against its record and put its tensors back into
    ``checkpoint["state_dict"]`` (before Lightning loads it, strictly)."""
    record = checkpoint.get(FROZEN)
    if not record:
        return
    networks = frozen_networks(model)
    for left_out, entry in record.items():
        if left_out in networks:
            path = networks[left_out][1].weights_file
            assert path is not None
            check_file(entry, path)
    fill_frozen(checkpoint["state_dict"], record, model, "model.")
    del checkpoint[FROZEN]
