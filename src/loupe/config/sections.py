"""The sections every run has: ``data`` (where the slides are, how they are read), ``model`` (what every
architecture shares) and ``train`` (the optimisation). Each section declares the ranges of its values (``RULES``,
by setting name), checked when a config is built."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar

from loupe.config.architectures import SECTIONS
from loupe.config.checks import (
    BACKBONE,
    DROPOUT,
    FOLDS,
    FRACTION,
    NON_NEGATIVE,
    NON_NEGATIVE_INT,
    OPEN_FRACTION,
    OPTIONAL_POSITIVE,
    POSITIVE,
    POSITIVE_INT,
    PRETRAINED,
    Rule,
    one_of,
)

#: Lightning precision settings accepted by ``train.precision``.
PRECISIONS = ("32-true", "32", "64-true", "64", "16-mixed", "bf16-mixed", "16-true", "bf16-true")
ACCELERATORS = ("auto", "cpu", "gpu", "cuda", "mps")
#: Lightning strategies loupe trains with: one device, or data-parallel processes (DDP).
STRATEGIES = ("auto", "ddp", "ddp_spawn", "ddp_find_unused_parameters_true")


@dataclass(frozen=True)
class DataConfig:
    """Where the slides are and how they are read."""

    manifest: str | None = None
    """CSV with columns path, label and optionally slide_id, split (train/val/test), mpp, group."""
    classes: list[str] | None = None
    """Class order; default: the sorted labels of the manifest."""
    slide_mpp: float | None = None
    """µm/px for slides whose files carry none (a manifest mpp column wins per slide)."""
    backend: str = "auto"
    """auto, openslide, tiffslide or image (the list: :data:`loupe.slides.formats.BACKENDS`). auto: OpenSlide for
    slides, Pillow/tifffile for plain images; tiffslide needs the extra `pip install 'loupe[tiffslide]'`."""
    tissue: bool = True
    """Detect tissue on an overview image and give background cells zero attention (off for images that are
    all tissue, such as BACH)."""
    tissue_min_fraction: float = 0.05
    """A cell is sampled only if at least this fraction of its area is tissue."""
    cache: bool = True
    """Keep each slide's header, thumbnail, overview and tissue mask in a disk cache, keyed by their parameters."""
    cache_dir: str | None = None
    """Cache folder; default $LOUPE_CACHE_DIR or ~/.cache/loupe."""
    embedding_cache: bool = True
    """With a frozen patch encoder (``model.freeze_patch_backbone``): keep every patch embedding on disk (under the
    cache folder's ``embeddings/``, keyed by slide, encoder weights and cell), so an epoch embeds only cells never
    embedded before and evaluate and predict reuse them."""
    folds: int | None = None
    """Cross-validation: the test split is fold ``fold`` of a stratified, patient-grouped k-fold; the manifest's
    split column is then ignored and val is drawn from the remaining folds."""
    fold: int = 0
    batch_size: int = 8
    num_workers: int = 0
    """DataLoader workers for thumbnails (patches are read by threads in the training process)."""
    read_threads: int = 8
    cache_thumbnails: bool = True
    """Keep each slide's thumbnail and valid cells in memory after the first epoch."""
    val_fraction: float = 0.2
    test_fraction: float = 0.2
    """Used only for slides without a split value: stratified, group-aware random split."""
    split_seed: int = 0
    max_failed_fraction: float = 0.05
    """Training skips (with a warning, listed in the run's ``skipped_slides.json``) slides that cannot be read,
    before or during training, and stops with a message once more than this fraction of its slides failed."""

    RULES: ClassVar[dict[str, Rule]] = {
        "slide_mpp": OPTIONAL_POSITIVE,
        "tissue_min_fraction": FRACTION,
        "folds": FOLDS,
        "fold": NON_NEGATIVE_INT,
        "batch_size": POSITIVE_INT,
        "num_workers": NON_NEGATIVE_INT,
        "read_threads": POSITIVE_INT,
        "val_fraction": DROPOUT,
        "test_fraction": DROPOUT,
        "max_failed_fraction": FRACTION,
    }


@dataclass(frozen=True)
class ModelConfig:
    """What every architecture has: which one, the magnifications it reads, its patch (or trunk) network and the
    classifier's dropout. The rest is in the architecture's own section."""

    architecture: str = "joint"
    """joint: attention sampling over every magnification (the paper; one magnification = the single-magnification
    baseline; settings under ``joint``); gated_mil: gated-attention MIL over every patch of one magnification
    (CLAM's head; ``gated_mil``); streamingclam: a streamed CNN trained end to end on the whole image
    (``streamingclam``)."""
    magnifications: list[str] = field(default_factory=lambda: ["2.0", "1.0", "0.5"])
    """µm/px ("0.5"), objective power ("20x", = 10/20 µm/px) or downsample ("ds4") per magnification."""
    magnification_labels: list[str] | None = None
    """Names used in outputs (e.g. 50X/100X/200X); default: as written above."""
    patch_backbone: str = "tiny"
    """The patch network f (joint, gated_mil) or the streamed trunk (streamingclam): "tiny", "tiny_s8" or a timm
    model name."""
    patch_pretrained: bool | str = False
    """false, true (the weights installed with the package for "efficientnet-lite0-imagenet"; timm hub weights for a
    timm model name) or the path of a local checkpoint (a registry encoder: its weights file)."""
    freeze_patch_backbone: bool = False
    """Keep the patch network as loaded: no gradient, eval mode, and on a GPU with mixed precision held in the
    compute dtype. The attention network, the thumbnail network and the classifier still train end to end (the
    estimator's gradient reaches the attention through P). For StreamingCLAM: the trunk never trains."""
    classifier_dropout: float = 0.5

    RULES: ClassVar[dict[str, Rule]] = {
        "architecture": one_of(tuple(SECTIONS)),
        "magnifications": ((lambda v: isinstance(v, list) and len(v) >= 1), "a list of at least one magnification"),
        "patch_backbone": BACKBONE,
        "patch_pretrained": PRETRAINED,
        "classifier_dropout": DROPOUT,
    }


@dataclass(frozen=True)
class TrainConfig:
    """The optimisation (paper defaults: Adam 1e-4, LR ×0.1 after 25 epochs without improvement, 100 epochs)."""

    epochs: int = 100
    lr: float = 1e-4
    weight_decay: float = 0.0
    lr_patience: int = 25
    lr_factor: float = 0.1
    seed: int = 0
    accelerator: str = "auto"
    """auto (a GPU when there is one), cpu, gpu (= cuda) or mps."""
    precision: str = "32-true"
    """Lightning precision; "16-mixed" / "bf16-mixed" (AMP) also apply to evaluate and predict on a GPU."""
    channels_last: bool = True
    """Run the networks channels-last: faster convolutions with cuDNN (above all with AMP) and with oneDNN on CPU."""
    progress_bar: bool = True
    devices: int = 1
    """Devices (GPUs, or CPU processes) per node, one training process each (Lightning DDP when more than one in
    all): every process trains on its own shard of each epoch, and ``data.batch_size`` is the batch of each one."""
    num_nodes: int = 1
    """Nodes of a multi-node run (launched by SLURM's ``srun`` or by ``torchrun`` on each node)."""
    strategy: str = "auto"
    """Lightning strategy: auto (ddp when devices × num_nodes > 1), ddp, ddp_spawn, or
    ddp_find_unused_parameters_true (a custom model with parameters some steps do not use)."""

    #: Each architecture's settings section: its name in the config and its dataclass.

    RULES: ClassVar[dict[str, Rule]] = {
        "epochs": POSITIVE_INT,
        "lr": POSITIVE,
        "weight_decay": NON_NEGATIVE,
        "lr_patience": NON_NEGATIVE_INT,
        "lr_factor": OPEN_FRACTION,
        "seed": NON_NEGATIVE_INT,
        "accelerator": one_of(ACCELERATORS),
        "precision": one_of(PRECISIONS),
        "devices": POSITIVE_INT,
        "num_nodes": POSITIVE_INT,
        "strategy": one_of(STRATEGIES),
    }
