"""The pipeline's data: manifests, splits, catalogs, and feeding slides to the model (datasets that loupe makes or
imports are in :mod:`loupe.datasets`)."""

from loupe.data.catalog import SlideCatalog, SlideProblem
from loupe.data.loading import CellReader, ShapeBatchSampler, ThumbnailDataset, make_loader
from loupe.data.manifest import Manifest, SlideRecord, load_manifest, manifest_from_paths, save_manifest
from loupe.data.splits import assign_splits, group_kfold

__all__ = [
    "CellReader",
    "Manifest",
    "ShapeBatchSampler",
    "SlideCatalog",
    "SlideProblem",
    "SlideRecord",
    "ThumbnailDataset",
    "assign_splits",
    "group_kfold",
    "load_manifest",
    "make_loader",
    "manifest_from_paths",
    "save_manifest",
]
