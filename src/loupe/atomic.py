"""Atomic file writes: a reader, a resumed run or a crash never sees a half-written file.

The content goes to a temporary file beside the target, is flushed to disk and then moved onto the target with
``os.replace``, so the target is either the old file or the complete new one. The temporary file is created
with mode 0o666 less the umask, the permissions of any ordinarily created file (``tempfile.mkstemp`` would
leave the output readable by its owner only), and it is removed whenever the write fails.

This is the bottom layer of the package: it imports nothing from loupe.
"""

from __future__ import annotations

import contextlib
import os
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import IO

__all__ = ["atomic_write", "write_bytes", "write_text"]


def atomic_write(path: str | os.PathLike[str], write: Callable[[IO[bytes]], object]) -> Path:
    """Call ``write`` on a binary temporary file beside ``path``, then move it onto ``path``; returns the path.

    Missing parent folders are created. If ``write`` (or anything after it) raises, the temporary file is
    removed and an existing file at ``path`` is left as it was.
    """
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp_name = os.fspath(target.parent / f".{target.name}.{uuid.uuid4().hex}.tmp")
    fd = os.open(tmp_name, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)  # 0o666 & ~umask
    try:
        with os.fdopen(fd, "wb") as handle:
            write(handle)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp_name, target)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp_name)
        raise
    return target


def write_bytes(path: str | os.PathLike[str], data: bytes) -> Path:
    """Write ``data`` to ``path`` atomically."""
    return atomic_write(path, lambda handle: handle.write(data))


def write_text(path: str | os.PathLike[str], text: str, encoding: str = "utf-8") -> Path:
    """Write ``text`` to ``path`` atomically, encoded (UTF-8 by default) with its newlines as given."""
    return write_bytes(path, text.encode(encoding))
