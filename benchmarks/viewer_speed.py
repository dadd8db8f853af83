"""Speed of `loupe view` on a generated 40000×30000 pyramidal slide and on a cohort of 10,000 slides.

    python benchmarks/viewer_speed.py --out runs/bench-viewer          # --size 40000x30000 --cohort 10000

Measures, against the viewer served on loopback (uvicorn, as `loupe view` runs it):

- tile latency p50/p95 over HTTP with one kept-alive connection: "cold" is a tile the viewer has not made yet
  (read from the slide and JPEG-encoded), "warm" the same tile again (from the viewer's tile cache);
- the slide page in headless Chromium (Playwright, Debian's /usr/bin/chromium): from navigation start to the first
  tile loaded and to every tile of the first view drawn, with the viewer's cache cold and warm;
- several tabs (each in a window of its own, all visible) opening different full-resolution views of the slide at
  once (cold cache): the time until every tab has drawn its view, and the tile requests' latency as the browser saw
  them;
- the cohort page at 10,000 slides (a merged summary, and a folder that workers are still filling: state files and
  slide summaries only): the page's rows rendered from navigation start, and a sort by probability.

Writes OUT/viewer_speed.json and OUT/viewer_speed.md. The slide file is in the operating system's page cache after
it is written: "cold" is the viewer's cache, not the disk.
"""

from __future__ import annotations

import argparse
import http.client
import os
import platform
import random
import statistics
import time
from pathlib import Path
from typing import Any

import numpy as np

from loupe.data.manifest import SlideRecord
from loupe.datasets.synthetic_wsi import make_pyramidal_slide
from loupe.reports.io import write_csv, write_json, write_text
from loupe.slides import build_grid, open_slide
from loupe.viewer.deepzoom import DeepZoom
from loupe.viewer.server import background_server
from loupe.workflows.run_summary import merge_summary
from loupe.workflows.slide_outputs import SlideResult, write_slide_folder
from loupe.workflows.slide_state import SlideStates

LABELS = ["5x", "10x", "20x"]
CLASSES = ["benign", "tumour"]
SETTINGS = {"mode": "topk", "samples": 1, "k": 8, "tissue": True, "seed": 0}
CHROMIUM = "/usr/bin/chromium"


def _size(text: str) -> tuple[int, int]:
    w, h = text.lower().split("x")
    return int(w), int(h)


def _percentiles(values: list[float]) -> dict[str, float]:
    arr = np.asarray(values, dtype=np.float64)
    return {"p50": float(np.percentile(arr, 50)), "p95": float(np.percentile(arr, 95)), "n": len(values)}


def slide_folder(root: Path, size: tuple[int, int]) -> tuple[Path, Path]:
    """The generated slide and a predict output folder for it, written by loupe's own writers."""
    w, h = size
    path = root / "slides" / f"wsi_{w}x{h}.svs"
    if not path.is_file():
        info = make_pyramidal_slide(path, w, h, mpp=0.25, tissue_fraction=0.25, seed=1)
        mb, levels = info.file_bytes / 2**20, len(info.level_dimensions)
        print(f"wrote {path} ({mb:.0f} MB, {levels} levels) in {info.seconds:.0f} s")
    out = root / "predict"
    if not (out / "status.json").is_file():
        with open_slide(path) as reader:
            grid = build_grid(reader.dimensions, reader.mpp, LABELS, 224, path)
        rng = np.random.default_rng(0)
        attention = rng.gamma(0.3, size=grid.n_cells)
        attention /= attention.sum()
        cells = np.argsort(-attention)[: SETTINGS["k"]]
        result = SlideResult(
            slide_id=path.stem,
            path=str(path),
            probs=np.array([0.2, 0.8]),
            attention=attention,
            cells=cells,
            valid=np.ones(grid.n_cells, dtype=bool),
            grid=grid,
            overview=np.zeros((750, 1000, 3), dtype=np.uint8),
            tissue=np.ones((750, 1000), dtype=bool),
            timings={"open": 0.01},
            mpp=0.25,
        )
        states = SlideStates(out, SETTINGS)
        write_slide_folder(out / "slides" / path.stem, result, CLASSES, LABELS, SETTINGS)
        states.done(path.stem, str(path), {"open": 0.01}, "bench")
        merge_summary(out, [SlideRecord(path.stem, path)], states, {"settings": SETTINGS}, CLASSES, LABELS)
    return path, out


def cohort_folders(root: Path, n: int) -> tuple[Path, Path]:
    """Two predict output folders of ``n`` slides: one merged (status.json, predictions.csv), one still being
    filled (a state file and a prediction.json per slide, no summary yet)."""
    merged, filling = root / f"cohort-{n}", root / f"cohort-{n}-filling"
    rng = np.random.default_rng(0)
    ids = [f"slide_{i:05d}" for i in range(n)]
    if not (merged / "status.json").is_file():
        slides, rows = {}, []
        for slide_id in ids:
            p = float(rng.random())
            failed = rng.random() < 0.01
            entry: dict[str, Any] = {"status": "failed" if failed else "done", "path": f"/data/{slide_id}.svs"}
            if failed:
                entry["reason"] = "SlideError: damaged file"
            else:
                entry["timings_s"] = {"open": 0.01, "model": float(rng.random())}
                rows.append(
                    {
                        "slide_id": slide_id,
                        "path": entry["path"],
                        "label": CLASSES[int(rng.random() < 0.5)],
                        "predicted": CLASSES[int(p > 0.5)],
                        "prob_benign": 1 - p,
                        "prob_tumour": p,
                    }
                )
            slides[slide_id] = entry
        write_json(merged / "status.json", {"settings": SETTINGS, "slides": slides})
        columns = ["slide_id", "path", "label", "predicted", "prob_benign", "prob_tumour"]
        write_csv(merged / "predictions.csv", rows, columns)
    if not (filling / "state").is_dir():
        states = SlideStates(filling, SETTINGS)
        for slide_id in ids:
            p = float(rng.random())
            info = {"slide_id": slide_id, "predicted": CLASSES[int(p > 0.5)], "settings": SETTINGS}
            info |= {"probabilities": {"benign": 1 - p, "tumour": p}, "attention_share": {"20x": 1.0}}
            write_json(filling / "slides" / slide_id / "prediction.json", info, indent=None)
            states.done(slide_id, f"/data/{slide_id}.svs", {"open": 0.01}, "bench")
    return merged, filling


def tile_latency(out: Path, slide: Path, n: int, seed: int = 0) -> dict[str, Any]:
    """Cold and warm latency of ``n`` tiles of the slide's finest Deep Zoom levels, one connection."""
    from loupe.slides.tissue import detect_tissue

    with open_slide(slide) as reader:
        dz = DeepZoom(reader.dimensions)
        tissue = detect_tissue(reader.thumbnail((1000, 750)))
    rng = random.Random(seed)
    picks, on_tissue = [], []
    for _ in range(n):
        level = dz.max_level - rng.choice([0, 0, 0, 1, 2, 3])  # mostly full resolution, as when reading a slide
        cols, rows = dz.level_tiles(level)
        col, row = rng.randrange(cols), rng.randrange(rows)
        if (level, col, row) in picks:
            continue
        lw, lh = dz.level_dimensions(level)
        cy = min(tissue.shape[0] - 1, int((row + 0.5) * dz.tile_size / lh * tissue.shape[0]))
        cx = min(tissue.shape[1] - 1, int((col + 0.5) * dz.tile_size / lw * tissue.shape[1]))
        picks.append((level, col, row))
        on_tissue.append(bool(tissue[cy, cx]))
    result: dict[str, Any] = {}
    with background_server(out) as url:
        host, port = url.split("//")[1].rstrip("/").split(":")
        conn = http.client.HTTPConnection(host, int(port), timeout=60)
        name = slide.stem

        def fetch(level: int, col: int, row: int) -> float:
            start = time.perf_counter()
            conn.request("GET", f"/dz/{name}_files/{level}/{col}_{row}.jpeg")
            response = conn.getresponse()
            response.read()
            assert response.status == 200, response.status
            return (time.perf_counter() - start) * 1000

        fetch(dz.max_level - 8, 0, 0)  # opens the slide
        cold = [fetch(*t) for t in picks]
        warm = [fetch(*t) for t in picks]
        result["cold_ms"], result["warm_ms"] = _percentiles(cold), _percentiles(warm)
        result["tissue_cold_ms"] = _percentiles([t for t, keep in zip(cold, on_tissue, strict=True) if keep])
        result["tissue_warm_ms"] = _percentiles([t for t, keep in zip(warm, on_tissue, strict=True) if keep])
        conn.close()
    return result


#: Tabs that are not in front draw as if they were (Chromium otherwise throttles their animation frames).
FOREGROUND = ["--disable-background-timer-throttling", "--disable-renderer-backgrounding"]


def _chromium(playwright: Any) -> Any:
    return playwright.chromium.launch(
        executable_path=CHROMIUM, args=["--no-sandbox", *FOREGROUND, "--disable-backgrounding-occluded-windows"]
    )


def first_paint(out: Path, slide_id: str, runs: int) -> dict[str, Any]:
    """Navigation start → first tile loaded / first view fully drawn, cold (a fresh server) and warm."""
    from playwright.sync_api import sync_playwright

    cold: dict[str, list[float]] = {"first_tile": [], "view_drawn": []}
    warm: dict[str, list[float]] = {"first_tile": [], "view_drawn": []}
    with sync_playwright() as playwright:
        browser = _chromium(playwright)
        for _ in range(runs):
            with background_server(out) as url:
                for bucket in (cold, warm):
                    context = browser.new_context(viewport={"width": 1280, "height": 800})  # no browser cache
                    page = context.new_page()
                    page.goto(f"{url}slide/{slide_id}")
                    page.wait_for_selector("body[data-tiles=loaded]", timeout=60_000)
                    marks = page.evaluate("window.loupeMarks")
                    bucket["first_tile"].append(marks["firstTile"])
                    bucket["view_drawn"].append(marks["fullyLoaded"])
                    context.close()
        browser.close()
    return {
        "cold_ms": {k: statistics.median(v) for k, v in cold.items()},
        "warm_ms": {k: statistics.median(v) for k, v in warm.items()},
        "runs": runs,
    }


def tabs(out: Path, slide: Path, n_tabs: int) -> dict[str, Any]:
    """``n_tabs`` tabs opening different full-resolution views of the slide at once, on a cold server."""
    from playwright.sync_api import sync_playwright

    with open_slide(slide) as reader:
        w, h = reader.dimensions
    rng = random.Random(1)
    views = [(rng.uniform(0.2, 0.8), rng.uniform(0.2, 0.8) * h / w) for _ in range(n_tabs)]
    with sync_playwright() as playwright, background_server(out) as url:
        browser = _chromium(playwright)
        # One window each: a tab behind another draws nothing until it is shown (no animation frames), so tabs
        # sharing one window would measure Chromium's background throttling, not the server.
        pages = [browser.new_context(viewport={"width": 1280, "height": 800}).new_page() for _ in range(n_tabs)]
        start = time.perf_counter()
        for page, (x, y) in zip(pages, views, strict=True):
            page.goto(f"{url}slide/{slide.stem}?x={x:.4f}&y={y:.4f}&z=40", wait_until="commit")
        for page in pages:
            page.wait_for_selector("body[data-tiles=loaded]", timeout=120_000)
        wall = time.perf_counter() - start
        durations: list[float] = []
        for page in pages:
            durations += page.evaluate(
                "performance.getEntriesByType('resource').filter(e => e.name.includes('_files/')).map(e => e.duration)"
            )
        browser.close()
    return {"tabs": n_tabs, "all_drawn_s": wall, "tile_ms": _percentiles(durations)}


def cohort_page(folder: Path) -> dict[str, Any]:
    """The folder's first read (as `loupe view` does before it prints its URL), then the cohort page from
    navigation start to its rows rendered, then a sort by probability."""
    from playwright.sync_api import sync_playwright

    from loupe.viewer.cohort import open_cohort

    start = time.perf_counter()
    open_cohort(folder).rows()
    read_ms = (time.perf_counter() - start) * 1000
    with sync_playwright() as playwright, background_server(folder) as url:
        browser = _chromium(playwright)
        page = browser.new_page(viewport={"width": 1280, "height": 800})
        page.goto(url)
        page.wait_for_selector("body[data-loaded]", timeout=60_000)
        loaded = page.evaluate("performance.now()")
        before = page.get_attribute("body", "data-loaded")
        start = time.perf_counter()
        page.click("th[data-key=probability]")
        page.wait_for_function(f"() => document.body.dataset.loaded !== '{before}'", timeout=60_000)
        sort_ms = (time.perf_counter() - start) * 1000
        rows = page.eval_on_selector_all("#rows tr", "r => r.length")
        total = page.inner_text("#range")
        browser.close()
    return {"read_ms": read_ms, "page_ms": loaded, "sort_ms": sort_ms, "rows_shown": rows, "range": total}


def _table(r: dict[str, Any]) -> str:
    t, fp, tb = r["tiles"], r["first_paint"], r["tabs"]
    lines = [
        f"`loupe view` speed, {r['slide']} ({r['machine']})",
        "",
        "| measure | cold | warm |",
        "|---|---|---|",
        f"| tile latency p50 ({t['cold_ms']['n']} tiles, ms) | {t['cold_ms']['p50']:.1f} | {t['warm_ms']['p50']:.1f} |",
        f"| tile latency p95 (ms) | {t['cold_ms']['p95']:.1f} | {t['warm_ms']['p95']:.1f} |",
        f"| tissue tiles only ({t['tissue_cold_ms']['n']}): latency p50 (ms) | {t['tissue_cold_ms']['p50']:.1f} | "
        f"{t['tissue_warm_ms']['p50']:.1f} |",
        f"| tissue tiles only: latency p95 (ms) | {t['tissue_cold_ms']['p95']:.1f} | "
        f"{t['tissue_warm_ms']['p95']:.1f} |",
        f"| slide page: first tile loaded (ms) | {fp['cold_ms']['first_tile']:.0f} | "
        f"{fp['warm_ms']['first_tile']:.0f} |",
        f"| slide page: first view fully drawn (ms) | {fp['cold_ms']['view_drawn']:.0f} | "
        f"{fp['warm_ms']['view_drawn']:.0f} |",
        f"| {tb['tabs']} tabs at once, full resolution: all drawn (s) | {tb['all_drawn_s']:.2f} | |",
        f"| {tb['tabs']} tabs: tile requests p50 / p95, as the browser saw them (ms) | "
        f"{tb['tile_ms']['p50']:.0f} / {tb['tile_ms']['p95']:.0f} | |",
    ]
    for name, c in r["cohort"].items():
        lines.append(f"| `loupe view` start, {name}: the folder read (ms) | {c['read_ms']:.0f} | |")
        lines.append(f"| cohort page, {name}: rows shown (ms) | {c['page_ms']:.0f} | |")
        lines.append(f"| cohort page, {name}: sort by probability (ms) | {c['sort_ms']:.0f} | |")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--size", type=_size, default=(40000, 30000), help="slide size WxH")
    parser.add_argument("--tiles", type=int, default=300, help="tiles timed cold and warm")
    parser.add_argument("--tabs", type=int, default=4, help="browser tabs opened at once")
    parser.add_argument("--cohort", type=int, default=10000, help="slides in the cohort folders")
    parser.add_argument("--runs", type=int, default=3, help="slide page loads (medians)")
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    slide, out = slide_folder(args.out, args.size)
    merged, filling = cohort_folders(args.out, args.cohort)
    result: dict[str, Any] = {
        "slide": f"{args.size[0]}x{args.size[1]} px generated SVS (JPEG tiles, {slide.stat().st_size / 2**20:.0f} MB)",
        "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs",
    }
    result["tiles"] = tile_latency(out, slide, args.tiles)
    print("tiles", result["tiles"])
    result["first_paint"] = first_paint(out, slide.stem, args.runs)
    print("first paint", result["first_paint"])
    result["tabs"] = tabs(out, slide, args.tabs)
    print("tabs", result["tabs"])
    result["cohort"] = {
        f"{args.cohort} slides": cohort_page(merged),
        f"{args.cohort} slides, workers still filling": cohort_page(filling),
    }
    print("cohort", result["cohort"])
    write_json(args.out / "viewer_speed.json", result)
    table = _table(result)
    write_text(args.out / "viewer_speed.md", table)
    print(table)


if __name__ == "__main__":
    main()
