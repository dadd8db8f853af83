"""Wall time of tissue detection (`loupe.slides.tissue.detect_tissue`) on synthetic overviews of several sizes.

Tissue is detected on every slide's overview before any patch is read, so it must stay a small part of a slide's
time (~10-40 ms at the default 1024×768). The overview is the one the tissue tests use, scaled: white glass with
a pink blob holding a small hole, a purple ring enclosing a large glass region, and specks. Each size is timed
with the default settings and with hole filling and speck removal off (the saturation threshold alone), after one
warm-up call; the best and the median of ``--repeats`` calls are reported. Replaces a wall-time assertion that
the test suite used to make, which failed on busy machines without saying anything about the code.

    python benchmarks/tissue_speed.py                                   # 1024×768, 2048×1536, 4096×3072
    python benchmarks/tissue_speed.py --sizes 1024x768 --repeats 20
    python benchmarks/tissue_speed.py --slide tests/fixtures/slides/cmu-1-small-region.svs   # a real thumbnail

Prints a Markdown table; ``--out FILE`` also writes it there.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import time
from pathlib import Path

import numpy as np

from loupe.slides.tissue import TissueSettings, detect_tissue

PINK = (232, 150, 195)
PURPLE = (150, 85, 170)
GLASS = (243, 242, 240)
SETTINGS = {
    "default": TissueSettings(),
    "threshold only": TissueSettings(fill_holes=False, min_object_fraction=0.0),
}


def _size(text: str) -> tuple[int, int]:
    w, h = text.lower().split("x")
    return int(w), int(h)


def synthetic_overview(width: int, height: int, seed: int = 0) -> np.ndarray:
    """The tissue tests' overview (designed at 1024×768) scaled to ``width``×``height``: blobs, a hole, specks."""
    rng = np.random.default_rng(seed)
    s = min(width / 1024, height / 768)
    yy, xx = np.mgrid[0:height, 0:width]

    def disc(cy: float, cx: float, r: float) -> np.ndarray:
        return (yy - cy * s) ** 2 + (xx - cx * s) ** 2 <= (r * s) ** 2

    def noisy(colour: tuple[int, int, int], amp: int) -> np.ndarray:
        noise = rng.integers(-amp, amp + 1, size=(height, width, 3))
        return np.clip(np.asarray(colour) + noise, 0, 255).astype(np.uint8)

    img = noisy(GLASS, 4)
    pink, hole = disc(250, 280, 150), disc(250, 280, 15)
    ring = disc(500, 750, 200) & ~disc(500, 750, 110)
    img[pink] = noisy(PINK, 20)[pink]
    img[ring] = noisy(PURPLE, 20)[ring]
    img[hole] = noisy(GLASS, 4)[hole]
    side = max(1, round(3 * s))
    for y, x in [(60, 900), (700, 80), (720, 400), (40, 40)]:
        y0, x0 = round(y * s), round(x * s)
        img[y0 : y0 + side, x0 : x0 + side] = PURPLE
    return img


def _slide_thumbnail(path: Path) -> np.ndarray:
    """A real slide's overview as loupe takes it: the thumbnail at most 1024 px on its longer side."""
    from loupe.slides import open_slide

    with open_slide(path) as reader:
        w, h = reader.dimensions
        scale = min(1.0, 1024 / max(w, h))
        return reader.thumbnail((max(1, round(w * scale)), max(1, round(h * scale))))


def time_detection(img: np.ndarray, settings: TissueSettings, repeats: int) -> tuple[float, float, float]:
    """The best and median seconds of ``repeats`` calls after one warm-up, and the tissue fraction found."""
    fraction = float(detect_tissue(img, settings).mean())
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        detect_tissue(img, settings)
        times.append(time.perf_counter() - start)
    return min(times), statistics.median(times), fraction


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", nargs="+", type=_size, default=[(1024, 768), (2048, 1536), (4096, 3072)])
    parser.add_argument("--slide", type=Path, action="append", default=[], help="also time a real slide's thumbnail")
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--out", type=Path, default=None, help="also write the table to this file")
    args = parser.parse_args()
    if args.repeats < 1:
        parser.error("--repeats must be at least 1")
    images = [(f"synthetic {w}×{h}", synthetic_overview(w, h)) for w, h in args.sizes]
    images += [(path.name, _slide_thumbnail(path)) for path in args.slide]
    lines = [
        f"detect_tissue, best and median of {args.repeats} calls; {platform.machine()}, {os.cpu_count()} CPUs, "
        f"load average {os.getloadavg()[0]:.1f}",
        "",
        "| overview | pixels | settings | best ms | median ms | ms per Mpx (best) | tissue |",
        "| --- | ---: | --- | ---: | ---: | ---: | ---: |",
    ]
    for name, img in images:
        pixels = img.shape[0] * img.shape[1]
        for label, settings in SETTINGS.items():
            best, median, fraction = time_detection(img, settings, args.repeats)
            lines.append(
                f"| {name} | {pixels / 1e6:.2f} M | {label} | {best * 1e3:.1f} | {median * 1e3:.1f} | "
                f"{best * 1e3 / (pixels / 1e6):.1f} | {fraction:.3f} |"
            )
    text = "\n".join(lines) + "\n"
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text)
    print(text, end="")


if __name__ == "__main__":
    main()
