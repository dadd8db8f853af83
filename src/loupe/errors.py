"""Errors a user can act on: each names the offending file or option and the fix."""

from __future__ import annotations


class LoupeError(Exception):
    """Base class for user-facing errors; the CLI prints the message without a traceback."""


class SlideError(LoupeError):
    """A slide cannot be opened or read (missing, corrupt, unsupported, no resolution...)."""


class ManifestError(LoupeError):
    """A manifest is malformed or refers to missing files or unknown labels."""


class ConfigError(LoupeError):
    """A configuration value is invalid."""


def describe_error(err: BaseException) -> str:
    """A one-line reason for a failed slide or step: loupe's own message, or the exception type and text."""
    text = " ".join(str(err).split())
    if isinstance(err, LoupeError) and text:
        return text
    return f"{type(err).__name__}: {text}" if text else type(err).__name__
