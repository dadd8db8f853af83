"""The range checks settings declare (``RULES`` of each section): a test of a value and what it accepts, in words.

Each form of value is checked by one rule here, so a range is written once whatever setting uses it.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import asdict, is_dataclass
from pathlib import Path
from typing import Any

#: A test of one value.
Check = Callable[[Any], bool]
#: A test and what it accepts, as the error message says it ("an integer ≥ 1").
Rule = tuple[Check, str]


def int_at_least(low: int) -> Rule:
    return (lambda v: isinstance(v, int) and not isinstance(v, bool) and v >= low), f"an integer ≥ {low}"


def finite(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def one_of(choices: tuple[str, ...]) -> Rule:
    """A value among ``choices``."""
    return (lambda v: str(v) in choices), f"one of {', '.join(choices)}"


POSITIVE_INT = int_at_least(1)
NON_NEGATIVE_INT = int_at_least(0)
POSITIVE: Rule = (lambda v: finite(v) and v > 0), "a number > 0"
NON_NEGATIVE: Rule = (lambda v: finite(v) and v >= 0), "a number ≥ 0"
FRACTION: Rule = (lambda v: finite(v) and 0 <= v <= 1), "a number in [0, 1]"
DROPOUT: Rule = (lambda v: finite(v) and 0 <= v < 1), "a number in [0, 1)"
OPEN_FRACTION: Rule = (lambda v: finite(v) and 0 < v < 1), "a number in (0, 1)"
OPTIONAL_POSITIVE: Rule = (lambda v: v is None or (finite(v) and v > 0)), "null or a number > 0"
FOLDS: Rule = (
    (lambda v: v is None or (isinstance(v, int) and not isinstance(v, bool) and v >= 2)),
    "null or an integer ≥ 2",
)
NAME: Rule = (lambda v: isinstance(v, str) and bool(v.strip())), "a non-empty name"
#: A network's name: its form here; whether the models layer knows it is checked there
#: (:func:`loupe.models.factory.check_config`), since the names live with the networks.
BACKBONE: Rule = (
    NAME[0],
    'a backbone name: "tiny", "tiny_s8", a registry encoder (loupe.models.encoders) or a timm name',
)


def _pretrained(v: Any) -> bool:
    return isinstance(v, bool) or (isinstance(v, str) and Path(v).expanduser().is_file())


PRETRAINED: Rule = (
    _pretrained,
    (
        "false, true (efficientnet-lite0-imagenet: the weights installed with loupe[imagenet]; a timm name: timm hub "
        "weights) or the path of an existing checkpoint file"
    ),
)
THUMBNAIL: Rule = (
    (lambda v: isinstance(v, (tuple, list)) and len(v) == 2 and all(isinstance(x, int) and x >= 8 for x in v)),
    "[width, height], each an integer ≥ 8",
)


def plain(obj: object) -> object:
    """Dataclasses, tuples and lists as plain dicts and lists (the YAML and comparison form)."""
    if is_dataclass(obj) and not isinstance(obj, type):
        return plain(asdict(obj))
    if isinstance(obj, dict):
        return {k: plain(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [plain(v) for v in obj]
    return obj


def show(value: Any) -> str:
    """A value as an error message quotes it."""
    return repr(value) if isinstance(value, str) else str(plain(value))
