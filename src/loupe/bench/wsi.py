"""`loupe bench wsi`: the whole-slide cost of loupe against the pipeline users run today, on the same machine.

Both pipelines run through ``loupe predict`` (from the slide file to a prediction folder, cold slide cache) on
generated pyramidal whole slides (JPEG tiles, several levels, tissue on a minority of the area), with the same
patch encoder and random weights (timing does not depend on them):

- **loupe**: the joint model, k patches sampled over three magnifications (5x/10x/20x), 256-px cells;
- **patch everything**: every tissue tile of 256 px at 20x embedded by the same encoder, then gated-attention MIL
  (what TRIDENT + CLAM do), built from loupe's own parts (``model.architecture: gated_mil``).

Per slide and pipeline: wall time split into open, thumbnail, overview, tissue, patch reading, encoder, head and
write; patches read and embedded; pixel bytes delivered by the reader; the encoder's FLOPs. ``bench.md`` and
``bench.json`` hold the table and the ratio patch-everything ÷ loupe per slide size.
"""

from __future__ import annotations

import json
import os
import platform
import time
from collections.abc import Callable
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from loupe.bench.commands import new_parser
from loupe.config import Config, DataConfig, GatedMILConfig, JointConfig, ModelConfig, TrainConfig, dump_config
from loupe.console import progress
from loupe.models import build_model
from loupe.models.backbones import Backbone
from loupe.reports.io import write_json, write_text

if TYPE_CHECKING:
    from jsonargparse import ArgumentParser, Namespace

#: (width, height) of the generated slides at 0.25 µm/px (40x).
SIZES = ((40_000, 30_000), (80_000, 60_000))
QUICK_SIZES = ((40_000, 30_000),)
SLIDE_MPP = 0.25
TISSUE_FRACTION = 0.2
CELL = 256
PIPELINES = ("loupe", "patch_everything")


@dataclass(frozen=True)
class Settings:
    """What the bench measures: the encoder (a registry, timm or tiny name), k and the slide sizes."""

    encoder: str = "tiny"
    k: int = 5
    sizes: tuple[tuple[int, int], ...] = QUICK_SIZES
    accelerator: str = "auto"
    precision: str = "32-true"
    read_threads: int = 8
    heatmaps: bool = False
    """Both pipelines also write each slide's PNG pictures (``loupe predict --heatmaps``)."""


def pipeline_config(name: str, s: Settings) -> Config:
    """The config of pipeline ``name`` (random weights, two classes, tissue detection on)."""
    data = DataConfig(classes=["a", "b"], tissue=True, read_threads=s.read_threads, batch_size=1)
    train = TrainConfig(accelerator=s.accelerator, precision=s.precision, progress_bar=False)
    if name == "loupe":
        model = ModelConfig(
            magnifications=["2.0", "1.0", "0.5"], magnification_labels=["5x", "10x", "20x"], patch_backbone=s.encoder
        )
        joint = JointConfig(patch_size=CELL, thumbnail_size=(256, 256), k=s.k, inference="sample")
        return Config(data=data, model=model, train=train, joint=joint)
    model = ModelConfig(
        architecture="gated_mil", magnifications=["0.5"], magnification_labels=["20x"], patch_backbone=s.encoder
    )
    return Config(data=data, model=model, train=train, gated_mil=GatedMILConfig(patch_size=CELL))


def random_run(cfg: Config, folder: Path) -> Path:
    """A run folder (config + checkpoint) of ``cfg``'s model with random weights, as `loupe train` would leave."""
    torch.manual_seed(0)
    model = build_model(cfg, len(cfg.data.classes or []))
    (folder / "checkpoints").mkdir(parents=True, exist_ok=True)
    (folder / "config.yaml").write_text(dump_config(cfg))
    state = {f"model.{k}": v for k, v in model.state_dict().items()}
    torch.save({"state_dict": state}, folder / "checkpoints" / "last.ckpt")
    return folder


@lru_cache(maxsize=8)
def encoder_flops(encoder: str) -> int:
    """FLOPs of one forward of patch encoder ``encoder`` on one cell (PyTorch's FLOP counter); counted once per
    encoder (building a ViT-L or larger takes seconds)."""
    from torch.utils.flop_counter import FlopCounterMode

    from loupe.models.backbones import create_backbone

    net = create_backbone(encoder, False).eval()
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        net(torch.rand(1, 3, CELL, CELL))
    return int(counter.get_total_flops())


class EncoderClock:
    """Wall time of every patch-encoder forward (a :class:`Backbone` called as a module: the thumbnail network is
    called through ``feature_map`` and is not counted), device synced at both ends."""

    def __init__(self) -> None:
        self.seconds = 0.0
        self.patches = 0
        self._start: list[float] = []
        self._handles: list[Any] = []

    def _pre(self, module: nn.Module, args: tuple[Any, ...]) -> None:
        if isinstance(module, Backbone):
            _sync()
            self._start.append(time.perf_counter())

    def _post(self, module: nn.Module, args: tuple[Any, ...], out: Any) -> None:
        if isinstance(module, Backbone):
            _sync()
            self.seconds += time.perf_counter() - self._start.pop()
            self.patches += int(args[0].shape[0])

    def __enter__(self) -> EncoderClock:
        hooks = torch.nn.modules.module
        self._handles = [
            hooks.register_module_forward_pre_hook(self._pre),
            hooks.register_module_forward_hook(self._post),
        ]
        return self

    def __exit__(self, *exc: object) -> None:
        for h in self._handles:
            h.remove()


def _sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def measure(name: str, slide: Path, s: Settings, out: Path) -> dict[str, Any]:
    """One pipeline on one slide through `loupe predict`, cold slide cache; its timings and counts."""
    from loupe.workflows.prediction import predict

    cfg = pipeline_config(name, s)
    run = random_run(cfg, out / "runs" / name)
    cache = out / "cache" / f"{name}-{slide.stem}"
    before = os.environ.get("LOUPE_CACHE_DIR")
    os.environ["LOUPE_CACHE_DIR"] = str(cache)  # a cold slide cache of its own
    target = out / "predict" / name
    start = time.perf_counter()
    try:
        with EncoderClock() as clock:
            result = predict(run, [slide], out=target, workers=0, overwrite=True, heatmaps=s.heatmaps)
    finally:
        if before is None:
            os.environ.pop("LOUPE_CACHE_DIR", None)
        else:
            os.environ["LOUPE_CACHE_DIR"] = before
    wall = time.perf_counter() - start
    entry = result.status.slides[slide.stem]
    if entry["status"] != "done":
        raise RuntimeError(f"{name} failed on {slide}: {entry.get('reason')}")
    info = json.loads((target / "slides" / slide.stem / "prediction.json").read_text())
    t = dict(entry["timings_s"])
    model_s = float(t.pop("model", 0.0))
    t["encoder"] = round(clock.seconds, 4)
    t["head"] = round(max(model_s - clock.seconds, 0.0), 4)
    flops = encoder_flops(cfg.model.patch_backbone)
    read = len(info["cells_read"])
    return {
        "pipeline": name,
        "timings_s": t,
        "total_s": round(sum(t.values()), 3),
        "to_prediction_s": round(sum(v for k, v in t.items() if k != "write"), 3),
        "predict_wall_s": round(wall, 3),
        "patches_read": read,
        "patches_embedded": clock.patches,
        "valid_cells": info["valid_cells"],
        "pixel_bytes": read * CELL * CELL * 3,
        "encoder_gflops": round(flops * clock.patches / 1e9, 2),
    }


def run_wsi_bench(
    *, out: str | Path, settings: Settings = Settings(), log: Callable[[str], None] = print, bar: bool | None = None
) -> dict:
    """Generate the slides (reused when present), measure both pipelines on each; write bench.json/bench.md.
    Progress: a bar on a terminal (``bar``: default whether stderr is one), a line every 30 s in a log."""
    from loupe.datasets.synthetic_wsi import make_pyramidal_slide

    out = Path(out)
    rows: list[dict[str, Any]] = []
    with progress(len(settings.sizes) * len(PIPELINES), "measurements", label="bench wsi", bar=bar) as shown:
        say = shown.print if log is print else log
        for w, h in settings.sizes:
            path = out / "slides" / f"wsi_{w}x{h}.svs"
            if not path.is_file():
                info = make_pyramidal_slide(path, w, h, mpp=SLIDE_MPP, tissue_fraction=TISSUE_FRACTION, seed=w)
                say(f"slide {path.name}: {len(info.level_dimensions)} levels, {info.file_bytes / 2**20:.0f} MB")
            for name in PIPELINES:
                row = measure(name, path, settings, out) | {"slide": path.name, "size": [w, h]}
                rows.append(row)
                shown.advance()
                say(f"{path.name} {name}: {row['total_s']:.2f} s, {row['patches_embedded']} patches embedded")
    ratios, ratios_to_prediction, ratios_encoder = {}, {}, {}
    for w, h in settings.sizes:
        by = {r["pipeline"]: r for r in rows if r["size"] == [w, h]}
        key = f"{w}x{h}"
        ratios[key] = by["patch_everything"]["total_s"] / by["loupe"]["total_s"]
        ratios_to_prediction[key] = by["patch_everything"]["to_prediction_s"] / by["loupe"]["to_prediction_s"]
        ratios_encoder[key] = by["patch_everything"]["encoder_gflops"] / max(by["loupe"]["encoder_gflops"], 1e-9)
    result = {
        "settings": {
            "encoder": settings.encoder,
            "k": settings.k,
            "heatmaps": settings.heatmaps,
            "cell_px": CELL,
            "slide_mpp": SLIDE_MPP,
            "tissue_fraction": TISSUE_FRACTION,
            "device": "cuda" if torch.cuda.is_available() and settings.accelerator != "cpu" else "cpu",
            "torch_threads": torch.get_num_threads(),
            "cpu_count": os.cpu_count(),
            "load_average": os.getloadavg()[0],
            "platform": platform.platform(),
        },
        "rows": rows,
        "patch_everything_over_loupe": ratios,
        "patch_everything_over_loupe_to_prediction": ratios_to_prediction,
        "patch_everything_over_loupe_encoder_flops": ratios_encoder,
    }
    write_json(out / "bench.json", result)
    write_text(out / "bench.md", markdown(result))
    return result


STEPS = ("open", "thumbnail", "overview", "tissue", "patches", "encoder", "head", "write")


def markdown(result: dict[str, Any]) -> str:
    """The table of bench.md."""
    s = result["settings"]
    lines = [
        "# loupe bench wsi: one slide, file to prediction",
        "",
        f"Encoder `{s['encoder']}` (random weights) on {s['device']}, {s['torch_threads']} threads; cells of "
        f"{s['cell_px']} px; slides at {s['slide_mpp']} µm/px with ~{100 * s['tissue_fraction']:.0f}% tissue; "
        f"load average {s['load_average']:.1f} on {s['cpu_count']} CPUs. loupe: k = {s['k']} over 5x/10x/20x; "
        "patch everything: every tissue tile at 20x, then gated-attention MIL.",
        "",
        "| slide | pipeline | " + " | ".join(f"{x} s" for x in STEPS) + " | total s | to prediction s | patches |"
        " GFLOPs |",
        "|---" * (len(STEPS) + 6) + "|",
    ]
    for r in result["rows"]:
        t = r["timings_s"]
        cells = " | ".join(f"{t.get(x, 0.0):.2f}" for x in STEPS)
        lines.append(
            f"| {r['slide']} | {r['pipeline']} | {cells} | {r['total_s']:.2f} | {r['to_prediction_s']:.2f} | "
            f"{r['patches_embedded']} | "
            f"{r['encoder_gflops']:.1f} |"
        )
    lines += [
        "",
        "Ratios patch everything ÷ loupe. *To prediction*: without writing the outputs (heatmaps, GeoJSON), which",
        "both pipelines write alike and which dominate loupe's time on a CPU.",
        "",
        "| slide | total | to prediction | encoder FLOPs |",
        "|---|---|---|---|",
    ]
    lines += [
        f"| {k} | {v:.1f}× | {result['patch_everything_over_loupe_to_prediction'][k]:.1f}× | "
        f"{result['patch_everything_over_loupe_encoder_flops'][k]:.0f}× |"
        for k, v in result["patch_everything_over_loupe"].items()
    ]
    return "\n".join(lines) + "\n"


def build_parser(prog: str) -> ArgumentParser:
    """`loupe bench wsi [--quick] [--encoder NAME] [--k K] --out DIR`."""
    parser = new_parser(prog, description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True, help="folder for the slides, bench.json and bench.md")
    parser.add_argument("--quick", action="store_true", help="the 40000×30000 slide only (minutes on a CPU)")
    parser.add_argument("--encoder", default=None, help="patch encoder (default: tiny quick, else uni)")
    parser.add_argument("--k", type=int, default=5)
    parser.add_argument("--accelerator", default="auto")
    parser.add_argument("--precision", default="32-true")
    parser.add_argument("--heatmaps", action="store_true", help="both pipelines also write their PNG pictures")
    return parser


def run_command(ns: Namespace) -> int:
    """Run `loupe bench wsi` with parsed options."""
    encoder = ns.encoder or ("tiny" if ns.quick else "uni")
    settings = Settings(
        encoder=encoder, k=ns.k, sizes=QUICK_SIZES if ns.quick else SIZES, accelerator=ns.accelerator,
        precision=ns.precision, heatmaps=ns.heatmaps,
    )  # fmt: skip
    result = run_wsi_bench(out=ns.out, settings=settings)
    ratio = ", ".join(
        f"{k}: {v:.1f}× ({result['patch_everything_over_loupe_to_prediction'][k]:.1f}× to prediction)"
        for k, v in result["patch_everything_over_loupe"].items()
    )
    print(f"patch everything ÷ loupe per slide: {ratio}; table: {ns.out}/bench.md")
    return 0
