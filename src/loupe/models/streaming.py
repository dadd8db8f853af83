"""Streaming convolutions: run a convolutional trunk over a huge image tile by tile, with exact outputs and gradients.

Memory is bounded by one tile (plus the stitched output map), while the output map and every parameter gradient are
those of the ordinary whole-image forward/backward. How:

- Geometry is derived from the network itself (:func:`receptive_field`): a shape-only pass on the ``meta`` device
  records, for every leaf module, its kernel/stride/padding and the cumulative stride at its input; from those follow
  the total stride, the alignment every crop must respect and the context (margin) an output needs on each side.
- Each tile owns a block of output positions. It is computed on the crop of the image that holds the receptive field
  of that block, clipped to the image. The crop starts on a multiple of the alignment, so every intermediate stride
  grid coincides with the whole image's; where the crop is clipped at the image border the network's own zero/−inf
  padding is exactly the whole-image padding; where it is not, the margin guarantees that no owned output sees the
  crop's artificial padding. The owned part of the crop's output is then exactly the whole-image output.
- Forward: every tile under ``no_grad``, stitched into the output map. Backward (a custom autograd function, the
  pattern of reentrant checkpointing): every tile is recomputed with autograd and only the slice of the output
  gradient it owns is back-propagated; parameter gradients accumulate across tiles into ``.grad``. The last tile of
  the forward keeps its autograd graph and is back-propagated first, without a recompute.
- Cost: a tile computes its crop, i.e. its own area plus the context around it (449 px each side for a ResNet-34),
  once without and once with autograd (and once more with ``checkpoint_segments``). Three exact levers cut it: for a
  Sequential trunk (stem + residual blocks, :func:`resnet_sequential`) the activation after each child is trimmed to
  what the remaining children still need, so the context shrinks layer by layer (a pyramid, not a box); frozen
  BatchNorms can be folded into the convolution before them (:mod:`loupe.models.batchnorm_folding`, opt-in); and
  larger tiles spend less on context, where memory allows.

Normalisation layers must be frozen (eval mode, no trainable parameters): a BatchNorm with batch statistics would see
tile statistics instead of image statistics. Layers that mix the whole spatial extent (GroupNorm, global pooling,
attention) cannot be streamed. Spatial operations written as functional calls inside a container's ``forward`` are
invisible to the module walk; streaming supports stacks of ``Conv2d``, ``MaxPool2d``, ``AvgPool2d`` and pointwise
layers, such as timm ResNet trunks.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any, cast

import torch
from torch import Tensor, nn
from torch.func import functional_call
from torch.utils.checkpoint import checkpoint

from loupe.errors import ConfigError
from loupe.models.batchnorm_folding import fold_batchnorm
from loupe.models.interface import ImageRegions, read_crop

# Leaf modules that act position by position (given frozen normalisation).
_POINTWISE: tuple[type[nn.Module], ...] = (
    nn.Identity,
    nn.modules.batchnorm._BatchNorm,
    nn.ReLU,
    nn.ReLU6,
    nn.LeakyReLU,
    nn.PReLU,
    nn.ELU,
    nn.SELU,
    nn.CELU,
    nn.GELU,
    nn.SiLU,
    nn.Mish,
    nn.Hardswish,
    nn.Hardsigmoid,
    nn.Sigmoid,
    nn.Tanh,
    nn.Softplus,
    nn.Dropout,
    nn.Dropout2d,
)
_NORM_WITH_STATS = (nn.modules.batchnorm._NormBase,)
# Two probe sizes for the shape-only pass: multiples of every small stride, so that size differences are exact.
_PROBE = 2**12 * 3**2 * 5 * 7


@dataclass(frozen=True)
class Geometry1D:
    """Geometry of a trunk along one axis.

    ``stride``: input pixels per output position. ``align``: crops must start on multiples of this (the lcm of every
    cumulative stride, so all intermediate grids coincide). Output ``j`` depends only on input pixels
    ``[j*stride - before, j*stride + after]``.
    """

    stride: int
    align: int
    before: int
    after: int


@dataclass(frozen=True)
class Geometry:
    """Per-axis geometry (height, width) of a trunk; see :class:`Geometry1D`."""

    h: Geometry1D
    w: Geometry1D


def _pair(v: int | Sequence[int]) -> tuple[int, int]:
    return (int(v), int(v)) if isinstance(v, int) else (int(v[0]), int(v[1]))


def _leaf_window(module: nn.Module, axis: int) -> tuple[int, int, int, int, bool] | None:
    """(kernel, stride, padding, dilation, ceil_mode) of a spatial leaf along ``axis``; None for pointwise leaves."""
    if isinstance(module, nn.Conv2d):
        k, s, d = _pair(module.kernel_size)[axis], _pair(module.stride)[axis], _pair(module.dilation)[axis]
        if module.padding == "valid":
            p = 0
        elif module.padding == "same":
            p = d * (k - 1) // 2
        else:
            assert not isinstance(module.padding, str)
            p = _pair(module.padding)[axis]
        if module.padding_mode != "zeros" and p > 0:
            raise ConfigError(f"cannot stream {module}: only zero padding is exact at tile borders")
        return k, s, p, d, False
    if isinstance(module, nn.MaxPool2d):
        k = _pair(module.kernel_size)[axis]
        s = _pair(module.stride if module.stride is not None else module.kernel_size)[axis]
        return k, s, _pair(module.padding)[axis], _pair(module.dilation)[axis], bool(module.ceil_mode)
    if isinstance(module, nn.AvgPool2d):
        k = _pair(module.kernel_size)[axis]
        s = _pair(module.stride if module.stride is not None else module.kernel_size)[axis]
        return k, s, _pair(module.padding)[axis], 1, bool(module.ceil_mode)
    if isinstance(module, _POINTWISE):
        if isinstance(module, (nn.Dropout, nn.Dropout2d)) and module.training and module.p > 0:
            raise ConfigError(f"cannot stream {module} in training mode: tiles would draw different masks")
        return None
    raise ConfigError(
        f"cannot stream a {type(module).__name__}: streaming supports Conv2d, MaxPool2d, AvgPool2d and pointwise "
        "layers (layers that mix the whole image, such as GroupNorm or global pooling, belong in the head)"
    )


def _window_out(n: int, k: int, s: int, p: int, d: int, ceil_mode: bool) -> int:
    """Output length of a window op (PyTorch's formula), used to check that the recorded module is what we think."""
    span = n + 2 * p - d * (k - 1) - 1
    out = (-(-span // s) if ceil_mode else span // s) + 1
    if ceil_mode and (out - 1) * s >= n + p:
        out -= 1
    return out


class _Features(nn.Module):
    """Wraps a trunk so that ``forward`` is its feature extractor (timm ``forward_features`` where present)."""

    def __init__(self, trunk: nn.Module) -> None:
        super().__init__()
        self.trunk = trunk

    def forward(self, x: Tensor) -> Tensor:
        fn = getattr(self.trunk, "forward_features", None)
        return fn(x) if callable(fn) else self.trunk(x)


def _meta_run(features: nn.Module, shape: tuple[int, ...], hooks: bool = False) -> tuple[torch.Size, list]:
    """Run ``features`` on a meta tensor (shapes only, no memory or compute); optionally record every leaf call."""
    state = {
        name: torch.empty_like(t, device="meta")
        for name, t in [*features.named_parameters(), *features.named_buffers()]
    }
    first = next(iter(state.values()), None)
    dtype = first.dtype if first is not None and first.is_floating_point() else torch.float32
    calls: list[tuple[nn.Module, tuple[int, int], tuple[int, int]]] = []
    handles = []
    if hooks:
        for module in features.modules():
            if next(module.children(), None) is None:
                handles.append(
                    module.register_forward_hook(
                        lambda m, i, o: calls.append((m, tuple(i[0].shape[-2:]), tuple(o.shape[-2:])))
                    )
                )
    try:
        with torch.no_grad():
            out = functional_call(features, state, (torch.empty(shape, device="meta", dtype=dtype),))
    finally:
        for h in handles:
            h.remove()
    return out.shape, calls


def receptive_field(trunk: nn.Module, in_channels: int = 3) -> Geometry:
    """Derive stride, crop alignment and per-side context of ``trunk`` from its modules (see module docstring).

    Two shape-only passes at different input sizes give every leaf's cumulative input stride (the ratio of size
    differences); summing each spatial leaf's padding (context before) and kernel extent minus padding (context
    after), scaled by its cumulative stride, bounds the receptive field over every path of the network (residual
    branches included). Raises :class:`ConfigError` for layers that cannot be streamed.
    """
    features = trunk if isinstance(trunk, _Features) else _Features(trunk)
    sizes = (_PROBE, 2 * _PROBE)
    outs, runs = [], []
    for n in sizes:
        shape, calls = _meta_run(features, (1, in_channels, n, n), hooks=True)
        outs.append(shape[-2:])
        runs.append(calls)
    if len(runs[0]) != len(runs[1]):
        raise ConfigError("cannot stream this trunk: its module calls depend on the input size")
    axes = []
    for axis in (0, 1):
        diff_in = sizes[1] - sizes[0]
        diff_out = outs[1][axis] - outs[0][axis]
        if diff_out <= 0 or diff_in % diff_out:
            raise ConfigError("cannot stream this trunk: its output size does not scale with the input")
        stride = diff_in // diff_out
        align, before, after = stride, 0, 0
        for (module, in0, out0), (_, in1, _) in zip(runs[0], runs[1], strict=True):
            window = _leaf_window(module, axis)
            d_in = in1[axis] - in0[axis]
            if d_in <= 0 or diff_in % d_in:
                raise ConfigError(f"cannot stream this trunk: the input grid of {module} is not a whole stride")
            jump = diff_in // d_in
            if window is None:
                if in0 != out0:
                    raise ConfigError(f"cannot stream {module}: it changes the spatial size but is not a window op")
                continue
            k, s, p, d, ceil_mode = window
            if _window_out(in0[axis], k, s, p, d, ceil_mode) != out0[axis]:
                raise ConfigError(f"cannot stream {module}: its output size does not follow its own padding")
            align = math.lcm(align, jump * s)
            before += p * jump
            after += max(0, d * (k - 1) - p) * jump
        axes.append(Geometry1D(stride=stride, align=align, before=before, after=after))
    return Geometry(h=axes[0], w=axes[1])


def output_shape(trunk: nn.Module, height: int, width: int, in_channels: int = 3) -> tuple[int, int, int]:
    """(channels, height, width) of ``trunk``'s feature map for an input of ``height`` × ``width`` (shape-only)."""
    features = trunk if isinstance(trunk, _Features) else _Features(trunk)
    shape, _ = _meta_run(features, (1, in_channels, height, width))
    return int(shape[1]), int(shape[2]), int(shape[3])


def _norm_layers(module: nn.Module) -> Iterator[nn.Module]:
    for m in module.modules():
        if isinstance(m, _NORM_WITH_STATS):
            yield m


def freeze_normalisation(module: nn.Module) -> nn.Module:
    """Put every normalisation layer with running statistics in eval mode and stop its parameters' gradients.

    Streaming needs this: with batch statistics a tile would be normalised by its own statistics, not the image's.
    :class:`StreamingTrunk` re-applies eval mode to norm layers after every ``.train()`` call. Returns ``module``.
    """
    for m in _norm_layers(module):
        m.eval()
        for p in m.parameters(recurse=False):
            p.requires_grad_(False)
    return module


def check_frozen_normalisation(module: nn.Module) -> None:
    """Raise :class:`ConfigError` if a norm layer is in training mode or has trainable parameters."""
    for name, m in module.named_modules():
        if not isinstance(m, _NORM_WITH_STATS):
            continue
        trainable = any(p.requires_grad for p in m.parameters(recurse=False))
        if m.training or trainable:
            state = "in training mode" if m.training else "trainable"
            raise ConfigError(
                f"cannot stream: normalisation layer {name or type(m).__name__} is {state}; streamed trunks need "
                "frozen normalisation (eval mode, no gradient) - call "
                "loupe.models.streaming.freeze_normalisation(trunk) first"
            )


@dataclass(frozen=True)
class _Tile:
    """One tile: the output block it owns and the input crop that computes it."""

    out_h: slice
    out_w: slice
    crop_h: slice
    crop_w: slice
    own_h: slice  # owned block in the crop's own output coordinates
    own_w: slice


def _axis_tiles(size: int, out_size: int, tile_out: int, g: Geometry1D) -> list[tuple[slice, slice, slice]]:
    """Per axis: (owned output slice, input crop slice, owned slice within the crop's output)."""
    tiles = []
    for j0 in range(0, out_size, tile_out):
        j1 = min(j0 + tile_out, out_size)
        lo = j0 * g.stride - g.before
        hi = (j1 - 1) * g.stride + g.after + 1  # exclusive
        start = max(0, (lo // g.align) * g.align)
        stop = min(size, hi)
        shift = start // g.stride
        tiles.append((slice(j0, j1), slice(start, stop), slice(j0 - shift, j1 - shift)))
    return tiles


class StreamingTrunk(nn.Module):
    """A convolutional trunk applied to a whole large image tile by tile, with exact outputs and gradients.

    ``tile_size`` is in input pixels and must be a multiple of the trunk's stride: each tile owns
    ``tile_size / stride`` output positions per side and is computed on its receptive field (``tile_size`` plus the
    derived context on each side, clipped to the image). ``preprocess`` (pointwise, e.g. uint8 → normalised float)
    is applied to each crop only, so the image can stay uint8. ``checkpoint_segments``: for an ``nn.Sequential``
    trunk, recompute each child during the tile's backward instead of keeping all its activations (less memory per
    tile, one more forward per tile). ``fold_normalisation``: compute with every frozen BatchNorm folded into the
    convolution before it (:func:`~loupe.models.batchnorm_folding.fold_batchnorm`; the same function and gradients,
    less work per tile; off by default: in float32 it moved one ResNet-34 weight gradient by 2e-4 relative at 2048²,
    where the unfolded streamed step is within 2e-6 of the ordinary one). ``trim_context``: for an ``nn.Sequential``
    trunk, after each child cut the tile's activation down to what the owned outputs still need from the children
    after it (their own receptive field, at their alignment): the context a tile computes shrinks layer by layer
    instead of spanning every layer (less work and memory per tile, the same result). ``stem_tile``: for an
    ``nn.Sequential`` trunk, stream its first ``stem_depth`` children (a ResNet's stem, whose 64-channel map at half
    resolution is the largest activation by far, and its stride-4 blocks: :func:`resnet_stem_depth`) over each tile's
    crop in sub-tiles of this many input pixels, so that only their output at a quarter of the resolution is ever
    whole (most of a tile's peak memory otherwise; the same result, for more passes over the stem). The output is
    differentiable w.r.t. the trunk's parameters (not the image). The image is a uint8 tensor or an
    :class:`~loupe.models.interface.ImageRegions` source read crop by crop (never held whole).
    """

    def __init__(
        self,
        trunk: nn.Module,
        tile_size: int,
        preprocess: Callable[[Tensor], Tensor] | None = None,
        checkpoint_segments: bool = False,
        in_channels: int = 3,
        fold_normalisation: bool = False,
        trim_context: bool = True,
        stem_tile: int | None = None,
        stem_depth: int = 1,
    ) -> None:
        super().__init__()
        self.features = _Features(trunk)
        self.preprocess = preprocess
        self.in_channels = in_channels
        if checkpoint_segments and not isinstance(trunk, nn.Sequential):
            raise ConfigError("checkpoint_segments needs an nn.Sequential trunk (see resnet_sequential)")
        self.checkpoint_segments = checkpoint_segments
        self.fold_normalisation = fold_normalisation
        self.geometry = receptive_field(self.features, in_channels)
        stride = self.geometry.h.stride, self.geometry.w.stride
        if tile_size <= 0 or tile_size % stride[0] or tile_size % stride[1]:
            raise ConfigError(f"tile size {tile_size} must be a positive multiple of the trunk's stride {stride}")
        self.tile_size = int(tile_size)
        self._shapes: dict[tuple[int, int], tuple[int, int, int]] = {}
        self.trims = _trims(trunk, self.geometry, in_channels) if trim_context else []
        """Per child boundary of a Sequential trunk: (stride so far, geometry of the children after it) per axis."""
        stem: StreamingTrunk | None = None
        if stem_tile is not None:
            if not isinstance(trunk, nn.Sequential) or not 0 < stem_depth < len(trunk):
                raise ConfigError(
                    f"stem_tile needs an nn.Sequential trunk of more than stem_depth ({stem_depth}) children "
                    "(resnet_sequential)"
                )
            early = trunk[0] if stem_depth == 1 else nn.Sequential(*list(trunk)[:stem_depth])
            try:
                stem = StreamingTrunk(
                    early,
                    stem_tile,
                    preprocess,
                    checkpoint_segments=checkpoint_segments and stem_depth > 1,
                    in_channels=in_channels,
                    fold_normalisation=fold_normalisation,
                )
            except ConfigError as err:
                raise ConfigError(f"stem_tile {stem_tile} (stem_depth {stem_depth}): {err}") from err
        self.stem_depth = stem_depth
        """How many leading children of a Sequential trunk are streamed in ``stem_tile`` sub-tiles."""
        # Not registered as a submodule: it shares the stem's modules, which the trunk already registers.
        object.__setattr__(self, "_stem", stem)

    @property
    def trunk(self) -> nn.Module:
        """The wrapped trunk."""
        return self.features.trunk

    @property
    def stem(self) -> StreamingTrunk | None:
        """The engine that streams the leading ``stem_depth`` children in sub-tiles (None: not sub-streamed)."""
        return cast("StreamingTrunk | None", self.__dict__["_stem"])

    def train(self, mode: bool = True) -> StreamingTrunk:
        """Set training mode; normalisation layers stay in eval mode (streaming needs them frozen)."""
        super().train(mode)
        for m in _norm_layers(self):
            m.eval()
        return self

    def output_shape(self, height: int, width: int) -> tuple[int, int, int]:
        """(channels, height, width) of the feature map for an image of ``height`` × ``width``."""
        key = (height, width)
        if key not in self._shapes:
            self._shapes[key] = output_shape(self.features, height, width, self.in_channels)
        return self._shapes[key]

    def tiles(self, height: int, width: int) -> list[_Tile]:
        """Every tile of an image of ``height`` × ``width``, row-major."""
        _, out_h, out_w = self.output_shape(height, width)
        rows = _axis_tiles(height, out_h, self.tile_size // self.geometry.h.stride, self.geometry.h)
        cols = _axis_tiles(width, out_w, self.tile_size // self.geometry.w.stride, self.geometry.w)
        return [_Tile(r[0], c[0], r[1], c[1], r[2], c[2]) for r in rows for c in cols]

    def compute_module(self) -> nn.Module:
        """The module each tile runs: the trunk's feature extractor, with frozen BatchNorms folded when asked.

        Built afresh per call (cheap: shallow copies of containers), so it always reflects the trunk's current
        parameters, buffers, device and dtype.
        """
        return fold_batchnorm(self.features) if self.fold_normalisation else self.features

    def run_crop(self, crop: Tensor, module: nn.Module | None = None) -> Tensor:
        """The trunk on one crop (preprocessed, on the trunk's device), without trimming: the whole crop's output."""
        return self._run(crop, self.compute_module() if module is None else module, None)

    def run_tile(self, image: Tensor | ImageRegions, tile: _Tile, module: nn.Module | None = None) -> Tensor:
        """The outputs ``tile`` owns, computed from its crop of ``image``: what streaming does per tile."""
        crop = read_crop(image, tile.crop_h, tile.crop_w)
        net = self.compute_module() if module is None else module
        if not self.trims:
            return self._run(crop, net, None)[..., tile.own_h, tile.own_w]
        y, (start_h, start_w) = self._run(crop, net, tile)
        return y[..., _shift(tile.out_h, start_h), _shift(tile.out_w, start_w)]

    def _run(self, crop: Tensor, net: nn.Module, tile: _Tile | None) -> Any:
        param = next(self.features.parameters(), None)
        if param is not None:
            crop = crop.to(param.device, non_blocking=True)
        segments = self.checkpoint_segments and torch.is_grad_enabled()
        stem = self.stem
        if stem is not None and max(crop.shape[-2:]) <= stem.tile_size:
            stem = None  # one sub-tile: run the stem as it is
        if not segments and tile is None and stem is None:
            return net(self._preprocessed(crop))
        assert isinstance(net, _Features) and isinstance(net.trunk, nn.Sequential)
        children = list(net.trunk)
        start = [tile.crop_h.start, tile.crop_w.start] if tile is not None else [0, 0]  # input pixels
        x = crop if stem is not None else self._preprocessed(crop)
        first = 0
        if stem is not None:  # preprocessed per sub-tile; its own recompute replaces the checkpoints
            x, first = stem(x), self.stem_depth
            if tile is not None and first - 1 < len(self.trims):
                x = _trim(x, self.trims[first - 1], start, (tile.out_h, tile.out_w), True)
        for k in range(first, len(children)):
            child = children[k]
            x = checkpoint(child, x, use_reentrant=False) if segments else child(x)
            if tile is not None and k < len(self.trims):
                # A copy lets the untrimmed activation be freed, unless the graph keeps it anyway (no checkpoints).
                copy = segments or not torch.is_grad_enabled()
                x = _trim(x, self.trims[k], start, (tile.out_h, tile.out_w), copy)
        if tile is None:
            return x
        strides = self.geometry.h.stride, self.geometry.w.stride
        return x, (start[0] // strides[0], start[1] // strides[1])  # the output's first position, whole-map indices

    def _preprocessed(self, crop: Tensor) -> Tensor:
        return self.preprocess(crop) if self.preprocess is not None else crop

    def forward(self, image: Tensor | ImageRegions, keep: Tensor | None = None, rows: bool = False) -> Tensor:
        """Feature map of ``image`` (1, C, H, W; any dtype ``preprocess`` accepts), zero where ``keep`` is False.

        ``keep``: optional bool mask (1, 1, h_out, w_out) at the output resolution; tiles whose owned outputs are
        all False are skipped in both passes. The result equals ``trunk(preprocess(image)) * keep``. ``rows``:
        return only the kept positions' features, (n_kept, C) in row-major order (``fmap[0, :, keep].t()``): the
        stitched result then grows with the tissue, not with the image's bounding box.
        """
        if len(image.shape) != 4 or image.shape[0] != 1:
            raise ConfigError(f"streaming takes one image of shape (1, C, H, W), got {tuple(image.shape)}")
        check_frozen_normalisation(self.features)
        channels, out_h, out_w = self.output_shape(int(image.shape[2]), int(image.shape[3]))
        if keep is not None:
            if tuple(keep.shape[-2:]) != (out_h, out_w):
                raise ConfigError(f"keep mask must be (1, 1, {out_h}, {out_w}), got {tuple(keep.shape)}")
            keep = keep.reshape(1, 1, out_h, out_w).bool()
        params = [p for p in self.features.parameters() if p.requires_grad]
        keep_graph = torch.is_grad_enabled() and bool(params)
        return _StreamFunction.apply(self, image, keep, (channels, out_h, out_w), keep_graph, rows, *params)


_Trim = tuple[tuple[int, Geometry1D], tuple[int, Geometry1D]]


def _trims(trunk: nn.Module, geometry: Geometry, in_channels: int) -> list[_Trim]:
    """For each boundary between children of a Sequential trunk (none otherwise): per axis, the stride of the
    children before it and the geometry of the children after it (in units of the boundary's grid)."""
    if not isinstance(trunk, nn.Sequential) or len(trunk) < 2:
        return []
    children = list(trunk)
    trims = []
    for k in range(len(children) - 1):
        channels = output_shape(nn.Sequential(*children[: k + 1]), _PROBE, _PROBE, in_channels)[0]
        rest = receptive_field(nn.Sequential(*children[k + 1 :]), channels)
        axes = []
        for total, after in ((geometry.h, rest.h), (geometry.w, rest.w)):
            if total.stride % after.stride:
                return []  # not a whole stride: no trimming
            axes.append((total.stride // after.stride, after))
        trims.append((axes[0], axes[1]))
    return trims


def _trim(x: Tensor, trim: _Trim, start: list[int], owned: tuple[slice, slice], copy: bool) -> Tensor:
    """Cut activation ``x`` (a child boundary's grid, first position at input pixel ``start[axis]``) to what the
    owned outputs need from the children after it; updates ``start``. A side that the owned outputs' receptive field
    reaches past is left as it is (it is then the image border or already minimal). ``copy``: return a trimmed
    activation as a compact copy (same memory format) rather than a view of the untrimmed one."""
    y = x
    for axis, ((stride, g), out) in enumerate(zip(trim, owned, strict=True)):
        dim = y.dim() - 2 + axis
        if start[axis] % stride:
            continue  # misaligned crop (only when the geometry was tampered with): keep everything
        first = start[axis] // stride
        lo = out.start * g.stride - g.before
        lo = max(first, (lo // g.align) * g.align)
        hi = min(first + y.shape[dim], (out.stop - 1) * g.stride + g.after + 1)
        if lo > first or hi < first + y.shape[dim]:
            y = y.narrow(dim, lo - first, hi - lo)
            start[axis] = lo * stride
    return y.clone(memory_format=torch.preserve_format) if copy and y is not x else y


def _shift(s: slice, offset: int) -> slice:
    return slice(s.start - offset, s.stop - offset)


def _autocast_state(device_type: str) -> tuple[bool, torch.dtype | None]:
    if device_type not in ("cpu", "cuda"):
        return False, None
    return torch.is_autocast_enabled(device_type), torch.get_autocast_dtype(device_type)


class _StreamFunction(torch.autograd.Function):
    """Forward: tiles without autograd, stitched (the last one with autograd, kept). Backward: the kept tile, then
    every other tile recomputed, each back-propagating the gradient of the outputs it owns."""

    @staticmethod
    def forward(
        ctx: Any,
        engine: StreamingTrunk,
        image: Tensor | ImageRegions,
        keep: Tensor | None,
        out_shape: tuple[int, int, int],
        keep_graph: bool,
        rows: bool,
        *params: Tensor,
    ) -> Tensor:
        param = next(engine.features.parameters(), None)
        device = param.device if param is not None else _device(image)
        ctx.engine, ctx.image = engine, image
        ctx.autocast = (device.type, *_autocast_state(device.type))
        keep_dev = keep.to(device) if keep is not None else None
        ctx.keep = keep_dev
        ctx.index = _row_index(keep_dev, out_shape[1:], device) if rows else None
        net = engine.compute_module()
        tiles = engine.tiles(int(image.shape[2]), int(image.shape[3]))
        wanted = [
            i for i, tile in enumerate(tiles) if keep_dev is None or bool(keep_dev[..., tile.out_h, tile.out_w].any())
        ]
        out: Tensor | None = None
        ctx.kept = None
        for i in wanted:
            tile = tiles[i]
            last = keep_graph and i == wanted[-1]
            with torch.set_grad_enabled(last):  # the last tile keeps its graph: backward starts with it
                y = engine.run_tile(image, tile, net)
            if last:
                ctx.kept = (i, y)
                y = y.detach()
            if out is None:
                shape = (int(ctx.index.max()) + 1, out_shape[0]) if rows else (1, *out_shape)
                out = torch.zeros(shape, dtype=y.dtype, device=device)
            if rows:
                sel, at = _tile_rows(ctx.index, tile)
                out[at] = y[0].permute(1, 2, 0)[sel]
            else:
                out[..., tile.out_h, tile.out_w] = y if keep_dev is None else y * keep_dev[..., tile.out_h, tile.out_w]
            del y
        if out is None:  # every tile skipped
            dtype = param.dtype if param is not None and param.is_floating_point() else torch.float32
            if ctx.autocast[1]:
                dtype = ctx.autocast[2]
            out = torch.zeros((0, out_shape[0]) if rows else (1, *out_shape), dtype=dtype, device=device)
        return out

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor | None, ...]:
        engine: StreamingTrunk = ctx.engine
        image, keep, index = ctx.image, ctx.keep, ctx.index
        kept: tuple[int, Tensor] | None = ctx.kept
        ctx.engine = ctx.image = ctx.keep = ctx.kept = ctx.index = None
        if keep is not None:
            keep = keep.to(grad.device)
        device_type, autocast_on, autocast_dtype = ctx.autocast
        tiles = engine.tiles(int(image.shape[2]), int(image.shape[3]))
        order = list(range(len(tiles)))
        if kept is not None:  # the kept tile first: its graph is freed before any recompute
            order.remove(kept[0])
            order.insert(0, kept[0])
        net = engine.compute_module()
        channels = int(grad.shape[1])
        for i in order:
            tile = tiles[i]
            if index is not None:
                sel, at = _tile_rows(index, tile)
                if not bool(sel.any()):
                    continue
                g = grad.new_zeros((_length(tile.out_h), _length(tile.out_w), channels))
                g[sel] = grad[at]
                g = g.permute(2, 0, 1)[None]
            else:
                g = grad[..., tile.out_h, tile.out_w]
                if keep is not None:
                    owned_keep = keep[..., tile.out_h, tile.out_w]
                    if not bool(owned_keep.any()):
                        continue
                    g = g * owned_keep
            if kept is not None and kept[0] == i:
                y, kept = kept[1], None
            else:
                y = None
            if not bool(g.any()):
                continue  # no gradient flows through this tile
            if y is None:
                with torch.enable_grad(), torch.autocast(device_type, dtype=autocast_dtype, enabled=autocast_on):
                    y = engine.run_tile(image, tile, net)
            torch.autograd.backward(y, g.to(y.dtype))
            del y, g
        return (None,) * len(ctx.needs_input_grad)


def _device(image: Tensor | ImageRegions) -> torch.device:
    return image.device if isinstance(image, Tensor) else torch.device("cpu")


def _length(s: slice) -> int:
    return int(s.stop) - int(s.start)


def _row_index(keep: Tensor | None, size: tuple[int, int], device: torch.device) -> Tensor:
    """(h, w) int64: each kept position's row in the stitched (n_kept, C) result (row-major), −1 elsewhere."""
    if keep is None:
        return torch.arange(size[0] * size[1], device=device).view(size)
    flat = keep.reshape(size)
    index = torch.full(size, -1, dtype=torch.long, device=device)
    index[flat] = torch.arange(int(flat.sum()), device=device)
    return index


def _tile_rows(index: Tensor, tile: _Tile) -> tuple[Tensor, Tensor]:
    """(owned block's kept mask (h, w), their rows in the stitched result)."""
    block = index[tile.out_h, tile.out_w]
    sel = block >= 0
    return sel, block[sel]


def resnet_sequential(model: nn.Module) -> nn.Sequential:
    """A timm/torchvision ResNet's trunk (conv1…layer4) as ``nn.Sequential(stem, block, block, ...)``.

    Shares the modules of ``model``. Useful with ``checkpoint_segments=True``: each residual block (and the stem) is
    a checkpoint segment.
    """
    needed = ("conv1", "bn1", "maxpool", "layer1", "layer2", "layer3", "layer4")
    if not all(hasattr(model, name) for name in needed):
        raise ConfigError(f"{type(model).__name__} is not a ResNet (needs {', '.join(needed)})")
    act = getattr(model, "act1", None) or getattr(model, "relu", None) or nn.Identity()
    stem = nn.Sequential(*(_module(model, name) for name in ("conv1", "bn1")), act, _module(model, "maxpool"))
    blocks = [block for name in needed[3:] for block in getattr(model, name)]
    return nn.Sequential(stem, *blocks)


def resnet_stem_depth(model: nn.Module) -> int:
    """The leading children of :func:`resnet_sequential` ``(model)`` that run at stride 4 or less: the stem and the
    blocks of ``layer1`` (the largest activations of a tile, worth streaming in sub-tiles)."""
    return 1 + len(cast(nn.Sequential, _module(model, "layer1")))


def _module(parent: nn.Module, name: str) -> nn.Module:
    child = getattr(parent, name)
    if not isinstance(child, nn.Module):
        raise ConfigError(f"{type(parent).__name__}.{name} is not a module")
    return child
