"""Per-slide timing of `loupe predict` on large synthetic pyramidal whole slides.

Writes JPEG-tiled, multi-level synthetic slides (tissue on a minority of the area) of two sizes, then predicts
them with a trained demo model, with tissue detection on, for several k, with the slide cache cold and then
warm. Each slide's wall time is split into open, thumbnail, overview, tissue, patches, model and write.
The point: patch reading grows with k, not with the slide's area.

    python benchmarks/predict_wsi.py --out runs/bench-wsi                 # trains the demo model first (~2 min)
    python benchmarks/predict_wsi.py --out runs/bench-wsi --run RUN_DIR   # any run trained on µm/px slides

Writes OUT/predict_wsi.json and OUT/predict_wsi.md. "Cold" is loupe's slide cache only: the operating system
keeps the slide files in its page cache after they are written.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time
from pathlib import Path

from loupe.datasets.synthetic_wsi import make_pyramidal_slide
from loupe.reports.io import write_json, write_text
from loupe.workflows.prediction import TIMING_STEPS, predict


def _size(text: str) -> tuple[int, int]:
    w, h = text.lower().split("x")
    return int(w), int(h)


def _slides(out: Path, sizes: list[tuple[int, int]]) -> list[dict]:
    slides = []
    for w, h in sizes:
        path = out / "slides" / f"wsi_{w}x{h}.svs"
        meta_path = path.with_suffix(".json")
        if path.is_file() and meta_path.is_file():
            meta = json.loads(meta_path.read_text())
        else:
            info = make_pyramidal_slide(path, w, h, mpp=0.25, tissue_fraction=0.2, seed=w)
            meta = {
                "slide_id": path.stem,
                "path": str(path),
                "dimensions": [info.width, info.height],
                "levels": len(info.level_dimensions),
                "level_dimensions": [list(d) for d in info.level_dimensions],
                "mpp": info.mpp,
                "tissue_fraction": info.tissue_fraction,
                "file_mb": round(info.file_bytes / 2**20, 1),
                "write_s": round(info.seconds, 1),
            }
            write_json(meta_path, meta)
        tissue = meta["tissue_fraction"]
        print(f"slide {meta['slide_id']}: {meta['levels']} levels, {meta['file_mb']} MB, tissue {tissue:.2f}")
        slides.append(meta)
    return slides


def _demo_run(out: Path, epochs: int | None) -> Path:
    from loupe.workflows.demo import run_demo

    run = out / "demo" / "run"
    if not (run / "checkpoints" / "best.ckpt").is_file():
        m = run_demo(out=out / "demo", signal_magnification="highest", epochs=epochs, progress_bar=False)
        print(f"demo model: test accuracy {m['accuracy']:.3f}")
    return run


def _predict(run: Path, slides: list[dict], out: Path, k: int, cache: Path, workers: int, label: str) -> list[dict]:
    os.environ["LOUPE_CACHE_DIR"] = str(cache)
    start = time.perf_counter()
    result = predict(
        run,
        [s["path"] for s in slides],
        out=out,
        inference="sample",
        overwrite=True,
        loader_workers=workers,
        tissue=True,
        k=k,
    )
    wall = time.perf_counter() - start
    rows = []
    for s in slides:
        entry = result.status.slides[s["slide_id"]]
        if entry["status"] != "done":
            raise SystemExit(f"{s['slide_id']} failed: {entry.get('reason')}")
        info = json.loads((out / "slides" / s["slide_id"] / "prediction.json").read_text())
        t = entry["timings_s"]
        rows.append(
            {
                "slide_id": s["slide_id"],
                "dimensions": s["dimensions"],
                "k": k,
                "cache": label,
                "cells": sum(r * c for r, c in info["grid"].values()),
                "valid_cells": sum(info["valid_cells"].values()),
                "patches_read": len(info["cells_read"]),
                **{step: t[step] for step in TIMING_STEPS},
                "total": round(sum(t[step] for step in TIMING_STEPS), 4),
            }
        )
    print(f"k={k} cache {label}: {len(slides)} slides in {wall:.1f} s")
    return rows


def _markdown(slides: list[dict], rows: list[dict], env: dict) -> str:
    lines = [
        "# `loupe predict` on synthetic whole slides: per-slide wall time (s)",
        "",
        f"Machine: {env['machine']}, {env['cpus']} CPUs, torch threads {env['torch_threads']}. "
        f"Prediction workers {env['workers']}, inference `sample` (exactly k patches), tissue detection on.",
        "",
        "| slide | size | levels | file MB | tissue |",
        "|---|---|---|---|---|",
    ]
    for s in slides:
        w, h = s["dimensions"]
        lines.append(f"| {s['slide_id']} | {w}×{h} | {s['levels']} | {s['file_mb']} | {s['tissue_fraction']:.2f} |")
    lines += [
        "",
        "| slide | k | cache | cells (valid) | " + " | ".join(TIMING_STEPS) + " | total |",
        "|---|---|---|---|" + "---|" * (len(TIMING_STEPS) + 1),
    ]
    for r in rows:
        times = " | ".join(f"{r[s]:.3f}" for s in TIMING_STEPS)
        lines.append(
            f"| {r['slide_id']} | {r['k']} | {r['cache']} | {r['cells']} ({r['valid_cells']}) | {times} | "
            f"{r['total']:.3f} |"
        )
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--run", type=Path, default=None, help="trained run (default: train the demo model)")
    parser.add_argument("--sizes", nargs="+", type=_size, default=[(40000, 30000), (80000, 60000)])
    parser.add_argument("--ks", nargs="+", type=int, default=[5, 20])
    parser.add_argument("--workers", type=int, default=0, help="0: every step in turn, so each is timed alone")
    parser.add_argument("--repeats", type=int, default=3, help="warm-cache repeats (the median is reported)")
    parser.add_argument("--epochs", type=int, default=None, help="demo training epochs (default: the preset's)")
    args = parser.parse_args()
    import torch

    out: Path = args.out
    slides = _slides(out, args.sizes)
    run = args.run or _demo_run(out, args.epochs)
    rows = []
    for k in args.ks:
        cache = out / f"cache-k{k}"
        if cache.exists():
            import shutil

            shutil.rmtree(cache)
        rows += _predict(run, slides, out / f"predict-k{k}", k, cache, args.workers, "cold")
        warm = [
            _predict(run, slides, out / f"predict-k{k}", k, cache, args.workers, "warm") for _ in range(args.repeats)
        ]
        for j in range(len(slides)):
            runs = [w[j] for w in warm]
            row = dict(runs[0])
            for step in (*TIMING_STEPS, "total"):
                row[step] = round(statistics.median(r[step] for r in runs), 4)
            row["cache"] = f"warm (median of {len(runs)})"
            rows.append(row)
    env = {
        "machine": platform.processor() or platform.machine(),
        "cpus": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "workers": args.workers,
        "run": str(run),
    }
    write_json(out / "predict_wsi.json", {"environment": env, "slides": slides, "rows": rows})
    text = _markdown(slides, rows, env)
    write_text(out / "predict_wsi.md", text)
    print(text)


if __name__ == "__main__":
    main()
