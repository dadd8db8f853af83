"""A quiet, readable console: every message once, as ``loupe: ...`` on stderr; no third-party advertisements and
no deprecation warnings from libraries in a normal run; long work shown as a progress bar on a terminal and as a
few plain lines in a log file (:func:`progress`)."""

from __future__ import annotations

import importlib
import logging
import math
import sys
import time
import warnings
from collections.abc import Callable
from types import TracebackType
from typing import Any, TextIO

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
    """Writes to whatever ``sys.stderr`` is when a message is emitted (tests and notebooks replace it); above any
    progress bar on screen (which is cleared, then redrawn below the message), never through it."""

    def emit(self, record: logging.LogRecord) -> None:
        tqdm = sys.modules.get("tqdm")  # a bar can be on screen only when tqdm was imported
        if tqdm is None:
            super().emit(record)
            return
        with tqdm.tqdm.external_write_mode(file=sys.stderr):
            super().emit(record)

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


class _OncePerProcess(logging.Filter):
    """Lightning's messages once per process: it repeats its own (``GPU available``, ``LOCAL_RANK``...) for every
    Trainer and stage, and a benchmark makes many Trainers."""

    def __init__(self) -> None:
        super().__init__()
        self.seen: set[tuple[int, str]] = set()

    def filter(self, record: logging.LogRecord) -> bool:
        if not record.name.startswith(("lightning", "pytorch_lightning")):
            return True
        key = (record.levelno, record.getMessage())
        if key in self.seen:
            return False
        self.seen.add(key)
        return True


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
        handler.addFilter(_OncePerProcess())
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


# --- progress -------------------------------------------------------------------------------------------------------

#: Seconds between two progress lines in a log (not a terminal): a line every 30 s says the job is alive and when it
#: should end, without filling a SLURM log (a 10,000-slide cohort at 2 slides/s writes ~170 lines, not 10,000).
LOG_INTERVAL_S = 30.0


def is_interactive(stream: TextIO | None = None) -> bool:
    """Whether ``stream`` (default: stderr) is a person's terminal, not a log file or a pipe (CI, SLURM, nohup)."""
    stream = sys.stderr if stream is None else stream
    try:
        return bool(stream.isatty())
    except (AttributeError, ValueError):  # closed, or an object without isatty
        return False


def duration(seconds: float) -> str:
    """``seconds`` for a reader: 4.2 s, 3 min 20 s, 1 h 18 min."""
    if not math.isfinite(seconds):
        return "?"
    if seconds < 60:
        return f"{seconds:.1f} s" if seconds < 10 else f"{seconds:.0f} s"
    minutes, secs = divmod(round(seconds), 60)
    if minutes < 60:
        return f"{minutes} min {secs} s" if secs else f"{minutes} min"
    hours, minutes = divmod(minutes, 60)
    return f"{hours} h {minutes} min" if minutes else f"{hours} h"


class Progress:
    """The counts of a long job for the person waiting on it: items done of ``total``, failed, rate and time left.

    On a terminal (``bar``; default: stderr is one) a bar redrawn in place; messages logged meanwhile print above
    it. In a log, a line every ``interval_s`` seconds (:data:`LOG_INTERVAL_S`) and one at the end, through the
    ``loupe`` logger, never a redraw. ``what`` names the items (plural: "slides"); ``label`` starts each line.
    """

    def __init__(
        self,
        total: int,
        what: str = "items",
        *,
        label: str = "",
        bar: bool | None = None,
        interval_s: float = LOG_INTERVAL_S,
        logger: logging.Logger | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.total, self.what, self.label = int(total), what, label
        self.interval_s, self.clock = interval_s, clock
        self.log = logger or logging.getLogger("loupe")
        self.done = self.failed = 0
        self.start = self.last_line = clock()
        self.closed = False
        self._bar: Any = None
        if is_interactive() if bar is None else bar:
            from tqdm import tqdm  # type: ignore[import-untyped]

            self._bar = tqdm(
                total=self.total, desc=label or None, unit=what.rstrip("s") or what, file=sys.stderr,
                dynamic_ncols=True, smoothing=0.1, leave=True,
            )  # fmt: skip

    @property
    def bar(self) -> bool:
        """Whether a bar is drawn (a terminal), not lines logged."""
        return self._bar is not None

    def advance(self, n: int = 1, *, failed: int = 0) -> None:
        """``n`` more items finished, ``failed`` of them failed."""
        self.done += n
        self.failed += failed
        if self._bar is not None:
            if failed:
                self._bar.set_postfix_str(f"{self.failed} failed", refresh=False)
            self._bar.update(n)
        elif self.clock() - self.last_line >= self.interval_s and self.done < self.total:
            self.log.info("%s", self.line())
            self.last_line = self.clock()

    def print(self, text: str) -> None:
        """Print ``text`` to stdout above the bar (which is redrawn below it), or plainly when there is none: a
        bench's result lines beside its progress."""
        if self._bar is None:
            print(text, flush=True)
            return
        with self._bar.external_write_mode(file=sys.stdout):
            print(text, flush=True)

    def line(self) -> str:
        """Where the job is: ``predict: 120/10000 slides (1.2%), 3 failed; 2.1 slides/s, about 1 h 18 min left``;
        at the end, the time it took."""
        elapsed = max(self.clock() - self.start, 1e-9)
        head = f"{self.label}: " if self.label else ""
        share = f" ({100 * self.done / self.total:.1f}%)" if self.total and self.done < self.total else ""
        text = f"{head}{self.done}/{self.total} {self.what}{share}"
        if self.failed:
            text += f", {self.failed} failed"
        rate = self.done / elapsed
        if self.done >= self.total:
            return f"{text} in {duration(elapsed)}" + (f" ({_rate(rate, self.what)})" if self.done else "")
        left = (self.total - self.done) / rate if rate > 0 else math.inf
        return f"{text}; {_rate(rate, self.what)}, about {duration(left)} left" if self.done else text

    def close(self, *, failed: bool = False) -> None:
        """The last line (in a log) or the finished bar (on a terminal); idempotent. ``failed``: the job ended in
        an error, which says the rest: no last line."""
        if self.closed:
            return
        self.closed = True
        if self._bar is not None:
            self._bar.close()
        elif self.total and not failed:
            self.log.info("%s", self.line())

    def __enter__(self) -> Progress:
        return self

    def __exit__(
        self, kind: type[BaseException] | None, value: BaseException | None, traceback: TracebackType | None
    ) -> None:
        self.close(failed=kind is not None)


def _rate(per_s: float, what: str) -> str:
    """2.1 slides/s, or 12 s per slide when slower than one a second."""
    if per_s >= 1 or per_s <= 0:
        return f"{per_s:.1f} {what}/s"
    return f"{duration(1 / per_s)} per {what.rstrip('s') or what}"


def progress(
    total: int,
    what: str = "items",
    *,
    label: str = "",
    bar: bool | None = None,
    interval_s: float = LOG_INTERVAL_S,
) -> Progress:
    """A :class:`Progress` for ``total`` items, to use as a context manager::

        with progress(len(cases), "cases", label="bench") as shown:
            for case in cases:
                ...
                shown.advance()  # or shown.advance(failed=1)

    A bar on a terminal; in a log, a line every ``interval_s`` seconds and one at the end."""
    return Progress(total, what, label=label, bar=bar, interval_s=interval_s)
