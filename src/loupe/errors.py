"""Errors a user can act on: each names the offending file or option and the fix."""

from __future__ import annotations

import errno
import os
import uuid
from pathlib import Path


class LoupeError(Exception):
    """Base class for user-facing errors; the CLI prints the message without a traceback."""


class SlideError(LoupeError):
    """A slide cannot be opened or read (missing, corrupt, unsupported, no resolution...)."""


class ManifestError(LoupeError):
    """A manifest is malformed or refers to missing files or unknown labels."""


class ConfigError(LoupeError):
    """A configuration value is invalid."""


class OutputError(LoupeError):
    """An output cannot be written: the disk is full, the folder is read-only or not ours to write."""


class CheckpointError(LoupeError):
    """A checkpoint or weights file cannot be loaded safely (corrupt, or holding pickled code)."""


class SlideReadError(SlideError):
    """Reading pixels of an opened slide failed (a corrupt tile, a file truncated or replaced while in use);
    ``index`` is the slide's position in its catalog, so a training step can drop that slide alone."""

    def __init__(self, message: str, index: int) -> None:
        super().__init__(message)
        self.index = index


#: errno values that mean the environment refused a write (full disk, quota, read-only, permissions, an output
#: path running through a file).
WRITE_ERRNOS = frozenset(
    {errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EPERM, errno.EFBIG, errno.ENOTDIR, errno.EEXIST}
)


def is_write_refusal(err: BaseException) -> bool:
    """Whether ``err`` is an OSError by which the file system refused a write (see :data:`WRITE_ERRNOS`)."""
    return isinstance(err, OSError) and err.errno in WRITE_ERRNOS


def output_error(err: OSError, folder: str | os.PathLike[str] | None = None, needed: int | None = None) -> OutputError:
    """One actionable message for a refused write: what happened, in which folder, how much space it needs."""
    path = Path(folder) if folder is not None else Path(str(err.filename or ".")).parent
    if err.errno in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG):
        need = f" (this write needs about {_size(needed)})" if needed else ""
        return OutputError(
            f"no space left in {path}{need}: free some space there (or choose another output folder) and run the "
            "same command again; it continues where it stopped"
        )
    reason = os.strerror(err.errno or 0)
    if folder is None and err.filename:  # raised anywhere: it may also have been a read
        return OutputError(
            f"{err.filename}: {reason}: the output folder must be a folder you can write to (and inputs files you "
            "can read): choose another one, or fix the permissions, and run the command again"
        )
    return OutputError(
        f"cannot write to {path} ({reason}): choose a writable output folder, or make this one writable, and run "
        "the command again"
    )


def prepare_output_folder(path: str | os.PathLike[str], what: str = "output folder") -> Path:
    """Create folder ``path`` (and its parents) and check that files can be written in it, by creating and removing
    a small temporary file: a command learns at its start, in one message naming the folder and the fix, that its
    outputs could not be written (not from a traceback after hours of work). ``what`` names the setting, e.g.
    ``"output folder (--out)"``."""
    folder = Path(path)
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except FileExistsError as err:  # a file (or a link to one) where the folder should be
        raise OutputError(
            f"{what} {folder} is a file, not a folder: choose another path, or move the file away, and run the "
            "command again"
        ) from err
    except OSError as err:
        raise OutputError(
            f"cannot create the {what} {folder} ({_reason(err)}): choose a folder you can write to, or fix the "
            "permissions of the one above it, and run the command again"
        ) from err
    probe = folder / f".loupe-write-check-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    try:
        fd = os.open(probe, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        os.close(fd)
        os.unlink(probe)
    except OSError as err:
        raise OutputError(
            f"cannot write in the {what} {folder} ({_reason(err)}): choose a folder you can write to, or make this "
            "one writable, and run the command again"
        ) from err
    return folder


def _reason(err: OSError) -> str:
    """The system's words for ``err``: 'Permission denied', 'Read-only file system', 'Not a directory'..."""
    return os.strerror(err.errno) if err.errno else (str(err) or type(err).__name__)


def _size(n: int) -> str:
    """``n`` bytes for a reader: 512 bytes, 2.7 MB, 1.3 GB."""
    if n < 1000:
        return f"{n} bytes"
    value, units = n / 1000, ["KB", "MB", "GB"]
    while value >= 1000 and len(units) > 1:
        value, units = value / 1000, units[1:]
    return f"{value:.1f} {units[0]}"


def describe_error(err: BaseException) -> str:
    """A one-line reason for a failed slide or step: loupe's own message, or the exception type and text."""
    text = " ".join(str(err).split())
    if isinstance(err, LoupeError) and text:
        return text
    return f"{type(err).__name__}: {text}" if text else type(err).__name__
