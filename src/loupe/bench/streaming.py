"""`loupe bench streaming`: memory, time and gradient exactness of one streamed training step versus the ordinary one.

One training step = forward and backward of a timm ResNet trunk on an N×N uint8 image (normalised tile by tile),
then a gated-attention pooling head over every position of the feature map and a logistic loss. Each measured step
runs in a fresh spawned process, so that peak memories do not contaminate each other: on CPU the peak is the process
peak RSS (``VmHWM``, reset just before the step, so it is the peak *during* the step, including everything the
process already holds: torch's own libraries, the model, the image); on GPU it is the allocator peak
(``torch.cuda.max_memory_allocated``). The gradient difference is measured in a separate process at a size where
both steps run.

The streamed step's options are recorded with the figures: tile size, per-block checkpointing (``--checkpoint``: less
memory per tile, one more forward), BatchNorm folding (``--fold``). ``--tissue F`` streams every
streamed step on a tissue image (the ordinary steps always compute the whole image): a centred disc covering a
fraction F of the feature map, the rest background whose tiles are skipped, as for a slide's tissue box. Peak memory
hardly depends on F (one tile at a time, plus the whole stitched map); the time does, so no time ratio is reported
when F is below 1. Times are wall-clock and CPU time of the process (all its threads): on a machine shared with other
jobs the CPU-time ratio is the steadier one. ``--model streamingclam`` measures StreamingCLAM itself (its bag and
instance losses) instead of the bare trunk and a gated-attention head.
"""

from __future__ import annotations

import json
import multiprocessing as mp
import os
import platform
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

import torch
from torch import Tensor, nn

from loupe.errors import ConfigError
from loupe.models.backbone_base import IMAGENET_MEAN, IMAGENET_STD
from loupe.models.gated_attention import GatedAttention

if TYPE_CHECKING:
    from multiprocessing.queues import Queue

    from jsonargparse import ArgumentParser, Namespace


class _GatedAttentionHead(nn.Module):
    """loupe's gated attention (Ilse et al. 2018) over every position of the feature map, then a linear classifier:
    StreamingCLAM's head, without the score bias (it cancels in the softmax; its gradient is pure noise)."""

    def __init__(self, channels: int, hidden: int = 128) -> None:
        super().__init__()
        self.attention = GatedAttention(channels, hidden, score_bias=False)
        self.classifier = nn.Linear(channels, 1)

    def forward(self, features: Tensor) -> Tensor:
        """``features``: the feature map (1, C, h, w), or its positions' rows (n, C) as the streamed trunk stitches
        them (kept positions only)."""
        h = features if features.dim() == 2 else features.flatten(2)[0].t()  # (positions, channels)
        pooled, _ = self.attention(h.unsqueeze(0))
        return self.classifier(pooled[0])


def _status_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def _reset_peak_rss() -> bool:
    """Reset the process's peak RSS to its current RSS (Linux ``clear_refs``); False where unsupported."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def _build(arch: str, dtype: torch.dtype, device: str, seed: int) -> tuple[nn.Module, nn.Module]:
    import timm

    from loupe.models.streaming import freeze_normalisation

    torch.manual_seed(seed)
    trunk = timm.create_model(arch, pretrained=False, num_classes=0, global_pool="")
    freeze_normalisation(trunk)
    head = _GatedAttentionHead(cast(int, trunk.num_features))
    return trunk.to(device=device, dtype=dtype), head.to(device=device, dtype=dtype)


def _pixels(rows: slice, cols: slice, seed: int) -> Tensor:
    """Pixels ``[rows, cols]`` (1, 3, h, w) uint8 of the bench's image: a fixed hash of (seed, channel, y, x), so any
    region can be made without the rest (uniform-looking noise, as hard for the network as random pixels)."""
    y = torch.arange(rows.start, rows.stop, dtype=torch.int64).view(1, 1, -1, 1)
    x = torch.arange(cols.start, cols.stop, dtype=torch.int64).view(1, 1, 1, -1)
    c = torch.arange(3, dtype=torch.int64).view(1, 3, 1, 1)
    v = (y * 0x9E3779B1 + x * 0x85EBCA77 + c * 0xC2B2AE3D + seed * 0x27D4EB2F) & 0xFFFFFFFF
    v = ((v ^ (v >> 15)) * 0x2C1B3C6D) & 0xFFFFFFFF
    v = ((v ^ (v >> 12)) * 0x297A2D39) & 0xFFFFFFFF
    return ((v ^ (v >> 15)) & 0xFF).to(torch.uint8)


class HashedImage:
    """The bench's N×N image as an :class:`~loupe.models.interface.ImageRegions` source: each crop is made when a
    tile asks for it (as a slide reader decodes it), so the image is never held whole."""

    def __init__(self, size: int, seed: int) -> None:
        self.size, self.seed = size, seed

    @property
    def shape(self) -> tuple[int, int, int, int]:
        return (1, 3, self.size, self.size)

    def crop(self, rows: slice, cols: slice) -> Tensor:
        return _pixels(rows, cols, self.seed)


def _image(size: int, seed: int) -> Tensor:
    """The bench's image, whole (the same pixels as :class:`HashedImage`), made in bands of rows so that the hash's
    int64 temporaries stay small (a whole 16384² at once would take 6 GiB of them)."""
    image = torch.empty((1, 3, size, size), dtype=torch.uint8)
    for y in range(0, size, 256):
        rows = slice(y, min(size, y + 256))
        image[..., rows, :] = _pixels(rows, slice(0, size), seed)
    return image


def _preprocess(dtype: torch.dtype) -> Callable[[Tensor], Tensor]:
    def preprocess(x: Tensor) -> Tensor:
        mean = torch.tensor(IMAGENET_MEAN, dtype=dtype, device=x.device).view(1, 3, 1, 1)
        std = torch.tensor(IMAGENET_STD, dtype=dtype, device=x.device).view(1, 3, 1, 1)
        return (x.to(dtype) / 255 - mean) / std

    return preprocess


def _stream(trunk: nn.Module, spec: dict) -> Any:
    """The streaming engine over a ResNet trunk (stem + blocks, so context is trimmed per block) with ``spec``'s
    options."""
    from loupe.models.streaming import StreamingTrunk, resnet_sequential

    stem_tile = spec.get("stem_tile")
    return StreamingTrunk(
        resnet_sequential(trunk),
        spec["tile"],
        _preprocess(getattr(torch, spec["dtype"])),
        checkpoint_segments=spec.get("checkpoint", False),
        fold_normalisation=spec.get("fold", False),
        stem_tile=stem_tile if stem_tile and stem_tile < spec["tile"] else None,
        stem_depth=spec.get("stem_depth") or 1,
    )


def tissue_mask(height: int, width: int, fraction: float) -> Tensor | None:
    """(1, 1, height, width) bool: a centred disc (ellipse) covering ``fraction`` of the map; None when 1."""
    if fraction >= 1:
        return None
    if fraction <= 0:
        raise ConfigError("--tissue must be in (0, 1]")
    y = (torch.arange(height, dtype=torch.float64) + 0.5) / height - 0.5
    x = (torch.arange(width, dtype=torch.float64) + 0.5) / width - 0.5
    r2 = fraction / torch.pi  # area of the disc x² + y² < r² in the unit square (when it fits)
    return (y[:, None] ** 2 + x[None, :] ** 2 < r2)[None, None]


def _step(
    variant: str, trunk: nn.Module, head: nn.Module, image: Tensor | HashedImage, spec: dict, stream: Any = None
) -> None:
    """One training step (forward + backward); the feature map is referenced only by the graph, as in training.

    ``stream``: the streaming engine over ``trunk`` (built here when None; building it derives its geometry).
    """
    dtype = getattr(torch, spec["dtype"])
    target = torch.ones(1, dtype=dtype, device=next(head.parameters()).device)
    if variant == "streamed":
        stream = _stream(trunk, spec) if stream is None else stream
        _, h, w = stream.output_shape(int(image.shape[2]), int(image.shape[3]))
        keep = tissue_mask(h, w, spec.get("tissue", 1.0))
        features = stream(image, keep, rows=spec.get("rows", False))
        loss = nn.functional.binary_cross_entropy_with_logits(head(features), target)
        del features
    else:
        assert isinstance(image, Tensor)
        x = _preprocess(dtype)(image.to(target.device))
        features = cast(Callable[[Tensor], Tensor], trunk.forward_features)  # timm's trunk without its head
        loss = nn.functional.binary_cross_entropy_with_logits(head(features(x)), target)
        del x
    loss.backward()


def _build_clam(spec: dict) -> Any:
    """StreamingCLAM (random ResNet trunk, instance heads) with the streamed step's options, in training mode."""
    from loupe.models.backbones import create_backbone
    from loupe.models.streamingclam import StreamingCLAM

    torch.manual_seed(spec["seed"])
    model = StreamingCLAM(
        create_backbone(spec["arch"], False),
        2,
        tile_size=spec["tile"],
        instance_classifiers=True,
        checkpoint_segments=spec.get("checkpoint", False),
        fold_normalisation=spec.get("fold", False),
        stem_tile=spec.get("stem_tile") or None,
        stem_depth=spec.get("stem_depth") or 1,
    )
    return model.to(device=spec["device"], dtype=getattr(torch, spec["dtype"])).train()


def _clam_step(variant: str, model: Any, image: Tensor | HashedImage, spec: dict) -> None:
    """One StreamingCLAM training step (bag and instance loss); streamed on the tissue mask, or whole-image."""
    _, h, w = model.stream.output_shape(int(image.shape[2]), int(image.shape[3]))
    keep = tissue_mask(h, w, spec.get("tissue", 1.0)) if variant == "streamed" else None
    device = model.mean.device
    out = model.classify_image(
        image.to(device) if isinstance(image, Tensor) else image,
        None if keep is None else keep[0, 0].to(device),
        streamed=variant == "streamed",
    )
    model.loss(out, 1).backward()


def _measure(spec: dict) -> dict:
    """Child process: build, reset the peak, run one step, report peak memory and time."""
    dtype = getattr(torch, spec["dtype"])
    device = spec["device"]
    clam = spec.get("model", "trunk") == "streamingclam"
    if clam:
        model = _build_clam(spec)
        stream = model.stream
    else:
        trunk, head = _build(spec["arch"], dtype, device, spec["seed"])
        stream = _stream(trunk, spec)
    regions = spec["variant"] == "streamed" and spec.get("image") == "regions"
    image: Tensor | HashedImage = (
        HashedImage(spec["size"], spec["seed"]) if regions else _image(spec["size"], spec["seed"])
    )
    if device.startswith("cuda"):
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        baseline = torch.cuda.memory_allocated()
    else:
        baseline = _status_kib("VmRSS") * 1024
        if not _reset_peak_rss():
            raise RuntimeError("cannot reset the peak RSS (/proc/self/clear_refs): fresh-process peaks would be wrong")
    start, cpu_start = time.perf_counter(), time.process_time()
    if clam:
        _clam_step(spec["variant"], model, image, spec)
    else:
        _step(spec["variant"], trunk, head, image, spec, stream)
    if device.startswith("cuda"):
        torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated()
    else:
        peak = _status_kib("VmHWM") * 1024
    elapsed, cpu = time.perf_counter() - start, time.process_time() - cpu_start
    channels, h, w = stream.output_shape(spec["size"], spec["size"])
    keep = tissue_mask(h, w, spec.get("tissue", 1.0)) if spec["variant"] == "streamed" else None
    tiles = stream.tiles(spec["size"], spec["size"])
    run = sum(1 for t in tiles if keep is None or bool(keep[..., t.out_h, t.out_w].any()))
    return {
        "time_s": elapsed,
        "cpu_s": cpu,
        "feature_map_bytes": channels * h * w * torch.finfo(dtype).bits // 8,
        "image_bytes": 0 if isinstance(image, HashedImage) else int(image.numel()),
        "tiles": len(tiles) if spec["variant"] == "streamed" else None,
        "tiles_run": run if spec["variant"] == "streamed" else None,
        "peak_mem_bytes": int(peak),
        "baseline_bytes": int(baseline),
        "peak_above_baseline_bytes": int(peak - baseline),
    }


def _grad_diff(spec: dict) -> dict:
    """Child process: both steps at the same size and weights; max over parameters of max|Δg| / max|g_ordinary|."""
    dtype = getattr(torch, spec["dtype"])
    trunk, head = _build(spec["arch"], dtype, spec["device"], spec["seed"])
    image = _image(spec["size"], spec["seed"])
    params = [p for p in [*trunk.parameters(), *head.parameters()] if p.requires_grad]
    grads = {}
    for variant in ("ordinary", "streamed"):
        for p in params:
            p.grad = None
        _step(variant, trunk, head, image, spec)
        grads[variant] = [_grad(p) for p in params]
    worst, worst_name = 0.0, None
    names = {id(p): n for n, p in [*trunk.named_parameters(), *(("head." + n, p) for n, p in head.named_parameters())]}
    for p, g_s, g_o in zip(params, grads["streamed"], grads["ordinary"], strict=True):
        scale = float(g_o.abs().max())
        if scale > 0 and float((g_s - g_o).abs().max()) / scale > worst:
            worst, worst_name = float((g_s - g_o).abs().max()) / scale, names[id(p)]
    flat_s = torch.cat([g.flatten() for g in grads["streamed"]]).double()
    flat_o = torch.cat([g.flatten() for g in grads["ordinary"]]).double()
    tiles = len(_stream(trunk, spec).tiles(spec["size"], spec["size"]))
    return {
        "max_rel_grad_diff": worst,
        "worst_parameter": worst_name,
        "rel_l2_grad_diff": float((flat_s - flat_o).norm() / flat_o.norm()),
        "parameters_compared": len(params),
        "tiles": tiles,
    }


def _grad(param: Tensor) -> Tensor:
    if param.grad is None:
        raise RuntimeError("a trainable parameter got no gradient")
    return param.grad.detach().clone()


def _child(target: str, spec: dict, queue: Queue[dict[str, Any]]) -> None:
    try:
        queue.put({"ok": globals()[target](spec)})
    except Exception as err:  # reported to the parent; out-of-memory is an expected outcome
        text = f"{type(err).__name__}: {err}"
        oom = isinstance(err, torch.OutOfMemoryError) or "out of memory" in text or "can't allocate" in text
        queue.put({"error": text, "oom": oom, "traceback": traceback.format_exc()})


#: glibc settings of the measuring processes: tensors of 128 KiB and more are mmap'ed and returned to the system when
#: freed, so RSS follows the live tensors instead of what the heap allocator keeps cached (same for both variants).
MALLOC_ENV = {"MALLOC_MMAP_THRESHOLD_": "131072", "MALLOC_TRIM_THRESHOLD_": "131072"}


def _in_fresh_process(target: str, spec: dict, timeout_s: float | None = None) -> dict:
    """Run ``target(spec)`` in a spawned process; a crash (e.g. killed by the OOM killer) is reported, not raised."""
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    proc = ctx.Process(target=_child, args=(target, spec, queue))
    saved = {k: os.environ.get(k) for k in MALLOC_ENV}
    os.environ.update(MALLOC_ENV)  # inherited by the spawned interpreter at start
    try:
        proc.start()
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
    result = None
    deadline = None if timeout_s is None else time.monotonic() + timeout_s
    while result is None:
        try:
            result = queue.get(timeout=1.0)
        except Exception:  # queue.Empty: check the child is alive
            if not proc.is_alive():
                break
            if deadline is not None and time.monotonic() > deadline:
                proc.kill()
                result = {"error": f"timed out after {timeout_s:.0f} s", "oom": False}
    proc.join()
    if result is None:
        result = {"error": f"process died (exit code {proc.exitcode})", "oom": proc.exitcode == -9}
    return result


def run_streaming_bench(
    size: int,
    tile: int,
    out: Path,
    arch: str = "resnet34",
    ordinary_max: int | None = None,
    dtype: torch.dtype = torch.float32,
    device: str = "cpu",
    sizes: list[int] | None = None,
    grad_size: int | None = None,
    seed: int = 0,
    checkpoint: bool = False,
    fold: bool = False,
    tissue: float = 1.0,
    model: str = "trunk",
    stem_tile: int | None = None,
    stem_depth: int | None = None,
    rows: bool = False,
    image: str = "memory",
) -> dict:
    """Measure one streamed and one ordinary training step at ``size`` (and the streamed one at each of ``sizes``);
    write ``out/streaming.json`` (``streaming.partial.json`` after each measured step) and return its content.

    The ordinary step is skipped above ``ordinary_max`` and recorded as null when it runs out of memory. The gradient
    difference is measured at ``grad_size`` (default: the smaller of ``size`` and 2 × ``tile``, at least 1024 when
    ``size`` allows, so that several tiles with interior borders are compared). ``checkpoint``, ``fold``: the streamed
    step's per-block checkpointing and BatchNorm folding. ``tissue``: the fraction of the feature map that is tissue in
    the streamed steps (see the module docstring). ``model``: ``"trunk"`` (the ResNet trunk and a gated-attention
    head) or ``"streamingclam"`` (:class:`~loupe.models.streamingclam.StreamingCLAM` itself, with its instance loss;
    its ordinary step is ``classify_image(streamed=False)``). ``stem_tile``, ``stem_depth``: stream the trunk's
    ``stem_depth`` leading children (None: 1, a ResNet's stem) over each tile's crop in sub-tiles of this side (None:
    off). ``rows``: the streamed trunk stitches only the kept positions (StreamingCLAM always does, with
    ``local_pool`` 1). ``image``: ``"memory"`` (the streamed step holds the whole uint8 image, as when a slide is read
    whole) or ``"regions"`` (each tile's crop is made when asked, as read per tile from the slide file: the image is
    never held whole).
    """
    if size <= 0 or tile <= 0:
        raise ConfigError("--size and --tile must be positive")
    dtype_name = str(dtype).removeprefix("torch.")
    all_sizes = sorted({*(sizes or []), size})
    if not 0 < tissue <= 1:
        raise ConfigError("--tissue must be in (0, 1]")
    if image not in ("memory", "regions"):
        raise ConfigError(f"--image must be memory or regions, got {image!r}")
    base = {
        "arch": arch,
        "tile": tile,
        "dtype": dtype_name,
        "device": device,
        "seed": seed,
        "checkpoint": checkpoint,
        "fold": fold,
        "model": model,
        "stem_tile": stem_tile,
        "stem_depth": stem_depth,
        "rows": rows,
        "image": image,
    }
    if model not in ("trunk", "streamingclam"):
        raise ConfigError(f"--model must be trunk or streamingclam, got {model!r}")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    runs: list[dict] = []
    for n in all_sizes:
        for variant in ("streamed", "ordinary"):
            fraction = tissue if variant == "streamed" else 1.0
            entry: dict[str, Any] = {"variant": variant, "size": n, "tissue": fraction}
            if variant == "ordinary" and ordinary_max is not None and n > ordinary_max:
                entry["status"] = f"skipped (above --ordinary-max {ordinary_max})"
            else:
                result = _in_fresh_process("_measure", {**base, "variant": variant, "size": n, "tissue": fraction})
                if "ok" in result:
                    entry.update(result["ok"], status="ok")
                else:
                    entry["status"] = ("out of memory: " if result.get("oom") else "failed: ") + result["error"]
                    if not result.get("oom"):
                        raise RuntimeError(
                            f"{variant} step at {n} failed: {result['error']}\n{result.get('traceback')}"
                        )
            runs.append(entry)
            (out / "streaming.partial.json").write_text(json.dumps({**base, "runs": runs}, indent=2) + "\n")

    def field(variant: str, n: int, key: str) -> Any:
        for r in runs:
            if r["variant"] == variant and r["size"] == n and r["status"] == "ok":
                return r[key]
        return None

    def ratio(a: Any, b: Any) -> float | None:
        return a / b if a is not None and b else None

    def time_ratio(n: int, key: str) -> float | None:  # only where both steps compute the whole image
        return ratio(field("streamed", n, key), field("ordinary", n, key)) if tissue >= 1 else None

    if grad_size is None:
        grad_size = min(size, max(2 * tile, 1024))
    diff = _in_fresh_process("_grad_diff", {**base, "size": grad_size})
    if "ok" not in diff:
        raise RuntimeError(f"gradient comparison at {grad_size} failed: {diff['error']}")
    ordinary_done = [r for r in runs if r["variant"] == "ordinary" and r["status"] == "ok"]
    reference = max(ordinary_done, key=lambda r: r["size"]) if ordinary_done else None
    streamed_peak = field("streamed", size, "peak_mem_bytes")
    growth = []
    for r in runs:
        if r["variant"] != "streamed" or r["status"] != "ok":
            continue
        row = {
            k: r.get(k)
            for k in (
                "size",
                "tissue",
                "tiles",
                "tiles_run",
                "image_bytes",
                "feature_map_bytes",
                "peak_mem_bytes",
                "peak_above_baseline_bytes",
                "time_s",
                "cpu_s",
            )
        }
        row["time_ratio_to_ordinary_same_size"] = time_ratio(r["size"], "time_s")
        row["cpu_ratio_to_ordinary_same_size"] = time_ratio(r["size"], "cpu_s")
        if reference is not None:  # the largest ordinary step against this streamed one
            row["reference_ordinary_size"] = reference["size"]
            row["reference_peak_ratio_raw"] = ratio(reference["peak_mem_bytes"], r["peak_mem_bytes"])
            row["reference_peak_ratio_above_baseline"] = ratio(
                reference["peak_above_baseline_bytes"], r["peak_above_baseline_bytes"]
            )
        growth.append(row)
    result = {
        "model": model,
        "arch": arch,
        "size": size,
        "tile": tile,
        "dtype": dtype_name,
        "device": device,
        "torch_version": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "machine": platform.machine(),
        "memory_measure": (
            "CUDA allocator peak (torch.cuda.max_memory_allocated)"
            if device.startswith("cuda")
            else "process peak RSS (VmHWM) during the step, each step in a fresh spawned process; includes torch's "
            "libraries, model and uint8 image held before the step (baseline_bytes)"
        ),
        "allocator_env": MALLOC_ENV,
        "streamed_options": {
            "checkpoint_segments": checkpoint,
            "fold_batchnorm": fold,
            "stem_tile": stem_tile,
            "stem_depth": stem_depth,
            "rows": rows or model == "streamingclam",
            "image": (
                "uint8 held whole, preprocessed per tile"
                if image == "memory"
                else "uint8 made per tile's crop, never held whole (as read per tile from the slide)"
            ),
            "tissue": tissue,
        },
        "peak_mem_streamed_bytes": streamed_peak,
        "peak_mem_ordinary_bytes": field("ordinary", size, "peak_mem_bytes"),
        "time_streamed_s": field("streamed", size, "time_s"),
        "time_ordinary_s": field("ordinary", size, "time_s"),
        "time_ratio": time_ratio(size, "time_s"),
        # CPU time of the process (all threads): on a machine shared with other jobs, less noisy than wall time.
        "cpu_time_ratio": time_ratio(size, "cpu_s"),
        "peak_ratio_raw": ratio(field("ordinary", size, "peak_mem_bytes"), streamed_peak),
        "peak_ratio_above_baseline": ratio(
            field("ordinary", size, "peak_above_baseline_bytes"), field("streamed", size, "peak_above_baseline_bytes")
        ),
        "max_rel_grad_diff": diff["ok"]["max_rel_grad_diff"],  # max over parameters of max|Δg| / max|g|
        "max_rel_grad_diff_parameter": diff["ok"]["worst_parameter"],
        "rel_l2_grad_diff": diff["ok"]["rel_l2_grad_diff"],  # ‖Δg‖ / ‖g‖ over every parameter together
        "grad_diff_size": grad_size,
        "grad_diff_tiles": diff["ok"]["tiles"],  # 1 would compare the whole image with itself
        "ordinary_reference": None
        if reference is None
        else {
            "size": reference["size"],
            "peak_mem_bytes": reference["peak_mem_bytes"],
            "peak_above_baseline_bytes": reference["peak_above_baseline_bytes"],
            "time_s": reference["time_s"],
            "ratio_to_streamed_peak": ratio(reference["peak_mem_bytes"], streamed_peak),
            "ratio_to_streamed_above_baseline": ratio(
                reference["peak_above_baseline_bytes"], field("streamed", size, "peak_above_baseline_bytes")
            ),
        },
        "streamed_growth": growth,
        "runs": runs,
    }
    (out / "streaming.json").write_text(json.dumps(result, indent=2) + "\n")
    return result


def build_parser(prog: str) -> ArgumentParser:
    """`loupe bench streaming --size N --tile T --out DIR [--arch] [--ordinary-max] [--sizes N1,N2,...]`."""
    from loupe.bench.commands import new_parser

    parser = new_parser(prog, description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, required=True, help="image side N of the measured step (N×N)")
    parser.add_argument("--tile", type=int, required=True, help="tile side in input pixels (multiple of 32)")
    parser.add_argument("--out", type=str, required=True, help="folder for streaming.json")
    parser.add_argument("--arch", type=str, default="resnet34", help="timm ResNet trunk")
    parser.add_argument("--ordinary-max", type=int, default=None, help="skip the ordinary step above this size")
    parser.add_argument("--sizes", type=str, default=None, help="comma-separated sizes: streamed memory growth")
    parser.add_argument("--grad-size", type=int, default=None, help="size of the gradient comparison")
    parser.add_argument("--dtype", type=str, default="float32", choices=["float32", "float64"])
    parser.add_argument("--device", type=str, default="cpu")
    parser.add_argument("--checkpoint", action="store_true", help="checkpoint each residual block of a tile")
    parser.add_argument("--fold", action="store_true", help="fold frozen BatchNorm into the convolutions")
    parser.add_argument("--tissue", type=float, default=1.0, help="tissue fraction of the streamed steps' images")
    parser.add_argument(
        "--model", type=str, default="trunk", choices=["trunk", "streamingclam"], help="what one step trains"
    )
    parser.add_argument("--stem-tile", type=int, default=0, help="stream the stem in sub-tiles of this side (0: off)")
    parser.add_argument(
        "--stem-depth", type=int, default=1, help="leading children sub-streamed: 1 the stem, 4 + layer1, 8 + layer2"
    )
    parser.add_argument("--rows", action="store_true", help="stitch only the kept positions (the trunk model)")
    parser.add_argument(
        "--image", type=str, default="memory", choices=["memory", "regions"], help="image held whole or made per crop"
    )
    return parser


def run_command(ns: Namespace) -> int:
    """Run `loupe bench streaming` with parsed options."""
    sizes = [int(s) for s in ns.sizes.split(",") if s.strip()] if ns.sizes else None
    result = run_streaming_bench(
        ns.size,
        ns.tile,
        Path(ns.out),
        arch=ns.arch,
        ordinary_max=ns.ordinary_max,
        dtype=getattr(torch, ns.dtype),
        device=ns.device,
        sizes=sizes,
        grad_size=ns.grad_size,
        checkpoint=ns.checkpoint,
        fold=ns.fold,
        tissue=ns.tissue,
        model=ns.model,
        stem_tile=ns.stem_tile or None,
        stem_depth=ns.stem_depth or None,
        rows=ns.rows,
        image=ns.image,
    )
    mib = 1 / 2**20
    for r in result["runs"]:
        if r["status"] == "ok":
            tissue = f", tissue {r['tissue']:.2f} ({r['tiles_run']}/{r['tiles']} tiles)" if r["tissue"] < 1 else ""
            print(
                f"{r['variant']:>8} {r['size']:>6}²: peak {r['peak_mem_bytes'] * mib:8.0f} MiB "
                f"({r['peak_above_baseline_bytes'] * mib:7.0f} above baseline), {r['time_s']:7.1f} s "
                f"(CPU {r['cpu_s']:7.1f} s){tissue}"
            )
        else:
            print(f"{r['variant']:>8} {r['size']:>6}²: {r['status']}")
    if result["time_ratio"] is not None:
        print(
            f"at {ns.size}²: streamed/ordinary time {result['time_ratio']:.2f}× (CPU time "
            f"{result['cpu_time_ratio']:.2f}×), ordinary/streamed peak "
            f"{result['peak_ratio_raw']:.2f}× raw, {result['peak_ratio_above_baseline']:.2f}× above baseline"
        )
    for row in result["streamed_growth"]:
        if "reference_ordinary_size" in row:
            print(
                f"streamed {row['size']}² vs ordinary {row['reference_ordinary_size']}² peak: "
                f"{row['reference_peak_ratio_raw']:.2f}× raw, {row['reference_peak_ratio_above_baseline']:.2f}× "
                f"above baseline (feature map {row['feature_map_bytes'] * mib:.0f} MiB)"
            )
    print(
        f"gradient difference at {result['grad_diff_size']}² ({result['grad_diff_tiles']} tiles): max relative "
        f"{result['max_rel_grad_diff']:.2e} ({result['max_rel_grad_diff_parameter']}), "
        f"‖Δg‖/‖g‖ {result['rel_l2_grad_diff']:.2e}"
    )
    print(f"wrote {Path(ns.out) / 'streaming.json'}")
    return 0
