"""On a CUDA GPU (skipped, with the reason, elsewhere): a tiny joint model trains a step under mixed precision
through :class:`~loupe.models.runtime.Runtime` as `loupe train` runs it: frozen networks held in the compute
dtype, pinned host batches and patches moved to the GPU, finite outputs and gradients."""

from __future__ import annotations

import pytest
import torch

from loupe.config import Config, JointConfig, ModelConfig
from loupe.models import SlideBatch, build_model
from loupe.models.joint import patch_reader
from loupe.models.runtime import AMP_DTYPES, Runtime

from ..helpers.runif import run_if

pytestmark = run_if(min_cuda_gpus=1)

SHAPES = ((1, 1), (2, 2), (4, 4))  # 21 cells
P = 8


class HostPixels:
    """A pixel source that, like the real one, returns patches in host memory; records what it returned."""

    embeddings = None  # the pixel source interface: no cached embeddings

    def __init__(self) -> None:
        self.returned: list[torch.Tensor] = []

    def cells(self, slides: list[int], cells: torch.Tensor) -> torch.Tensor:
        gen = torch.Generator().manual_seed(int(cells.sum()))
        patches = torch.rand(*cells.shape, 3, P, P, generator=gen)
        self.returned.append(patches)
        return patches

    def whole(self, slide: int, valid: object) -> object:
        raise AssertionError("the joint model reads cells only")


def _pinned_batch(b: int = 2) -> SlideBatch:
    gen = torch.Generator().manual_seed(0)
    return SlideBatch(
        thumbnails=torch.randint(0, 256, (b, 3, 32, 32), dtype=torch.uint8, generator=gen).pin_memory(),
        valid=torch.ones(b, 21, dtype=torch.bool).pin_memory(),
        labels=(torch.arange(b) % 2).pin_memory(),
        indices=torch.tensor([7, 3, 5, 1][:b]).pin_memory(),
        shapes=SHAPES,
    )


@pytest.mark.parametrize(
    "precision", ["16-mixed", pytest.param("bf16-mixed", marks=run_if(min_cuda_gpus=1, bf16_cuda=True))]
)
def test_a_joint_model_trains_a_step_under_mixed_precision_on_the_gpu(precision: str) -> None:
    torch.manual_seed(0)
    cfg = Config(
        model=ModelConfig(freeze_patch_backbone=True),
        joint=JointConfig(patch_size=P, thumbnail_size=(32, 32), k=3),
    )
    runtime = Runtime(torch.device("cuda"), precision)
    model = runtime.prepare(build_model(cfg, 2)).train()
    dtype = AMP_DTYPES[precision]
    assert "patch_net" in model.frozen
    frozen = list(model.patch_net.parameters())
    assert frozen and all(p.is_cuda and p.dtype == dtype and not p.requires_grad for p in frozen)
    trained = [p for p in model.parameters() if p.requires_grad]
    assert trained and all(p.is_cuda and p.dtype == torch.float32 for p in trained)  # float32 master weights

    host = _pinned_batch()
    assert host.thumbnails.is_pinned()
    batch = host.to(runtime.device, non_blocking=True)
    for moved, source in zip((batch.thumbnails, batch.valid, batch.labels, batch.indices),
                             (host.thumbnails, host.valid, host.labels, host.indices), strict=True):  # fmt: skip
        assert moved.is_cuda and torch.equal(moved.cpu(), source)

    pixels = HostPixels()
    with runtime.autocast():
        out = model(batch, pixels, labels=batch.labels)
        loss = out.loss.mean()
    loss.backward()
    torch.cuda.synchronize()
    assert pixels.returned and all(not t.is_cuda for t in pixels.returned)  # read on the host, moved by the model
    assert out.logits.is_cuda and torch.isfinite(out.logits).all() and torch.isfinite(loss)
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in trained)
    assert all(p.grad is None for p in frozen)


def test_patches_are_pinned_and_copied_to_the_gpu() -> None:
    pixels = HostPixels()
    read = patch_reader(pixels, _pinned_batch(), torch.device("cuda"))
    cells = torch.tensor([[0, 5, 20], [1, 2, 3]])
    patches = read(cells)
    torch.cuda.synchronize()
    assert patches.is_cuda and torch.equal(patches.cpu(), pixels.returned[0])
