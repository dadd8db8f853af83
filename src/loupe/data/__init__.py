"""Manifests, splits, the synthetic slide generator, and feeding slides to the model."""

from loupe.data.catalog import SlideCatalog, SlideProblem
from loupe.data.loading import CellReader, ShapeBatchSampler, ThumbnailDataset, make_loader
from loupe.data.manifest import Manifest, SlideRecord, load_manifest, manifest_from_paths, save_manifest
from loupe.data.splits import assign_splits, group_kfold
from loupe.data.synthetic import SyntheticSpec, generate_dataset

__all__ = [
    "CellReader",
    "Manifest",
    "ShapeBatchSampler",
    "SlideCatalog",
    "SlideProblem",
    "SlideRecord",
    "SyntheticSpec",
    "ThumbnailDataset",
    "assign_splits",
    "generate_dataset",
    "group_kfold",
    "load_manifest",
    "make_loader",
    "manifest_from_paths",
    "save_manifest",
]
