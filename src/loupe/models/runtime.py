"""How a model is run: which device, which autocast, which memory format. The one place that decides them, for
every architecture and every caller (the Lightning module in training; evaluate, predict and bench outside it)."""

from __future__ import annotations

from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass

import torch

from loupe.models.interface import SlideClassifier

#: Lightning precision settings that mean automatic mixed precision, and the dtype they compute in.
AMP_DTYPES = {"16-mixed": torch.float16, "bf16-mixed": torch.bfloat16}
#: ``train.accelerator`` values that use a GPU when one is present.
GPU_ACCELERATORS = ("auto", "gpu", "cuda")


def resolve_device(accelerator: str) -> torch.device:
    """The device an accelerator setting resolves to on this machine: the GPU when there is one and the setting
    allows it, else the CPU."""
    wants_gpu = accelerator in GPU_ACCELERATORS
    return torch.device("cuda" if wants_gpu and torch.cuda.is_available() else "cpu")


@dataclass(frozen=True)
class Runtime:
    """Device, precision (Lightning's names) and memory format of a run."""

    device: torch.device
    precision: str = "32-true"
    channels_last: bool = True

    @classmethod
    def of(cls, accelerator: str, precision: str, channels_last: bool) -> Runtime:
        return cls(resolve_device(accelerator), str(precision), channels_last)

    def autocast(self, device: torch.device | None = None) -> AbstractContextManager[object]:
        """Autocast on a GPU with a mixed precision setting; nothing otherwise, or when autocast is already on
        (Lightning's precision plugin turns it on around training and validation steps)."""
        device = device or self.device
        dtype = AMP_DTYPES.get(self.precision)
        if device.type != "cuda" or dtype is None or torch.is_autocast_enabled("cuda"):
            return nullcontext()
        return torch.autocast("cuda", dtype=dtype)

    def prepare(self, model: SlideClassifier, move: bool = True) -> SlideClassifier:
        """Put ``model`` in this runtime's memory format (channels-last networks read channels-last inputs: the
        model's ``channels_last`` flag says so) and, with ``move``, on its device; on a GPU with mixed precision its
        frozen networks are held in the compute dtype. Idempotent."""
        if self.channels_last and not model.channels_last:
            model.to(memory_format=torch.channels_last)
            model.channels_last = True
        if move:
            model.to(self.device)
        dtype = AMP_DTYPES.get(self.precision)
        if self.device.type == "cuda" and dtype is not None:
            model.set_compute_dtype(dtype)
        return model
