"""`loupe predict` with 1 and with 2 workers on one folder of many small pyramidal slides: throughput, per-step
time per slide, and whether the time per slide grows with the number of slides already done.

One JPEG-tiled pyramidal slide per size is written and hard-linked (or copied) N times under different names: every
copy is a slide of its own for loupe (its cache key is its path), so each is opened, thumbnailed, tissue-detected,
read and written like any other. Each worker count predicts the whole folder into a fresh output folder with a
fresh slide cache. Per slide, the state files give when it finished; time per slide is compared between the first
and the last 10% of the slides finished (the status file is no longer rewritten per slide, so it should not grow).

    python benchmarks/predict_workers.py --out runs/bench-workers --run RUN_DIR            # 1,000 slides
    python benchmarks/predict_workers.py --out runs/bench-workers --run RUN_DIR --n 50 --workers 1 2 4
    python benchmarks/predict_workers.py --out runs/bench-mixed --run RUN_DIR --n 52 \
        --size 5000x4000 20000x15000 40000x30000 80000x60000                                # mixed sizes

Writes OUT/predict_workers.json and OUT/predict_workers.md. Bytes read per slide (the ``rchar`` of /proc/self/io:
every byte a read call returned, page cache included) are measured with one worker, whose reads all happen in
this process (``--loader-workers 0``, the default, so that every row prepares slides the same way).
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import platform
import shutil
import statistics
import time
from pathlib import Path

from loupe.datasets.synthetic_wsi import make_pyramidal_slide
from loupe.reports.io import write_json, write_text
from loupe.workflows.prediction import TIMING_STEPS, predict


def _size(text: str) -> tuple[int, int]:
    w, h = text.lower().split("x")
    return int(w), int(h)


def _slides(out: Path, n: int, sizes: list[tuple[int, int]]) -> Path:
    """A folder of ``n`` names for one small pyramidal slide per size, the sizes taken in turn."""
    tag = "_".join(f"{w}x{h}" for w, h in sizes)
    folder = out / f"slides-{tag}"
    sources = []
    for w, h in sizes:
        source = out / f"source-{w}x{h}.svs"
        if not source.is_file():
            make_pyramidal_slide(source, w, h, mpp=0.25, tissue_fraction=0.3, seed=0)
        sources.append(source)
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        target = folder / f"slide_{i:05d}.svs"
        if not target.exists():
            try:
                os.link(sources[i % len(sources)], target)
            except OSError:
                shutil.copyfile(sources[i % len(sources)], target)
    for extra in sorted(folder.glob("slide_*.svs"))[n:]:
        extra.unlink()
    return folder


def _rchar() -> int | None:
    try:
        for line in Path("/proc/self/io").read_text().splitlines():
            if line.startswith("rchar:"):
                return int(line.split()[1])
    except OSError:
        return None
    return None


def _mean(values: list[float]) -> float:
    return round(statistics.fmean(values), 4) if values else float("nan")


def _measure(run: Path, folder: Path, out: Path, workers: int, n: int, loaders: int) -> dict:
    target = out / f"predict-w{workers}"
    shutil.rmtree(target, ignore_errors=True)
    cache = out / f"cache-w{workers}"
    shutil.rmtree(cache, ignore_errors=True)
    os.environ["LOUPE_CACHE_DIR"] = str(cache)
    read_before = _rchar()
    start = time.perf_counter()
    result = predict(run, [folder], out=target, workers=workers, loader_workers=loaders)
    wall = time.perf_counter() - start
    read = _rchar()
    counts = result.counts()
    if counts["done"] != n:
        raise SystemExit(f"{workers} workers: {counts}")
    timings = {r["slide_id"]: r for r in csv.DictReader((target / "timings.csv").open())}
    finished = sorted((json.loads(p.read_text())["finished_at"], p.stem) for p in (target / "state").glob("*.json"))
    tenth = max(1, n // 10)
    first, last = finished[:tenth], finished[-tenth:]

    def per_slide(part: list[tuple[float, str]]) -> float:
        return _mean([float(timings[s]["total"]) for _, s in part])

    def interval(part: list[tuple[float, str]]) -> float:  # wall time between completions, all workers together
        return round((part[-1][0] - part[0][0]) / max(1, len(part) - 1), 4)

    row = {
        "workers": workers,
        "slides": n,
        "wall_s": round(wall, 1),
        "slides_per_hour": round(n / wall * 3600),
        "steps_mean_s": {step: _mean([float(t[step] or 0) for t in timings.values()]) for step in TIMING_STEPS},
        "slide_s_first_10pct": per_slide(first),
        "slide_s_last_10pct": per_slide(last),
        "interval_s_first_10pct": interval(first),
        "interval_s_last_10pct": interval(last),
    }
    if workers == 1 and loaders == 0 and read_before is not None and read is not None:
        row["bytes_read_per_slide"] = round((read - read_before) / n)
    print(
        f"{workers} workers: {n} slides in {wall:.1f} s ({row['slides_per_hour']} slides/h); time per slide "
        f"first 10% {row['slide_s_first_10pct']} s, last 10% {row['slide_s_last_10pct']} s"
    )
    return row


def _markdown(rows: list[dict], env: dict) -> str:
    lines = [
        f"# `loupe predict` with several workers: {rows[0]['slides']} slides of {env['size']}",
        "",
        f"Machine: {env['machine']}, {env['cpus']} CPUs; {env['loader_workers']} loader processes per worker. "
        f"Run {env['run']}; fresh output folder and slide cache "
        "per row. Step times are the mean per slide (s); intervals are the wall time between two slides "
        "finishing, all workers together.",
        "",
        "| workers | wall s | slides/h | " + " | ".join(TIMING_STEPS) + " | per slide, first 10% | last 10% | "
        "interval, first 10% | last 10% | bytes read per slide |",
        "|---" * (8 + len(TIMING_STEPS)) + "|",
    ]
    for r in rows:
        steps = " | ".join(f"{r['steps_mean_s'][s]:.3f}" for s in TIMING_STEPS)
        lines.append(
            f"| {r['workers']} | {r['wall_s']} | {r['slides_per_hour']} | {steps} | {r['slide_s_first_10pct']} | "
            f"{r['slide_s_last_10pct']} | {r['interval_s_first_10pct']} | {r['interval_s_last_10pct']} | "
            f"{r.get('bytes_read_per_slide', '')} |"
        )
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--run", type=Path, required=True, help="a trained run (e.g. the demo's: runs/demo/run)")
    parser.add_argument("--n", type=int, default=1000, help="slides")
    parser.add_argument(
        "--size", type=_size, nargs="+", default=[(4096, 3072)], help="slide sizes WxH at 0.25 µm/px, taken in turn"
    )
    parser.add_argument("--workers", nargs="+", type=int, default=[1, 2])
    parser.add_argument("--loader-workers", type=int, default=0, help="per worker (0: bytes read are measured)")
    args = parser.parse_args()
    folder = _slides(args.out, args.n, args.size)
    rows = [_measure(args.run, folder, args.out, w, args.n, args.loader_workers) for w in args.workers]
    env = {
        "machine": platform.processor() or platform.machine(),
        "cpus": os.cpu_count(),
        "run": str(args.run),
        "size": ", ".join(f"{w}×{h}" for w, h in args.size),
        "loader_workers": args.loader_workers,
    }
    write_json(args.out / "predict_workers.json", {"environment": env, "rows": rows})
    text = _markdown(rows, env)
    write_text(args.out / "predict_workers.md", text)
    print(text)


if __name__ == "__main__":
    main()
