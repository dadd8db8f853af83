"""Checkpoints that survive being killed: written atomically and durably, loaded weights-only, resumed from the
last good one, with a count of resumes in the run folder.

What Lightning 2.6 does and does not guarantee: ``TorchCheckpointIO`` serialises into memory and writes through an
fsspec transaction (a temporary file moved onto the target on commit), so a SIGKILL during the write leaves the old
file in place; but nothing is fsynced, so after a power loss or a kernel crash the renamed file can be empty or
short, and the temporary files of killed writes are left behind. Its resume load (``Trainer.fit(ckpt_path=...)``)
passes ``weights_only=None``, which means "unpickle anything" with ``TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD`` set. Here
the file is written beside the target, fsynced, renamed with ``os.replace`` and the folder fsynced; every load is
weights-only (:func:`loupe.models.weights.load_weights_only`, the one loader of weights files); a full disk or a
read-only folder becomes one :class:`~loupe.errors.OutputError` naming the folder and the space needed.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import time
import zipfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from lightning.fabric.plugins.io.torch_io import TorchCheckpointIO

from loupe.atomic import atomic_write, write_text
from loupe.errors import CheckpointError, is_write_refusal, output_error
from loupe.models.weights import load_weights_only  # the one loader; imported from here by the workflows

log = logging.getLogger("loupe")

__all__ = ["RESUMES_FILE", "SafeCheckpointIO", "clean_temporaries", "load_weights_only", "record_resume", "resume_from"]

#: The run folder's record of how many times training resumed, and from what.
RESUMES_FILE = "resumes.json"


def _tensor_bytes(obj: Any) -> int:
    """The bytes of the tensors in a checkpoint (what its file needs, give or take the pickled structure)."""
    if isinstance(obj, torch.Tensor):
        return obj.numel() * obj.element_size()
    if isinstance(obj, dict):
        return sum(_tensor_bytes(v) for v in obj.values())
    if isinstance(obj, list | tuple):
        return sum(_tensor_bytes(v) for v in obj)
    return 0


def _fsync_folder(folder: Path) -> None:
    """Make a rename in ``folder`` durable (not supported everywhere: then skipped)."""
    with contextlib.suppress(OSError):
        fd = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


class SafeCheckpointIO(TorchCheckpointIO):
    """Lightning's checkpoint IO, with atomic and durable writes and weights-only loads (see the module doc)."""

    def save_checkpoint(self, checkpoint: dict[str, Any], path: Any, storage_options: Any | None = None) -> None:
        if storage_options is not None:
            raise TypeError("SafeCheckpointIO takes no storage_options")
        target = Path(path)
        try:
            atomic_write(target, lambda handle: torch.save(checkpoint, handle))
        except OSError as err:
            if is_write_refusal(err):
                raise output_error(err, target.parent, _tensor_bytes(checkpoint)) from err
            raise
        _fsync_folder(target.parent)

    def load_checkpoint(
        self, path: Any, map_location: Callable | None = lambda storage, loc: storage, weights_only: bool | None = None
    ) -> dict[str, Any]:
        if not Path(path).is_file():
            raise FileNotFoundError(f"Checkpoint file not found: {path}")
        loaded = load_weights_only(path, map_location)  # whatever the caller asked: never unpickle code
        if not isinstance(loaded, dict):
            raise CheckpointError(f"{path}: not a Lightning checkpoint (a {type(loaded).__name__}, not a dict)")
        return loaded


def clean_temporaries(folder: Path) -> int:
    """Remove the temporary files of checkpoint writes that were killed (``.NAME.ckpt.<hex>.tmp``); returns how many."""
    removed = 0
    if folder.is_dir():
        for tmp in folder.glob(".*.ckpt.*.tmp"):
            with contextlib.suppress(OSError):
                tmp.unlink()
                removed += 1
    return removed


def is_complete(path: Path) -> bool:
    """Whether ``path`` is a whole checkpoint: a zip archive (torch.save's format) whose every member's CRC checks."""
    try:
        with zipfile.ZipFile(path) as archive:
            return archive.testzip() is None and any(n.endswith("data.pkl") for n in archive.namelist())
    except (OSError, zipfile.BadZipFile, ValueError, EOFError):
        return False


def resume_from(folder: Path, names: tuple[str, ...] = ("last.ckpt", "best.ckpt"), tidy: bool = True) -> Path | None:
    """The checkpoint to resume from: the first of ``names`` in ``folder`` that is complete. With ``tidy`` (one
    process of a distributed run), a damaged one (written by another tool without a rename, or cut short by a crash
    of the machine) is set aside as ``NAME.damaged`` with a warning, so that it is neither resumed from nor taken
    for a good one again, and the temporary files of killed writes are removed."""
    if tidy:
        clean_temporaries(folder)
    for name in names:
        path = folder / name
        if not path.is_file():
            continue
        if is_complete(path):
            return path
        if tidy:
            aside = path.with_name(f"{path.name}.damaged")
            log.warning("%s is damaged (incomplete or corrupt): set aside as %s", path, aside.name)
            with contextlib.suppress(OSError):
                os.replace(path, aside)
    return None


def record_resume(run_root: Path, checkpoint: Path) -> int:
    """Count one more resume in ``run_root/resumes.json`` (with the checkpoint's epoch and step); returns the count."""
    record = run_root / RESUMES_FILE
    try:
        data = json.loads(record.read_text())
        history = list(data.get("history", []))
    except (OSError, ValueError, AttributeError):
        history = []
    entry: dict[str, Any] = {"checkpoint": checkpoint.name, "time": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
    with contextlib.suppress(CheckpointError, KeyError, TypeError):
        state = load_weights_only(checkpoint, mmap=True)  # mapped, not read: only two numbers are needed
        entry |= {"epoch": int(state["epoch"]), "global_step": int(state["global_step"])}
    history.append(entry)
    try:
        write_text(record, json.dumps({"resumes": len(history), "history": history}, indent=2) + "\n")
    except OSError as err:
        if is_write_refusal(err):
            raise output_error(err, run_root) from err
        raise
    return len(history)
