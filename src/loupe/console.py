"""A quiet, readable console: every message once, as ``loupe: ...`` on stderr; no third-party advertisements and
no deprecation warnings from libraries in a normal run."""

from __future__ import annotations

import importlib
import logging
import sys
import warnings

#: Loggers whose messages reach the console: loupe's own and Lightning's (which otherwise may print its own copy).
LOGGERS = ("loupe", "lightning", "lightning.pytorch", "lightning.fabric", "lightning_fabric")
#: Fragments of messages that advertise instead of inform (Lightning's LitLogger / litmodels tips).
ADVERTISEMENTS = ("💡 Tip", "litlogger", "litmodels", "Lightning Experiments platform")


#: Library warnings about what loupe does on purpose: StreamingCLAM's normalisation layers stay frozen in eval mode
#: (streaming is exact only so); a resumed run writes into its own checkpoint folder.
EXPECTED_WARNINGS = (
    r".*module\(s\) in eval mode at the start of training.*",
    r"Checkpoint directory .* exists and is not empty.*",
)


class _StderrHandler(logging.StreamHandler):
    """Writes to whatever ``sys.stderr`` is when a message is emitted (tests and notebooks replace it)."""

    @property
    def stream(self) -> object:
        return sys.stderr

    @stream.setter
    def stream(self, value: object) -> None:
        pass


class _DropAdvertisements(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        text = record.getMessage()
        return not any(fragment in text for fragment in ADVERTISEMENTS)


def configure_console(level: int = logging.INFO, with_lightning: bool = True) -> None:
    """One handler on the root logger, shared by loupe and Lightning; idempotent. ``with_lightning``: import it first,
    so that the handlers it installs on import are replaced (else each of its messages prints twice). Library
    deprecation warnings are hidden: they are for loupe's developers, whose tests show them."""
    if with_lightning:  # its import installs handlers of its own, replaced below
        importlib.import_module("lightning.pytorch")
    root = logging.getLogger()
    handler = next((h for h in root.handlers if getattr(h, "_loupe", False)), None)
    if handler is None:
        handler = _StderrHandler()
        handler.setFormatter(logging.Formatter("loupe: %(message)s"))
        handler.addFilter(_DropAdvertisements())
        handler._loupe = True  # type: ignore[attr-defined]
        root.addHandler(handler)
    root.setLevel(logging.WARNING)
    for name in LOGGERS:
        logger = logging.getLogger(name)
        logger.handlers = [h for h in logger.handlers if getattr(h, "_loupe", False)]
        logger.propagate = True
        logger.setLevel(level)
    for category in (DeprecationWarning, FutureWarning, PendingDeprecationWarning):
        warnings.filterwarnings("ignore", category=category)
    for message in EXPECTED_WARNINGS:
        warnings.filterwarnings("ignore", message=message)
