"""What `loupe predict` moves over the network for a slide named by URL, and what latency costs it.

A generated 40000×30000 pyramidal slide (JPEG tiles, 7 levels, tissue on a quarter of the area;
:func:`loupe.datasets.synthetic_wsi.make_pyramidal_slide`) is served by a real nginx on 127.0.0.1. `loupe predict`
(the `loupe bench wsi` joint model: k = 5 patches over 5x/10x/20x, 256-px cells, tissue detection on, random
weights) reads it with a cold slide cache:

- from local disk (OpenSlide, the default backend, and tiffslide, the reader URLs use);
- by URL, directly and through a delaying proxy on loopback that holds every request for 20 or 100 ms before
  passing it on (an added round trip per request);
- by URL again with the slide cache warm (header, thumbnail, overview and tissue mask cached: only patches).

Bytes and requests per slide come from nginx's access log (``$bytes_sent`` of every request: exact). Wall time per
slide is predict's per-slide time (open + thumbnail + overview + tissue + patches + model + write), the median of
``--repeats``; the predict call's wall (with loading the run) is reported too.

    python benchmarks/remote_speed.py --out runs/bench-remote
    python benchmarks/remote_speed.py --out runs/bench-remote --latencies 0 20 100 --repeats 3

Writes OUT/remote_speed.json and OUT/remote_speed.md.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import json
import os
import platform
import shutil
import statistics
import sys
import threading
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests.helpers.nginx: the tests' own nginx

from tests.helpers.nginx import Nginx, free_port

from loupe.bench.wsi import Settings, pipeline_config, random_run
from loupe.datasets.synthetic_wsi import make_pyramidal_slide
from loupe.reports.io import write_json, write_text
from loupe.slides.remote import forget_identities
from loupe.workflows.prediction import predict

SIZE = (40_000, 30_000)


class DelayProxy:
    """A TCP proxy on 127.0.0.1 that holds each chunk the client sends (a request) for ``delay_s`` before
    forwarding it; the server's answers pass at once. Runs its own event loop in a thread."""

    def __init__(self, upstream_port: int, delay_s: float) -> None:
        self.upstream_port, self.delay_s = upstream_port, delay_s
        self.port = free_port()
        self._loop = asyncio.new_event_loop()
        self._ready = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    async def _pipe(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, delay: float) -> None:
        try:
            while data := await reader.read(65536):
                if delay:
                    await asyncio.sleep(delay)
                writer.write(data)
                await writer.drain()
        except (ConnectionError, asyncio.CancelledError):
            pass
        finally:
            writer.close()

    async def _client(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        up_reader, up_writer = await asyncio.open_connection("127.0.0.1", self.upstream_port)
        await asyncio.gather(
            self._pipe(reader, up_writer, self.delay_s), self._pipe(up_reader, writer, 0.0), return_exceptions=True
        )

    def _run(self) -> None:
        asyncio.set_event_loop(self._loop)
        server = self._loop.run_until_complete(asyncio.start_server(self._client, "127.0.0.1", self.port))
        self._ready.set()
        try:
            self._loop.run_forever()
        finally:
            server.close()
            tasks = asyncio.all_tasks(self._loop)
            for task in tasks:
                task.cancel()
            self._loop.run_until_complete(asyncio.gather(*tasks, return_exceptions=True))
            self._loop.close()

    def __enter__(self) -> DelayProxy:
        self._thread.start()
        self._ready.wait(10)
        return self

    def __exit__(self, *exc: object) -> None:
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(10)


def _slide(out: Path) -> Path:
    path = out / "slides" / f"wsi_{SIZE[0]}x{SIZE[1]}.svs"
    if not path.is_file():
        make_pyramidal_slide(path, *SIZE)
    return path


def _runs(out: Path) -> dict[str, Path]:
    cfg = pipeline_config("loupe", Settings())
    tiff = dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, backend="tiffslide"))
    return {"auto": random_run(cfg, out / "runs" / "auto"), "tiffslide": random_run(tiff, out / "runs" / "tiffslide")}


def _once(run: Path, source: str | Path, slide_id: str, out: Path, cache: Path, server: Nginx) -> dict[str, Any]:
    os.environ["LOUPE_CACHE_DIR"] = str(cache)
    forget_identities()
    before = len(server.requests())
    start = time.perf_counter()
    result = predict(run, [source], out=out, workers=0, overwrite=True)
    wall = time.perf_counter() - start
    entry = result.status.slides[slide_id]
    if entry["status"] != "done":
        raise RuntimeError(f"{source}: {entry.get('reason')}")
    requests = server.requests()[before:]
    return {
        "slide_s": round(sum(entry["timings_s"].values()), 3),
        "timings_s": entry["timings_s"],
        "predict_wall_s": round(wall, 3),
        "requests": len(requests),
        "bytes": sum(r[1] for r in requests),
    }


def measure(out: Path, latencies: list[float], repeats: int) -> dict[str, Any]:
    slide = _slide(out)
    runs = _runs(out)
    size = slide.stat().st_size
    rows: list[dict[str, Any]] = []
    with Nginx(slide.parent, out / "nginx") as server:

        def condition(name: str, run: Path, source: str | Path, warm: bool = False) -> None:
            samples = []
            for i in range(repeats):
                cache = out / "cache" / f"{name}-{i}"
                if not warm:
                    shutil.rmtree(cache, ignore_errors=True)
                else:  # filled by one cold run first
                    shutil.rmtree(cache, ignore_errors=True)
                    _once(run, source, slide.stem, out / "predict" / name, cache, server)
                samples.append(_once(run, source, slide.stem, out / "predict" / name, cache, server))
            row = {
                "condition": name,
                "slide_s": statistics.median(s["slide_s"] for s in samples),
                "predict_wall_s": statistics.median(s["predict_wall_s"] for s in samples),
                "requests": statistics.median(s["requests"] for s in samples),
                "bytes": statistics.median(s["bytes"] for s in samples),
                "samples": samples,
            }
            row["bytes_share"] = row["bytes"] / size
            rows.append(row)
            print(f"{name}: {row['slide_s']:.2f} s/slide, {row['requests']} requests, {row['bytes'] / 1e6:.2f} MB")

        condition("local disk, OpenSlide", runs["auto"], slide)
        condition("local disk, tiffslide", runs["tiffslide"], slide)
        for ms in latencies:
            if ms == 0:
                condition("URL, +0 ms", runs["auto"], f"{server.url}/{slide.name}")
                continue
            with DelayProxy(server.port, ms / 1000) as proxy:
                condition(f"URL, +{ms:g} ms", runs["auto"], f"http://127.0.0.1:{proxy.port}/{slide.name}")
        condition("URL, +0 ms, cache warm", runs["auto"], f"{server.url}/{slide.name}", warm=True)
    local = next(r for r in rows if r["condition"] == "local disk, tiffslide")["slide_s"]
    for r in rows:
        r["vs_local_tiffslide"] = r["slide_s"] / local
    return {
        "slide": {"path": str(slide), "size": list(SIZE), "bytes": size},
        "machine": {"platform": platform.platform(), "cpus": os.cpu_count(), "python": platform.python_version()},
        "repeats": repeats,
        "block_size": os.environ.get("LOUPE_REMOTE_BLOCK", "default"),
        "rows": rows,
    }


def markdown(result: dict[str, Any]) -> str:
    size = result["slide"]["bytes"]
    lines = [
        f"Slide {result['slide']['size'][0]}×{result['slide']['size'][1]}, {size / 1e6:.1f} MB; `loupe predict`, "
        f"k = 5, cold slide cache unless said; median of {result['repeats']}.",
        "",
        "| condition | s per slide | × local (tiffslide) | requests | bytes | share of the file |",
        "|---|---|---|---|---|---|",
    ]
    for r in result["rows"]:
        lines.append(
            f"| {r['condition']} | {r['slide_s']:.2f} | {r['vs_local_tiffslide']:.2f} | {r['requests']:g} | "
            f"{r['bytes'] / 1e6:.2f} MB | {100 * r['bytes_share']:.2f}% |"
        )
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--latencies", type=float, nargs="+", default=[0, 20, 100], help="ms added per request")
    parser.add_argument("--repeats", type=int, default=1)
    ns = parser.parse_args()
    ns.out.mkdir(parents=True, exist_ok=True)
    result = measure(ns.out.resolve(), ns.latencies, ns.repeats)
    write_json(ns.out / "remote_speed.json", result)
    write_text(ns.out / "remote_speed.md", markdown(result))
    print(json.dumps({r["condition"]: r["slide_s"] for r in result["rows"]}))
    print(markdown(result))


if __name__ == "__main__":
    main()
