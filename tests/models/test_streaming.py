"""Streaming trunks: outputs and every parameter gradient equal the whole-image forward/backward.

The ResNet trunks are timm's ResNet-18/34 with their exact geometry (depths, kernels, strides, paddings) but very few
channels, so that images large enough for tiles with interior borders on every side (ResNet-34 sees 449 px of
context) run in float64 on a CPU in seconds. BatchNorm statistics and affine parameters are random, so a tile that
saw zero padding instead of its neighbours, or a misaligned stride grid, would change the result.
"""

from __future__ import annotations

import dataclasses

import pytest
import timm
import torch
from torch import nn

from loupe.errors import ConfigError
from loupe.models.streaming import (
    StreamingTrunk,
    freeze_normalisation,
    output_shape,
    receptive_field,
    resnet_sequential,
)

TOL = 1e-9


def _trunk(arch: str, seed: int = 0, channels: tuple[int, ...] = (4, 6, 6, 8)) -> nn.Module:
    """timm ResNet trunk with few channels (the 64-channel 7x7 stem narrowed too), random BatchNorm, frozen."""
    torch.manual_seed(seed)
    model = timm.create_model(arch, pretrained=False, num_classes=0, global_pool="", channels=channels)
    stem = channels[0]
    model.conv1 = nn.Conv2d(3, stem, 7, stride=2, padding=3, bias=False)
    model.bn1 = nn.BatchNorm2d(stem)
    first = model.layer1[0]
    first.conv1 = nn.Conv2d(stem, channels[0], 3, padding=1, bias=False)
    first.downsample = None  # stem width == layer1 width: identity shortcut, as in the real ResNet
    model = model.double()
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.weight.uniform_(0.5, 1.5)
                m.bias.normal_(0.0, 0.3)
                m.running_mean.normal_(0.0, 0.3)
                m.running_var.uniform_(0.5, 2.0)
    return freeze_normalisation(model)


def _reference(trunk: nn.Module, image: torch.Tensor, weight: torch.Tensor, keep: torch.Tensor | None):
    """Ordinary forward/backward; with ``keep`` the output is masked (skipped outputs are zero, no gradient)."""
    trunk.zero_grad(set_to_none=True)
    features = getattr(trunk, "forward_features", trunk)
    out = features(image)
    if keep is not None:
        out = out * keep
    (out * weight).sum().backward()
    grads = {n: p.grad.clone() for n, p in trunk.named_parameters() if p.requires_grad}
    trunk.zero_grad(set_to_none=True)
    return out.detach(), grads


def _streamed(
    stream: StreamingTrunk,
    image: torch.Tensor,
    weight: torch.Tensor,
    keep: torch.Tensor | None,
    names: dict[int, str] | None = None,
):
    """Streamed forward/backward; gradients by parameter name (``names``: id → name, for a re-wrapped trunk)."""
    stream.trunk.zero_grad(set_to_none=True)
    out = stream(image, keep)
    assert out.requires_grad
    (out * weight).sum().backward()
    names = names or {}
    grads = {names.get(id(p), n): p.grad.clone() for n, p in stream.trunk.named_parameters() if p.requires_grad}
    stream.trunk.zero_grad(set_to_none=True)
    return out.detach(), grads


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max() / b.abs().max().clamp_min(1e-300))


def _assert_exact(ref, streamed) -> None:
    (out_ref, g_ref), (out, g) = ref, streamed
    assert out.shape == out_ref.shape
    assert _rel(out, out_ref) < TOL
    assert g.keys() == g_ref.keys() and len(g) > 0
    worst = max(_rel(g[n], g_ref[n]) for n in g_ref)
    assert worst < TOL, worst


def _keep_mask(stream: StreamingTrunk, h: int, w: int, seed: int) -> torch.Tensor:
    """A random keep mask where some tiles are entirely background and one kept tile is partly background."""
    _, oh, ow = stream.output_shape(h, w)
    gen = torch.Generator().manual_seed(seed)
    keep = torch.rand(1, 1, oh, ow, generator=gen) < 0.7
    tiles = stream.tiles(h, w)
    for i, tile in enumerate(tiles):
        if i % 3 == 1:
            keep[..., tile.out_h, tile.out_w] = False
    assert any(not keep[..., t.out_h, t.out_w].any() for t in tiles)
    assert any(keep[..., t.out_h, t.out_w].any() for t in tiles)
    return keep


def _has_interior_borders(stream: StreamingTrunk, h: int, w: int, axes: str = "hw") -> bool:
    """Whether, along each axis in ``axes``, some crop starts inside the image and some crop stops inside it: those
    tiles see an artificial border where the whole image has real neighbouring pixels."""
    tiles = stream.tiles(h, w)
    ok = True
    if "h" in axes:
        ok &= any(t.crop_h.start > 0 for t in tiles) and any(t.crop_h.stop < h for t in tiles)
    if "w" in axes:
        ok &= any(t.crop_w.start > 0 for t in tiles) and any(t.crop_w.stop < w for t in tiles)
    return ok


# (arch, tile sizes): one tall and one wide image per trunk (sizes not multiples of 32), long enough along one axis
# for crops with interior borders on both ends (ResNet-18 sees 217 px of context each side, ResNet-34 449 px).
# The fast tier keeps one ResNet-18 tile size (~2 s); the other sizes and ResNet-34 are in the slow tier (~12 s).
CASES = [
    ("resnet18", (160,), [(389, 70, "h"), (75, 357, "w")]),
    pytest.param("resnet18", (64, 96), [(389, 70, "h"), (75, 357, "w")], marks=pytest.mark.slow),
    pytest.param("resnet34", (96, 160, 224), [(700, 90, "h"), (75, 700, "w")], marks=pytest.mark.slow),
]


@pytest.mark.parametrize(("arch", "tiles", "images"), CASES)
def test_streamed_outputs_and_gradients_equal_whole_image(arch, tiles, images):
    trunk = _trunk(arch)
    torch.manual_seed(1)
    for height, width, axis in images:
        image = torch.randn(1, 3, height, width, dtype=torch.float64)
        c, oh, ow = output_shape(trunk, height, width)
        weight = torch.randn(1, c, oh, ow, dtype=torch.float64)
        ref = _reference(trunk, image, weight, None)
        names = {id(p): n for n, p in trunk.named_parameters()}
        for i, tile in enumerate(tiles):
            # The whole timm model (one module: no trimming) and its stem + blocks (trimmed after each).
            for stream in (StreamingTrunk(trunk, tile), StreamingTrunk(resnet_sequential(trunk), tile)):
                assert _has_interior_borders(stream, height, width, axis)
                _assert_exact(ref, _streamed(stream, image, weight, None, names))
                keep = _keep_mask(stream, height, width, seed=i)  # skipped background tiles
                _assert_exact(_reference(trunk, image, weight, keep), _streamed(stream, image, weight, keep, names))


def _shallow(seed: int = 0) -> nn.Sequential:
    """ResNet-18 up to layer2 (stride 8, 49 px context): interior tiles on small images, for the cheaper checks."""
    return nn.Sequential(*list(resnet_sequential(_trunk("resnet18", seed)))[:5])


@pytest.mark.parametrize("tile", [24, 40, 64])
@pytest.mark.parametrize(("height", "width"), [(200, 232), (167, 300)])
def test_shallow_trunk_many_tiles_with_and_without_background(tile, height, width):
    trunk = _shallow()
    torch.manual_seed(2)
    image = torch.randn(1, 3, height, width, dtype=torch.float64)
    c, oh, ow = output_shape(trunk, height, width)
    weight = torch.randn(1, c, oh, ow, dtype=torch.float64)
    stream = StreamingTrunk(trunk, tile)
    assert _has_interior_borders(stream, height, width)
    _assert_exact(_reference(trunk, image, weight, None), _streamed(stream, image, weight, None))
    keep = _keep_mask(stream, height, width, seed=tile)
    out, grads = _streamed(stream, image, weight, keep)
    _assert_exact(_reference(trunk, image, weight, keep), (out, grads))
    assert not out[..., ~keep[0, 0]].any()


def test_geometry_is_derived_from_the_network():
    g18 = receptive_field(_trunk("resnet18"))
    g34 = receptive_field(_trunk("resnet34"))
    assert (g18.h.stride, g18.h.align, g18.h.before, g18.h.after) == (32, 32, 217, 217)
    assert (g34.w.stride, g34.w.align, g34.w.before, g34.w.after) == (32, 32, 449, 449)
    # Asymmetric kernels and a stride-3 pool: per-axis geometry, alignment = lcm of cumulative strides.
    net = nn.Sequential(nn.Conv2d(3, 4, (5, 3), stride=(2, 1), padding=(2, 0)), nn.MaxPool2d(3, 3, padding=1))
    g = receptive_field(net)
    assert (g.h.stride, g.h.align, g.h.before, g.h.after) == (6, 6, 2 + 1 * 2, 2 + 1 * 2)
    assert (g.w.stride, g.w.align, g.w.before, g.w.after) == (3, 3, 0 + 1, 2 + 1)
    assert output_shape(net, 50, 41) == tuple(net(torch.zeros(1, 3, 50, 41)).shape[1:])


def test_generic_stack_with_odd_strides_is_exact():
    torch.manual_seed(3)
    net = nn.Sequential(
        nn.Conv2d(3, 5, (5, 3), stride=(2, 1), padding=(2, 0)),
        nn.GELU(),
        nn.MaxPool2d(3, 3, padding=1),
        nn.Conv2d(5, 6, 3, padding=1, dilation=1),
        nn.AvgPool2d(2, ceil_mode=True),
        nn.Conv2d(6, 4, 3, padding="same", dilation=2),
    ).double()
    image = torch.randn(1, 3, 157, 131, dtype=torch.float64)
    c, oh, ow = output_shape(net, 157, 131)
    weight = torch.randn(1, c, oh, ow, dtype=torch.float64)
    stream = StreamingTrunk(net, 24)  # stride (12, 6): 24 px is 2 × 4 outputs
    assert _has_interior_borders(stream, 157, 131)
    _assert_exact(_reference(net, image, weight, None), _streamed(stream, image, weight, None))


def test_too_little_context_breaks_equality():
    """The test can fail: one stride less of context (or a misaligned crop) changes outputs and gradients."""
    trunk = _shallow()
    image = torch.randn(1, 3, 200, 232, dtype=torch.float64)
    c, oh, ow = output_shape(trunk, 200, 232)
    weight = torch.randn(1, c, oh, ow, dtype=torch.float64)
    ref = _reference(trunk, image, weight, None)
    stream = StreamingTrunk(trunk, 40, trim_context=False)  # trimming would re-align a misaligned crop
    g = stream.geometry
    for broken in (
        dataclasses.replace(g, h=dataclasses.replace(g.h, before=g.h.before - 8, after=g.h.after - 8)),
        dataclasses.replace(g, w=dataclasses.replace(g.w, align=4)),
    ):
        stream.geometry = broken
        out, grads = _streamed(stream, image, weight, None)
        worst = max(_rel(grads[n], ref[1][n]) for n in grads)
        assert max(_rel(out, ref[0]), worst) > 1e-6
    # Trimming one position too much after a child (here the stem) breaks it too.
    stream = StreamingTrunk(trunk, 40)
    assert stream.trims
    (stride_h, g_h), w_axis = stream.trims[0]
    stream.trims[0] = ((stride_h, dataclasses.replace(g_h, before=g_h.before - 1, after=g_h.after - 1)), w_axis)
    out, grads = _streamed(stream, image, weight, None)
    worst = max(_rel(grads[n], ref[1][n]) for n in grads)
    assert max(_rel(out, ref[0]), worst) > 1e-6


def test_uint8_image_with_preprocess_equals_float_input():
    trunk = _shallow()
    mean = torch.tensor([0.485, 0.456, 0.406], dtype=torch.float64).view(1, 3, 1, 1)
    std = torch.tensor([0.229, 0.224, 0.225], dtype=torch.float64).view(1, 3, 1, 1)

    def preprocess(x: torch.Tensor) -> torch.Tensor:
        return (x.double() / 255 - mean) / std

    image = torch.randint(0, 256, (1, 3, 150, 170), dtype=torch.uint8)
    c, oh, ow = output_shape(trunk, 150, 170)
    weight = torch.randn(1, c, oh, ow, dtype=torch.float64)
    from_uint8 = _streamed(StreamingTrunk(trunk, 32, preprocess=preprocess), image, weight, None)
    from_float = _streamed(StreamingTrunk(trunk, 32), preprocess(image), weight, None)
    _assert_exact(from_float, from_uint8)
    _assert_exact(_reference(trunk, preprocess(image), weight, None), from_uint8)


def test_checkpointed_segments_are_exact():
    trunk = resnet_sequential(_trunk("resnet18"))
    image = torch.randn(1, 3, 389, 70, dtype=torch.float64)
    c, oh, ow = output_shape(trunk, 389, 70)
    weight = torch.randn(1, c, oh, ow, dtype=torch.float64)
    stream = StreamingTrunk(trunk, 96, checkpoint_segments=True)
    assert _has_interior_borders(stream, 389, 70, "h")
    _assert_exact(_reference(trunk, image, weight, None), _streamed(stream, image, weight, None))


def test_trainable_or_training_batchnorm_is_a_clear_error():
    trunk = _shallow()
    stream = StreamingTrunk(trunk, 32)
    image = torch.randn(1, 3, 64, 64, dtype=torch.float64)
    bn = trunk[0][1]
    bn.weight.requires_grad_(True)
    with pytest.raises(ConfigError, match="freeze_normalisation"):
        stream(image)
    freeze_normalisation(trunk)
    bn.train()
    with pytest.raises(ConfigError, match="training mode"):
        stream(image)
    stream.train()  # the wrapper keeps normalisation frozen whatever train() is asked
    assert not bn.training and stream.training
    stream(image)


def test_unsupported_layers_and_tile_sizes_are_clear_errors():
    with pytest.raises(ConfigError, match="GroupNorm"):
        StreamingTrunk(nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.GroupNorm(2, 4)), 32)
    with pytest.raises(ConfigError, match="multiple of the trunk's stride"):
        StreamingTrunk(_shallow(), 20)
    with pytest.raises(ConfigError, match="training mode"):
        StreamingTrunk(nn.Sequential(nn.Conv2d(3, 4, 3), nn.Dropout(0.5)), 8)


def test_frozen_trunk_gives_features_without_graph_and_all_skipped_is_zero():
    trunk = _shallow()
    for p in trunk.parameters():
        p.requires_grad_(False)
    stream = StreamingTrunk(trunk, 32)
    image = torch.randn(1, 3, 100, 90, dtype=torch.float64)
    out = stream(image)
    assert not out.requires_grad
    assert _rel(out, trunk(image)) < TOL
    keep = torch.zeros(1, 1, *out.shape[-2:], dtype=torch.bool)
    skipped = stream(image, keep)
    assert skipped.shape == out.shape and not skipped.any()


@pytest.mark.parametrize("trim", [False, True])
@pytest.mark.parametrize(("fold", "segments"), [(False, False), (False, True), (True, False), (True, True)])
def test_with_and_without_batchnorm_folding_checkpointing_and_trimming(fold, segments, trim):
    """Every combination of the per-tile options is exact."""
    trunk = _shallow()
    image = torch.randn(1, 3, 200, 232, dtype=torch.float64)
    c, oh, ow = output_shape(trunk, 200, 232)
    weight = torch.randn(1, c, oh, ow, dtype=torch.float64)
    stream = StreamingTrunk(trunk, 40, checkpoint_segments=segments, fold_normalisation=fold, trim_context=trim)
    assert bool(stream.trims) == trim
    assert _has_interior_borders(stream, 200, 232)
    _assert_exact(_reference(trunk, image, weight, None), _streamed(stream, image, weight, None))
    keep = _keep_mask(stream, 200, 232, seed=5)
    _assert_exact(_reference(trunk, image, weight, keep), _streamed(stream, image, weight, keep))


@pytest.mark.parametrize("skip_last", [False, True])
def test_each_tile_runs_once_with_autograd_and_the_last_one_is_not_recomputed(monkeypatch, skip_last):
    trunk = _shallow()
    stream = StreamingTrunk(trunk, 40)
    image = torch.randn(1, 3, 200, 232, dtype=torch.float64)
    tiles = stream.tiles(200, 232)
    _, oh, ow = stream.output_shape(200, 232)
    keep = torch.ones(1, 1, oh, ow, dtype=torch.bool)
    if skip_last:  # the last tile is background: the last *run* tile keeps its graph
        keep[..., tiles[-1].out_h, tiles[-1].out_w] = False
    calls: list[bool] = []
    run_tile = stream.run_tile

    def counting(image, tile, module=None):
        calls.append(torch.is_grad_enabled())
        return run_tile(image, tile, module)

    monkeypatch.setattr(stream, "run_tile", counting)
    out = stream(image, keep)
    n = len(tiles) - int(skip_last)
    assert calls == [False] * (n - 1) + [True]
    out.sum().backward()
    assert calls[n:] == [True] * (n - 1)  # backward recomputes every run tile but the kept one
    with torch.no_grad():
        calls.clear()
        stream(image, keep)
        assert calls == [False] * n


def _rows_of(dense: torch.Tensor, keep: torch.Tensor | None) -> torch.Tensor:
    """The kept positions of a (1, C, h, w) map as rows (n, C), row-major: what ``rows=True`` stitches."""
    flat = dense[0].flatten(1).t()
    return flat if keep is None else flat[keep.reshape(-1)]


@pytest.mark.parametrize(
    ("fold", "segments", "depth"),
    [
        (False, False, 1),
        (False, True, 1),
        (True, True, 1),
        (False, False, None),
        pytest.param(False, True, None, marks=pytest.mark.slow),  # 4-5 s each; depth 1 covers these levers fast
        pytest.param(True, True, None, marks=pytest.mark.slow),
    ],
)
def test_sub_streamed_stem_is_exact(depth, fold, segments):
    """A ResNet-34's stem (and with depth None its layer1 too) streamed over each tile's crop in sub-tiles: the same
    outputs and gradients as the whole image, with and without background tiles."""
    from loupe.models.streaming import resnet_stem_depth

    model = _trunk("resnet34")
    trunk = resnet_sequential(model)
    h, w = 700, 90
    image = torch.randn(1, 3, h, w, dtype=torch.float64)
    c, oh, ow = output_shape(trunk, h, w)
    weight = torch.randn(1, c, oh, ow, dtype=torch.float64)
    stream = StreamingTrunk(
        trunk,
        160,
        checkpoint_segments=segments,
        fold_normalisation=fold,
        stem_tile=64,
        stem_depth=depth or resnet_stem_depth(model),
    )
    assert stream.stem is not None and _has_interior_borders(stream, h, w, "h")
    calls: list[int] = []
    stem_run = stream.stem.run_tile
    stream.stem.run_tile = lambda *a, **k: calls.append(1) or stem_run(*a, **k)  # type: ignore[method-assign]
    _assert_exact(_reference(trunk, image, weight, None), _streamed(stream, image, weight, None))
    assert len(calls) > 2 * len(stream.tiles(h, w))  # several sub-tiles per tile: the stem really was sub-streamed
    keep = _keep_mask(stream, h, w, seed=3)
    _assert_exact(_reference(trunk, image, weight, keep), _streamed(stream, image, weight, keep))


@pytest.mark.parametrize("with_keep", [False, True])
def test_rows_are_the_kept_positions_with_their_gradients(with_keep):
    """``rows=True`` stitches only the kept positions, (n_kept, C) row-major; outputs and gradients equal the whole
    image's at those positions."""
    trunk = _shallow()
    h, w = 200, 232
    image = torch.randn(1, 3, h, w, dtype=torch.float64)
    stream = StreamingTrunk(trunk, 40)
    c, oh, ow = stream.output_shape(h, w)
    keep = _keep_mask(stream, h, w, seed=7) if with_keep else None
    weight = torch.randn(1, c, oh, ow, dtype=torch.float64)
    out_ref, g_ref = _reference(trunk, image, weight, keep)
    trunk.zero_grad(set_to_none=True)
    rows = stream(image, keep, rows=True)
    assert rows.shape == (oh * ow if keep is None else int(keep.sum()), c)
    assert _rel(rows.detach(), _rows_of(out_ref, keep)) < TOL
    (rows * _rows_of(weight, keep)).sum().backward()
    g = {n: p.grad for n, p in trunk.named_parameters() if p.requires_grad}
    assert max(_rel(g[n], g_ref[n]) for n in g_ref) < TOL
    none = stream(image, torch.zeros(1, 1, oh, ow, dtype=torch.bool), rows=True)
    assert none.shape == (0, c)


class _Regions:
    """An image read crop by crop (as from a slide file), recording each crop's size."""

    def __init__(self, image: torch.Tensor) -> None:
        self.image = image
        self.crops: list[tuple[int, int]] = []

    @property
    def shape(self) -> tuple[int, int, int, int]:
        return tuple(self.image.shape)  # type: ignore[return-value]

    def crop(self, rows: slice, cols: slice) -> torch.Tensor:
        self.crops.append((rows.stop - rows.start, cols.stop - cols.start))
        return self.image[..., rows, cols].clone()


def test_an_image_read_per_crop_gives_the_same_result_and_is_never_read_whole():
    trunk = _shallow()
    h, w = 200, 232
    image = torch.randn(1, 3, h, w, dtype=torch.float64)
    stream = StreamingTrunk(trunk, 40, stem_tile=24)
    c, oh, ow = stream.output_shape(h, w)
    weight = torch.randn(1, c, oh, ow, dtype=torch.float64)
    regions = _Regions(image)
    _assert_exact(_reference(trunk, image, weight, None), _streamed(stream, regions, weight, None))  # type: ignore[arg-type]
    largest = max(r * c_ for r, c_ in regions.crops)
    assert largest == max(
        (t.crop_h.stop - t.crop_h.start) * (t.crop_w.stop - t.crop_w.start) for t in stream.tiles(h, w)
    )
    assert largest < h * w
