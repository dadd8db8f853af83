"""A slide read per tile can fail in its backward pass (streaming recomputes every tile there), after some tiles'
gradients were already added to the parameters': the slide is skipped and counted like any failed slide, and what
it had added is taken back, so the step is the step of the slides that read."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.data import DataLoader

from loupe.config import TrainConfig
from loupe.data.catalog import SlideFailures
from loupe.data.manifest import SlideRecord
from loupe.errors import SlideReadError
from loupe.models.interface import (
    ImageRegions,
    InferenceSettings,
    PixelSource,
    SlideBatch,
    SlideClassifier,
    SlideOutput,
    WholeImage,
    read_crop,
)
from loupe.training import module as module_code
from loupe.training.module import SlideClassifierModule
from loupe.training.trainer import build_trainer

pytestmark = pytest.mark.filterwarnings(
    "ignore:You are trying to `self.log\\(\\)`", "ignore:.*does not have many workers"
)

SIZE, TILE = 8, 4  # an 8 × 8 image in four 4 × 4 tiles
TILES = [(slice(y, y + TILE), slice(x, x + TILE)) for y in range(0, SIZE, TILE) for x in range(0, SIZE, TILE)]


class Regions:
    """An image read crop by crop whose ``fail_at``-th crop (counting from 1; 0: none) raises, as a slide's
    corrupt tile would."""

    def __init__(self, slide: int, fail_at: int = 0) -> None:
        gen = torch.Generator().manual_seed(slide)
        self.image = torch.randint(0, 256, (1, 3, SIZE, SIZE), dtype=torch.uint8, generator=gen)
        self.slide, self.fail_at, self.crops = slide, fail_at, 0

    @property
    def shape(self) -> tuple[int, int, int, int]:
        return (1, 3, SIZE, SIZE)

    def crop(self, rows: slice, cols: slice) -> Tensor:
        self.crops += 1
        if self.crops == self.fail_at:
            raise SlideReadError("reading pixels failed: corrupt tile", self.slide)
        return self.image[..., rows, cols]


class Pixels:
    """Whole images of slides 0..n as regions (or, with ``in_memory``, as tensors); ``fail_at``: by slide."""

    def __init__(self, fail_at: dict[int, int] | None = None, in_memory: bool = False) -> None:
        self.fail_at, self.in_memory = fail_at or {}, in_memory

    embeddings = None  # the pixel source interface: no cached embeddings

    def cells(self, slides: Any, cells: Tensor) -> Tensor:
        raise AssertionError("whole images only")

    def whole(self, slide: int, valid: Any) -> WholeImage:
        regions = Regions(slide, self.fail_at.get(slide, 0))
        image: Tensor | ImageRegions = regions.image if self.in_memory else regions
        return WholeImage(image, torch.ones(1, 1, dtype=torch.bool), (0, 0, 1, 1))


class _Tiled(torch.autograd.Function):
    """``weight @ Σ_tiles mean(crop)``, computed as streaming is: the forward reads every tile without autograd,
    the backward reads each tile again and back-propagates it into the weight's ``.grad`` at once."""

    @staticmethod
    def forward(ctx: Any, image: Tensor | ImageRegions, model: Tiny, weight: Tensor) -> Tensor:
        ctx.image, ctx.model = image, model
        with torch.no_grad():
            return sum((model.tile(read_crop(image, r, c)) for r, c in TILES), weight.new_zeros(2))

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[None, None, None]:
        for r, c in TILES:
            with torch.enable_grad():
                y = ctx.model.tile(read_crop(ctx.image, r, c))
            torch.autograd.backward(y, grad)
        return None, None, None


class Tiny(SlideClassifier):
    """A streamed classifier in miniature: two logits from a linear map of the tiles' mean colours."""

    accumulates_slides = True

    def __init__(self) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.linspace(-1, 1, 6).reshape(2, 3))

    def tile(self, crop: Tensor) -> Tensor:
        return self.weight @ crop.float().mean((0, 2, 3)) / 255

    def forward(
        self,
        batch: SlideBatch,
        pixels: PixelSource,
        inference: InferenceSettings | None = None,
        labels: Tensor | None = None,
    ) -> SlideOutput:
        logits = torch.stack([_Tiled.apply(pixels.whole(i, None).image, self, self.weight) for i in batch.slides])
        out = SlideOutput(logits, torch.ones(len(batch), 1), torch.zeros(len(batch), 1, dtype=torch.long))
        if labels is not None:
            out.loss = F.cross_entropy(logits, labels, reduction="none")
        return out


class Module(SlideClassifierModule):
    """Plain SGD with a learning rate of 1: one step moves the weight by minus its gradient."""

    def configure_optimizers(self) -> Any:
        return torch.optim.SGD(self.parameters(), lr=1.0)


def _step(pixels: Pixels, slides: list[int], tmp_path: Path, failed: tuple[int, ...] = ()) -> tuple[Tensor, Any]:
    """The weight's change by one training step on one batch of ``slides`` (``failed``: known bad before)."""
    records = [SlideRecord(f"s{i}", tmp_path / f"s{i}.svs") for i in range(4)]
    failures = SlideFailures(records, 4, 0.5)
    for i in failed:
        failures.add(i, "unreadable", "before training")
    torch.manual_seed(0)
    model = Tiny()
    before = model.weight.detach().clone()
    cfg = TrainConfig(epochs=1, accelerator="cpu", progress_bar=False)
    module = Module(model, cfg, pixels, ["x"], schedule=False, failures=failures)
    n = len(slides)
    batch = SlideBatch(
        torch.zeros(n, 3, 4, 4, dtype=torch.uint8), torch.ones(n, 1, dtype=torch.bool),
        torch.tensor([i % 2 for i in slides]), torch.tensor(slides), ((1, 1),),
    )  # fmt: skip
    loader = DataLoader([batch], batch_size=None)
    build_trainer(cfg, checkpoints=False, validate=False).fit(module, loader)
    return before - model.weight.detach(), failures


@pytest.mark.parametrize("slides", [[0, 1, 2], [1, 0, 2]], ids=["after-a-slide", "first-of-the-batch"])
def test_a_slide_failing_in_its_backward_is_skipped_and_its_partial_gradient_removed(tmp_path, slides):
    # Slide 1 reads its four tiles in the forward, then fails on the second tile of its backward: the first
    # tile's gradient is then already in weight.grad.
    step, failures = _step(Pixels({1: len(TILES) + 2}), slides, tmp_path)
    assert 1 in failures and "corrupt tile" in failures.failed[1]["reason"]
    assert "backward" in failures.failed[1]["when"]
    # The same batch with slide 1 known bad from the start: its gradient is never added.
    expected, _ = _step(Pixels(), slides, tmp_path, failed=(1,))
    assert torch.equal(step, expected)
    # The partial gradient is not nothing: a step with slide 1 read whole moves the weight differently.
    whole, _ = _step(Pixels(), slides, tmp_path)
    assert not torch.allclose(whole, expected)


def test_only_images_read_per_tile_take_a_gradient_copy(tmp_path, monkeypatch):
    """Only an image read per tile can fail in its backward: a batch of in-memory images copies no gradient, one
    of regions copies them before each slide's backward; the steps are the same."""
    saves: list[int] = []
    save = module_code._save_gradients
    monkeypatch.setattr(module_code, "_save_gradients", lambda params: saves.append(1) or save(params))
    in_memory, _ = _step(Pixels(in_memory=True), [0, 2, 3], tmp_path)
    assert saves == []
    regions, _ = _step(Pixels(), [0, 2, 3], tmp_path)
    assert len(saves) == 3 and torch.equal(in_memory, regions)
