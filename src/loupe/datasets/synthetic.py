"""Deterministic synthetic slides whose class can be told at exactly one magnification, in one small region.

Each image is pink "tissue" with smooth and fine noise. In one cell of the planted magnification's grid sits a
faint purple marker disc (the same in every class, so the thumbnail can tell *where* to look but not *what*).
Inside that cell two small blobs sit in two neighbouring half-cells, side by side (class ``horizontal``) or one
above the other (class ``vertical``). The blobs are filled with a checkerboard whose squares are exactly one
pixel at the planted magnification and whose mean equals the marker's colour:

* at any lower magnification the checkerboard box-averages to the flat marker colour, so the evidence vanishes;
* at any higher magnification a patch covers at most one half-cell, i.e. one blob, and a lone blob looks the
  same in both classes, so the evidence is too large to be seen there.

The label is therefore visible only to a patch read at the planted magnification from the marked cell.

Sparse evidence (:func:`sparse_spec`): the lesion shrinks to one cell and the image grows, so that the cells that
hold the label cover a chosen fraction of the image (1%, 0.5%...), and ``distractors`` decoy lesions are planted at
the *other* magnifications: the same marker and the same blob pairs, one-pixel checkerboard at *their*
magnification, but oriented at random, independently of the label. A decoy looks like evidence at its own
magnification (and from the thumbnail) and carries none: the model must find both the place and the magnification.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import numpy as np
from PIL import Image

CLASSES = ("horizontal", "vertical")

_BACKGROUND = np.array([232.0, 196.0, 214.0])
_MARKER = np.array([150.0, 104.0, 172.0])
_CHECKER_DELTA = np.array([64.0, 56.0, 58.0])  # the checkerboard modulates the marker by ± delta


@dataclass(frozen=True)
class SyntheticSpec:
    """The geometry of a synthetic dataset; magnifications are µm/px, from lowest to highest."""

    image_size: int = 256
    mpp: float = 0.5
    magnifications: tuple[float, ...] = (2.0, 1.0, 0.5)
    labels: tuple[str, ...] = ("5x", "10x", "20x")
    patch_size: int = 32
    signal: str = "highest"
    splits: dict[str, int] = field(default_factory=lambda: {"train": 240, "val": 60, "test": 100})
    seed: int = 0
    min_lesion_fraction: float = 0.375
    """The lesion spans at least this fraction of the image side (whole cells of the planted magnification)."""
    distractors: int = 0
    """Decoy lesions at the other magnifications (label-independent orientation); see the module docstring."""

    def cell_pixels(self, j: int) -> int:
        """Base pixels per side of a cell at magnification j."""
        return self.patch_size * round(self.magnifications[j] / self.mpp)

    def lesion_cells(self, j: int) -> int:
        """Cells per side of the lesion at magnification j."""
        return max(1, round(self.min_lesion_fraction * self.image_size / self.cell_pixels(j)))

    def evidence_fraction(self) -> float:
        """The share of the image covered by the cells whose patches hold the label."""
        j = self.signal_index()
        return (self.lesion_cells(j) * self.cell_pixels(j)) ** 2 / self.image_size**2

    def signal_index(self) -> int:
        """Index of the planted magnification: ``highest``, ``lowest`` or a label."""
        if self.signal == "highest":
            return int(np.argmin(self.magnifications))
        if self.signal == "lowest":
            return int(np.argmax(self.magnifications))
        if self.signal in self.labels:
            return self.labels.index(self.signal)
        raise ValueError(f"signal magnification {self.signal!r}: use 'highest', 'lowest' or one of {self.labels}")


def sparse_spec(evidence: float, *, distractors: int = 2, **fields: object) -> SyntheticSpec:
    """A spec whose evidence is one cell of the planted magnification covering ``evidence`` of the image.

    The image is the smallest whole number of planted cells whose area is at least ``1 / evidence`` cells (so the
    fraction is at most ``evidence``); other fields (``signal``, ``splits``, ``seed``...) pass through.
    """
    if not 0 < evidence <= 0.25:
        raise ValueError(f"evidence fraction {evidence}: expected a fraction in (0, 0.25]")
    base = SyntheticSpec(**fields)  # type: ignore[arg-type]
    cell = base.cell_pixels(base.signal_index())
    side = math.ceil(round(1 / math.sqrt(evidence), 6))
    size = cell * side
    return replace(base, image_size=size, min_lesion_fraction=0.5 / side, distractors=distractors)


def _background(rng: np.random.Generator, size: int) -> np.ndarray:
    coarse = rng.normal(0.0, 1.0, (8, 8, 3)).astype(np.float32)
    smooth = np.stack(
        [np.asarray(Image.fromarray(coarse[..., c]).resize((size, size), Image.Resampling.BICUBIC)) for c in range(3)],
        -1,
    )
    return _BACKGROUND + 10.0 * smooth + rng.normal(0.0, 4.0, (size, size, 3))


def render_image(spec: SyntheticSpec, label: int, rng: np.random.Generator) -> np.ndarray:
    """One synthetic image (size × size × 3, uint8) of class ``label``."""
    size = spec.image_size
    j = spec.signal_index()
    img = _background(rng, size)
    yy, xx = np.mgrid[0:size, 0:size]
    cell = spec.cell_pixels(j)
    side = spec.lesion_cells(j)
    row, col = rng.integers(0, size // cell - side + 1, size=2)
    taken = [_plant(img, yy, xx, rng, spec, j, side, (int(row), int(col)), label)]
    others = [m for m in range(len(spec.magnifications)) if m != j]
    for i in range(spec.distractors):
        m = others[i % len(others)]
        box = _free_place(rng, spec, m, taken)
        if box is not None:
            taken.append(_plant(img, yy, xx, rng, spec, m, 1, box, int(rng.integers(0, len(CLASSES)))))
    return np.clip(np.rint(img), 0, 255).astype(np.uint8)


def _plant(
    img: np.ndarray,
    yy: np.ndarray,
    xx: np.ndarray,
    rng: np.random.Generator,
    spec: SyntheticSpec,
    j: int,
    side: int,
    at: tuple[int, int],
    orientation: int,
) -> tuple[float, float, float]:
    """Paint a lesion of ``side``² cells of magnification j at grid cell ``at`` (marker disc, then one blob pair
    per cell in ``orientation``: 0 horizontal, 1 vertical); return its disc (centre y, centre x, radius)."""
    d = round(spec.magnifications[j] / spec.mpp)  # base pixels per pixel at magnification j
    cell = spec.patch_size * d
    row, col = at
    cy, cx = (row + side / 2) * cell, (col + side / 2) * cell
    radius_px = 0.75 * side * cell
    marker = (yy - cy) ** 2 + (xx - cx) ** 2 <= radius_px**2
    img[marker] = _MARKER + rng.normal(0.0, 4.0, (int(marker.sum()), 3))

    half = cell // 2
    step = 2 * d  # joint jitter in steps of 2d keeps the checkerboard aligned to every coarser grid
    radius = 0.3 * half
    checker = (((yy // d) + (xx // d)) % 2)[..., None] * 2.0 - 1.0
    for lr in range(side):
        for lc in range(side):
            if orientation == 0:  # horizontal: both half-cells of one half-row
                r = int(rng.integers(0, 2))
                halves = [(r, 0), (r, 1)]
            else:  # vertical: both half-cells of one half-column
                c = int(rng.integers(0, 2))
                halves = [(0, c), (1, c)]
            jitter = rng.integers(-(half // 8) // step, (half // 8) // step + 1, size=2) * step
            for hr, hc in halves:
                by = (row + lr) * cell + hr * half + half / 2 + jitter[0]
                bx = (col + lc) * cell + hc * half + half / 2 + jitter[1]
                blob = (yy + 0.5 - by) ** 2 + (xx + 0.5 - bx) ** 2 <= radius**2
                # Modulate whole 2d×2d blocks only: box-averaging by 2d gives back exactly the marker underneath.
                blob = _whole_squares(blob, d)
                img[blob] += (_CHECKER_DELTA * checker)[blob]
    return cy, cx, radius_px


def _free_place(
    rng: np.random.Generator, spec: SyntheticSpec, j: int, taken: list[tuple[float, float, float]], tries: int = 50
) -> tuple[int, int] | None:
    """A random cell of magnification j whose marker disc does not touch any disc in ``taken`` (None: no room)."""
    cell = spec.cell_pixels(j)
    n = spec.image_size // cell
    if n < 1:
        return None
    for _ in range(tries):
        row, col = (int(v) for v in rng.integers(0, n, size=2))
        cy, cx, r = (row + 0.5) * cell, (col + 0.5) * cell, 0.75 * cell
        if all((cy - y) ** 2 + (cx - x) ** 2 > (r + q) ** 2 for y, x, q in taken):
            return row, col
    return None


def _whole_squares(mask: np.ndarray, d: int) -> np.ndarray:
    """Snap a mask to 2d×2d blocks (a block is kept when its centre is in the mask)."""
    s = 2 * d
    h, w = mask.shape
    centres = mask[s // 2 :: s, s // 2 :: s] if s > 1 else mask
    return np.repeat(np.repeat(centres, s, 0), s, 1)[:h, :w]


def write_tiff(path: Path, image: np.ndarray, mpp: float) -> None:
    """Save an RGB image as a TIFF with its resolution (pixels per centimetre) so readers find the µm/px."""
    import tifffile

    per_cm = 1e4 / mpp
    tifffile.imwrite(
        path,
        image,
        photometric="rgb",
        resolution=(per_cm, per_cm),
        resolutionunit="CENTIMETER",
        compression=None,
    )


def generate_dataset(out_dir: str | Path, spec: SyntheticSpec | None = None) -> Path:
    """Write images, ``manifest.csv`` and ``dataset.json`` into ``out_dir``; return the manifest path.

    Deterministic for a spec; re-running with the same spec reuses what is already there.
    """
    spec = spec or SyntheticSpec()
    out = Path(out_dir)
    (out / "images").mkdir(parents=True, exist_ok=True)
    info = asdict(spec) | {
        "classes": list(CLASSES),
        "signal_label": spec.labels[spec.signal_index()],
        "evidence_fraction": spec.evidence_fraction(),
    }
    manifest = out / "manifest.csv"
    info_path = out / "dataset.json"
    if manifest.exists() and info_path.exists() and json.loads(info_path.read_text()) == _jsonable(info):
        return manifest
    rng = np.random.default_rng(spec.seed)
    rows = ["slide_id,path,label,split"]
    for split, n in spec.splits.items():
        labels = np.arange(n) % len(CLASSES)
        rng.shuffle(labels)
        for i, label in enumerate(labels):
            slide_id = f"{split}_{i:04d}"
            write_tiff(out / "images" / f"{slide_id}.tif", render_image(spec, int(label), rng), spec.mpp)
            rows.append(f"{slide_id},images/{slide_id}.tif,{CLASSES[label]},{split}")
    manifest.write_text("\n".join(rows) + "\n")
    info_path.write_text(json.dumps(_jsonable(info), indent=2))
    return manifest


def _jsonable(obj: object) -> object:
    return json.loads(json.dumps(obj, default=list))


def magnification_views(image: np.ndarray, downsamples: Sequence[int]) -> list[np.ndarray]:
    """Box-averaged views of an image at integer downsamples (for inspecting where the evidence survives)."""
    views = []
    for d in downsamples:
        h, w = (image.shape[0] // d) * d, (image.shape[1] // d) * d
        views.append(image[:h, :w].reshape(h // d, d, w // d, d, 3).mean(axis=(1, 3)))
    return views
