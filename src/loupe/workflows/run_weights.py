"""Where a trained run's weights files are when it is loaded (evaluate, predict, export), which may be another
machine than the one that trained it.

A frozen encoder left out of the checkpoint (:mod:`loupe.training.frozen`) must be found: first where the user
points (``weights=`` / ``$LOUPE_WEIGHTS``: files or folders, separated by ``os.pathsep``; a folder is searched for
the recorded file name, in itself and one level down), then where the run's config says (``model.patch_pretrained``:
a path, or ``true`` for a packaged encoder's installed file). The first file whose SHA-256 is the recorded one is
used; a file that differs is refused with one message naming both. Every other network's weights are inside the
checkpoint: a weights file its config names that is not on this machine is then not needed (the setting is read as
``false``, random initialisation overwritten by the checkpoint).
"""

from __future__ import annotations

import logging
import os
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from loupe.config import Config, load_config
from loupe.errors import CheckpointError, ConfigError
from loupe.slides.cache import default_cache_dir
from loupe.training.checkpoint_io import load_weights_only
from loupe.training.frozen import FROZEN, check_file, file_sha256

log = logging.getLogger("loupe")

#: Where the user points loupe at weights files: files or folders, separated by ``os.pathsep``.
ENV_VAR = "LOUPE_WEIGHTS"
#: The settings of a run's config.yaml that name a weights file, as (section, key) (loupe 0.1's layout kept the
#: thumbnail network's under ``model``).
SETTINGS = (("model", "patch_pretrained"), ("joint", "thumbnail_pretrained"), ("model", "thumbnail_pretrained"))
#: The on-disk cache of weights files' SHA-256, under the cache folder.
HASH_CACHE = "weights-sha256.json"


def frozen_record(ckpt: Path) -> dict[str, dict[str, Any]]:
    """The record of the networks left out of a checkpoint (empty for one that holds every tensor); the file is
    memory-mapped, not read."""
    state = load_weights_only(ckpt, mmap=True)
    record = state.get(FROZEN) if isinstance(state, dict) else None
    return dict(record) if isinstance(record, dict) else {}


def run_config(config: Path, ckpt: Path, weights: str | Path | None = None) -> Config:
    """The run's config with each weights setting resolved on this machine (see the module doc)."""
    import yaml

    try:
        raw = yaml.safe_load(config.read_text())
    except (OSError, UnicodeDecodeError, yaml.YAMLError):
        return load_config(config)  # its own message
    if not isinstance(raw, dict):
        return load_config(config)
    data = raw.get("data")
    cache_dir = data.get("cache_dir") if isinstance(data, dict) else None
    cache = (Path(cache_dir).expanduser() if cache_dir else default_cache_dir()) / HASH_CACHE
    record = {entry["setting"]: entry for entry in frozen_record(ckpt).values()}
    changed = False
    for section, key in SETTINGS:
        part = raw.get(section)
        if not isinstance(part, dict) or key not in part:
            continue
        value, setting = part[key], f"{section}.{key}"
        if setting in record:
            found = find_weights(record[setting], value, weights, cache)
        elif isinstance(value, str) and not Path(value).expanduser().is_file():
            log.info("%s: %s is not here; the checkpoint holds that network's weights", setting, value)
            found = False
        else:
            continue
        changed |= found != value
        part[key] = found
    if not changed:
        return load_config(config)
    with tempfile.TemporaryDirectory() as folder:
        resolved = Path(folder) / config.name
        resolved.write_text(yaml.safe_dump(raw, sort_keys=False))
        return load_config(resolved)


def find_weights(
    entry: Mapping[str, Any], value: Any, weights: str | Path | None = None, cache: Path | None = None
) -> str | bool:
    """The setting's value that loads the recorded file: ``value`` itself when it names that file, else the path of
    the first matching file where the user points; :class:`CheckpointError` when none matches."""
    name = str(entry["file_name"])
    candidates: list[Path] = []
    for place in [weights, *os.environ.get(ENV_VAR, "").split(os.pathsep)]:
        if not place:
            continue
        path = Path(place).expanduser()
        if path.is_file():
            candidates.append(path)
        elif path.is_dir():
            candidates += [p for p in [path / name, *sorted(path.glob(f"*/{name}"))] if p.is_file()]
    configured = _configured(entry, value)
    if configured is not None:
        candidates.append(configured)
    seen: set[Path] = set()
    for path in candidates:
        if path.resolve() in seen:
            continue
        seen.add(path.resolve())
        if file_sha256(path, cache) == entry["sha256"]:
            return value if path == configured else str(path)
    if candidates:
        check_file(entry, candidates[0], cache)  # refused, naming both files
    if value is True and configured is None:  # a packaged encoder whose package is not installed: say which
        from loupe.models.encoders import ENCODERS, packaged_weights

        if entry["backbone"] in ENCODERS and ENCODERS[entry["backbone"]].packaged:
            packaged_weights(entry["backbone"], entry["setting"])
    pointed = f" nor where {ENV_VAR} points ({os.environ[ENV_VAR]})" if os.environ.get(ENV_VAR) else ""
    raise CheckpointError(
        f"{entry['setting']}: this run's frozen {entry['backbone']} was kept out of its checkpoint (recorded by "
        f"SHA-256 {entry['sha256']}), and its weights file {entry['file']} is not there{pointed}: put the file "
        f"back, or point loupe at it with {ENV_VAR}=FILE_OR_FOLDER"
    )


def _configured(entry: Mapping[str, Any], value: Any) -> Path | None:
    """The file the run's config names for the recorded network, when it is on this machine."""
    if value is True:  # a packaged encoder's installed file
        from loupe.models.encoders import ENCODERS, packaged_weights

        if entry["backbone"] not in ENCODERS:
            return None
        try:
            return packaged_weights(entry["backbone"])
        except ConfigError:
            return None
    if isinstance(value, str) and Path(value).expanduser().is_file():
        return Path(value).expanduser()
    return None
