"""The one loader of weights files (checkpoints, state dicts, safetensors), which never runs code from a file.

``torch.load(weights_only=True)`` unpickles tensors, containers and plain values only: a file holding any other
Python object (which unpickling could make run code) is refused, and so is a file that is damaged or incomplete,
each with one :class:`~loupe.errors.CheckpointError` naming the file and the fix. Training checkpoints, backbone
and encoder weights all load through :func:`load_weights_only`.
"""

from __future__ import annotations

import os
import pickle
import re
import zipfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from loupe.errors import CheckpointError

__all__ = ["load_weights_only", "mismatch", "state_dict_of"]


def load_weights_only(path: str | os.PathLike[str], map_location: Any = "cpu", *, mmap: bool = False) -> Any:
    """What the file at ``path`` holds, loaded without running code: ``torch.load(weights_only=True)``, or
    safetensors for a ``.safetensors`` file (``map_location`` then names a device; ``mmap`` memory-maps a torch
    file instead of reading it). A missing file, one holding other Python objects, and one that is damaged or
    incomplete raise :class:`CheckpointError`."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"weights file not found: {path} (give the path of an existing file)")
    if path.suffix == ".safetensors":
        return _load_safetensors(path, map_location)
    try:
        return torch.load(path, map_location=map_location, weights_only=True, mmap=mmap)
    except pickle.UnpicklingError as err:
        reason = _unpickler_reason(err)
        if "Unsupported operand" in reason:  # not a pickle at all (another format, garbage): damaged, not crafted
            raise _damaged(path, "PyTorch file", err, reason) from err
        raise CheckpointError(
            f"{path}: refused to load: it holds Python objects other than weights ({reason}); loupe loads "
            "checkpoints and weights weights-only, so that a file cannot run code. Use a checkpoint written by "
            "loupe, or save the model's state_dict() alone"
        ) from err
    except (RuntimeError, EOFError, zipfile.BadZipFile, ValueError) as err:
        raise _damaged(path, "PyTorch file", err) from err


def state_dict_of(loaded: Any, path: str | os.PathLike[str]) -> dict[str, Tensor]:
    """The state dict in what :func:`load_weights_only` read from ``path``: the mapping itself, or a checkpoint's
    ``state_dict`` entry; :class:`CheckpointError` when it is not a mapping of names to tensors."""
    if isinstance(loaded, dict) and isinstance(loaded.get("state_dict"), dict):
        loaded = loaded["state_dict"]
    if not isinstance(loaded, dict) or not all(isinstance(k, str) and isinstance(v, Tensor) for k, v in loaded.items()):
        raise CheckpointError(f"{path} is not a state dict (a mapping of names to tensors)")
    return loaded


def mismatch(expected: Mapping[str, Tensor], state: Mapping[str, Tensor]) -> str:
    """'' when ``state`` has exactly the expected keys and shapes, else a one-line account of the differences."""
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    shapes = [
        f"{k} (file {tuple(state[k].shape)}, network {tuple(v.shape)})"
        for k, v in expected.items()
        if k in state and state[k].shape != v.shape
    ]
    parts = []
    for label, items in (("missing keys", missing), ("unexpected keys", unexpected), ("wrong shapes", shapes)):
        if items:
            more = f" and {len(items) - 3} more" if len(items) > 3 else ""
            parts.append(f"{len(items)} {label} ({', '.join(items[:3])}{more})")
    return "; ".join(parts)


def _load_safetensors(path: Path, map_location: Any) -> dict[str, Tensor]:
    from safetensors.torch import load_file

    device = str(map_location) if isinstance(map_location, str | torch.device) else "cpu"
    try:
        return load_file(str(path), device=device)
    except Exception as err:  # safetensors raises its own SafetensorError (and OSError, ValueError) for a bad file
        raise _damaged(path, "safetensors file", err) from err


def _unpickler_reason(err: pickle.UnpicklingError) -> str:
    """The part of torch's weights-only refusal that says what was refused (its advice to unpickle anyway is not
    repeated)."""
    text = " ".join(str(err).split())
    found = re.search(r"WeightsUnpickler error: (.*?)(?:\. Please use|\. Check the documentation|$)", text)
    return (found.group(1) if found else text)[:200] or type(err).__name__


def _damaged(path: Path, kind: str, err: BaseException, reason: str | None = None) -> CheckpointError:
    text = reason or " ".join(str(err).split())[:200]
    return CheckpointError(
        f"cannot read {path}: not a complete {kind} ({type(err).__name__}: {text}): it may be truncated or damaged; "
        "replace it with a complete copy (a training checkpoint: delete it to fall back on an earlier one)"
    )
