"""Datasets loupe makes or imports: the synthetic slides of the demo and the sparse-evidence family
(:mod:`~loupe.datasets.synthetic`), generated pyramidal whole slides (:mod:`~loupe.datasets.synthetic_wsi`),
Megapixel MNIST (:mod:`~loupe.datasets.megapixel_mnist`) and the BACH importer (:mod:`~loupe.datasets.bach`). Each
writes slide files and a manifest that the pipeline (:mod:`loupe.data`) reads like any other cohort."""

from loupe.datasets.synthetic import SyntheticSpec, generate_dataset

__all__ = ["SyntheticSpec", "generate_dataset"]
