"""``run_if``: one marker that skips a test, saying why, when this machine lacks the hardware or packages it needs
(after Lightning's ``RunIf``). Use as ``@run_if(min_cuda_gpus=1, bf16_cuda=True)``."""

from __future__ import annotations

import importlib.util
import re

import pytest
import torch


def run_if(
    *,
    min_cuda_gpus: int = 0,
    bf16_cuda: bool = False,
    min_torch: str | None = None,
    packages: tuple[str, ...] = (),
) -> pytest.MarkDecorator:
    """A ``skipif`` mark that skips unless every condition holds: at least ``min_cuda_gpus`` CUDA devices,
    bfloat16 support on the first of them, torch at least ``min_torch``, each of ``packages`` importable. The
    reason lists each condition that fails, so a skipped test says what it would need."""
    reasons = []
    gpus = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if gpus < min_cuda_gpus:
        reasons.append(f"needs {min_cuda_gpus} CUDA GPU{'s' if min_cuda_gpus > 1 else ''} (found {gpus})")
    if bf16_cuda and not (gpus and torch.cuda.is_bf16_supported()):
        reasons.append("needs a CUDA GPU with bfloat16")
    if min_torch is not None and _version(torch.__version__) < _version(min_torch):
        reasons.append(f"needs torch>={min_torch} (found {torch.__version__})")
    missing = [p for p in packages if importlib.util.find_spec(p) is None]
    if missing:
        reasons.append(f"needs {', '.join(missing)} installed")
    return pytest.mark.skipif(bool(reasons), reason="; ".join(reasons) or "runs here")


def _version(text: str) -> tuple[int, ...]:
    """The numeric release of a version string ('2.5.1+cu121' → (2, 5, 1), '2.6.0a0' → (2, 6, 0))."""
    release = re.match(r"\d+(?:\.\d+)*", text)
    return tuple(int(n) for n in release.group().split(".")) if release else ()
