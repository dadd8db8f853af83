"""Generated images of a given geometry (by default BACH's), written to disk as TIFFs, for timing runs.

Timing needs real files read by the real backend, not tensors made in memory: each image is a smooth pink
"tissue" background with purple blobs, stored uncompressed with its resolution, as the BACH photos are read
(plain-image backend). Labels are random; the images carry no signal (speed does not depend on it).
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from loupe.config import Config, DataConfig, JointConfig, ModelConfig, TrainConfig
from loupe.datasets.synthetic import write_tiff


@dataclass(frozen=True)
class Geometry:
    """Image size and µm/px, magnifications (µm/px, lowest first), patch and thumbnail size, k.

    The default is BACH's: 2048×1536 photos at 0.42 µm/px (200X), patch 299, 50X/100X/200X giving grids 2×2,
    4×3 and 7×6 (58 cells), thumbnail 299×224, k = 5.
    """

    width: int = 2048
    height: int = 1536
    mpp: float = 0.42
    magnifications: tuple[str, ...] = ("1.68", "0.84", "0.42")
    labels: tuple[str, ...] = ("50X", "100X", "200X")
    patch_size: int = 299
    thumbnail_size: tuple[int, int] = (299, 224)
    k: int = 5
    classes: tuple[str, ...] = ("Normal", "Benign", "InSitu", "Invasive")


def render(geometry: Geometry, rng: np.random.Generator) -> np.ndarray:
    """One H×W×3 uint8 image: smooth background, fine noise and a few hundred purple blobs."""
    w, h = geometry.width, geometry.height
    coarse = rng.normal(0.0, 1.0, (12, 16, 3)).astype(np.float32)
    smooth = np.stack(
        [np.asarray(Image.fromarray(coarse[..., c]).resize((w, h), Image.Resampling.BICUBIC)) for c in range(3)], -1
    )
    img = np.array([232.0, 196.0, 214.0], dtype=np.float32) + 12.0 * smooth
    img += rng.normal(0.0, 5.0, (h, w, 1)).astype(np.float32)
    for _ in range(300):
        r = int(rng.integers(4, 24))
        cy, cx = int(rng.integers(r, h - r)), int(rng.integers(r, w - r))
        yy, xx = np.ogrid[-r : r + 1, -r : r + 1]
        blob = yy**2 + xx**2 <= r * r
        img[cy - r : cy + r + 1, cx - r : cx + r + 1][blob] = (150.0, 104.0, 172.0)
    return np.clip(img, 0, 255).astype(np.uint8)


def generate_images(
    out_dir: str | Path, n_train: int, n_test: int, geometry: Geometry | None = None, seed: int = 0, n_val: int = 1
) -> Path:
    """Write ``n_train`` + ``n_val`` + ``n_test`` images and ``manifest.csv`` (with their splits) into ``out_dir``;
    return the manifest. Reuses a folder made with the same arguments."""
    geometry = geometry or Geometry()
    out = Path(out_dir)
    manifest, info_path = out / "manifest.csv", out / "dataset.json"
    info = json.loads(
        json.dumps({"geometry": asdict(geometry), "n_train": n_train, "n_val": n_val, "n_test": n_test, "seed": seed})
    )
    if manifest.is_file() and info_path.is_file() and json.loads(info_path.read_text()) == info:
        return manifest
    (out / "images").mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    rows = ["slide_id,path,label,split"]
    for split, n in (("train", n_train), ("val", n_val), ("test", n_test)):
        for i in range(n):
            slide_id = f"{split}_{i:03d}"
            write_tiff(out / "images" / f"{slide_id}.tif", render(geometry, rng), geometry.mpp)
            label = geometry.classes[int(rng.integers(len(geometry.classes)))]
            rows.append(f"{slide_id},images/{slide_id}.tif,{label},{split}")
    manifest.write_text("\n".join(rows) + "\n")
    info_path.write_text(json.dumps(info, indent=2))
    return manifest


def geometry_config(
    manifest: Path, geometry: Geometry | None = None, backbone: str = "tiny", batch_size: int = 4
) -> Config:
    """The run config of the generated images: that geometry, ``backbone`` for both h and f, tissue off."""
    g = geometry or Geometry()
    return Config(
        data=DataConfig(
            manifest=str(manifest), classes=list(g.classes), tissue=False, batch_size=batch_size, read_threads=4
        ),
        model=ModelConfig(
            magnifications=list(g.magnifications),
            magnification_labels=list(g.labels),
            patch_backbone=backbone,
        ),
        joint=JointConfig(
            patch_size=g.patch_size,
            thumbnail_size=g.thumbnail_size,
            thumbnail_backbone=backbone,
            k=g.k,
            balance_magnifications=False,
        ),
        train=TrainConfig(epochs=1, progress_bar=False),
    )


def with_manifest(cfg: Config, manifest: Path) -> Config:
    """``cfg`` reading ``manifest``."""
    return dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, manifest=str(manifest)))
