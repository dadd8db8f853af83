"""Typed, frozen settings of a run. YAML configs and the command line bind to these (jsonargparse)."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Literal

INFERENCE_MODES = ("sample", "mean", "topk", "exhaustive")


@dataclass(frozen=True)
class DataConfig:
    """Where the slides are and how they are read."""

    manifest: str | None = None
    """CSV with columns path, label and optionally slide_id, split (train/val/test), mpp, group."""
    classes: list[str] | None = None
    """Class order; default: the sorted labels of the manifest."""
    slide_mpp: float | None = None
    """µm/px for slides whose files carry none (a manifest mpp column wins per slide)."""
    backend: Literal["auto", "openslide", "tiffslide", "image"] = "auto"
    """auto: OpenSlide for slides, Pillow/tifffile for plain images; tiffslide needs the extra
    `pip install 'loupe[tiffslide]'`."""
    tissue: bool = True
    """Detect tissue on an overview image and give background cells zero attention (off for images that are
    all tissue, such as BACH)."""
    tissue_min_fraction: float = 0.05
    """A cell is sampled only if at least this fraction of its area is tissue."""
    cache: bool = True
    """Keep each slide's header, thumbnail, overview and tissue mask in a disk cache, keyed by their parameters."""
    cache_dir: str | None = None
    """Cache folder; default $LOUPE_CACHE_DIR or ~/.cache/loupe."""
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


@dataclass(frozen=True)
class ModelConfig:
    """The model: the joint spatial and magnification attention-sampling model, or a baseline beside it."""

    architecture: Literal["joint", "gated_mil", "streamingclam"] = "joint"
    """joint: attention sampling over every magnification (the paper; one magnification = the single-magnification
    baseline); gated_mil: gated-attention MIL over every patch of one magnification (CLAM's head); streamingclam:
    a streamed CNN trained end to end on the whole image (settings under ``streaming``)."""
    magnifications: list[str] = field(default_factory=lambda: ["2.0", "1.0", "0.5"])
    """µm/px ("0.5"), objective power ("20x", = 10/20 µm/px) or downsample ("ds4") per magnification."""
    magnification_labels: list[str] | None = None
    """Names used in outputs (e.g. 50X/100X/200X); default: as written above."""
    patch_size: int = 32
    thumbnail_size: tuple[int, int] = (96, 96)
    """(width, height) of the thumbnail given to h."""
    thumbnail_backbone: str = "tiny"
    patch_backbone: str = "tiny"
    thumbnail_pretrained: bool | str = False
    """false, true (timm hub weights) or the path of a local checkpoint."""
    patch_pretrained: bool | str = False
    k: int = 5
    replace: bool = False
    """Sample with replacement (i.i.d.) or without (Gumbel-top-k)."""
    normalisation: Literal["sigmoid", "softmax"] = "sigmoid"
    balance_magnifications: bool = True
    """Start every magnification with the same total attention, whatever its number of cells."""
    attention_dropout: float = 0.0
    classifier_dropout: float = 0.5
    entropy_alpha: float = 0.01
    estimator: Literal["sampled", "exhaustive"] = "sampled"
    """sampled: k cells per image; exhaustive: f on every cell and the exact sum (the all-patches baseline)."""


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
    precision: str = "32-true"
    """Lightning precision; "16-mixed" / "bf16-mixed" (AMP) also apply to evaluate and predict on a GPU."""
    channels_last: bool = True
    """Run the backbones channels-last: faster convolutions with cuDNN (above all with AMP) and with oneDNN on CPU."""
    inference: Literal["sample", "mean", "topk", "exhaustive"] = "mean"
    """How validation, evaluation and prediction pool patches: one sample of k, the mean over
    inference_samples samples, the top-k cells, or every cell."""
    inference_samples: int = 8
    progress_bar: bool = True


@dataclass(frozen=True)
class StreamingConfig:
    """StreamingCLAM (``model.architecture: streamingclam``): the CNN ``model.patch_backbone`` runs over the whole
    image at ``model.magnifications[0]`` tile by tile; ``model.patch_size`` is one feature-map position in pixels
    (the trunk's stride × ``local_pool``: 32 for a ResNet). ``data.batch_size`` slides are streamed one at a time
    and their gradients accumulated into one optimiser step."""

    tile_size: int = 2048
    """Side of the input tiles streamed through the trunk; memory grows with it, not with the slide."""
    local_pool: int = 1
    """Max-pool the feature map by this factor before attention (fewer, larger instances)."""
    attention_hidden: int = 128
    attention_dropout: float = 0.25
    instance_loss: bool = False
    """CLAM's instance-clustering loss on the most and least attended positions."""
    instance_k: int = 8
    """Positions per side (most / least attended) in the instance loss."""
    instance_weight: float = 0.3
    """Loss = (1 − w)·bag cross-entropy + w·instance loss (CLAM's 0.7 / 0.3)."""
    freeze_encoder_epochs: int = 0
    """Train only the head for this many epochs (no streamed backward), then the whole network."""
    calibrate_normalisation: bool | None = None
    """Before training, set the trunk's (frozen) normalisation statistics from training images; None: only for a
    randomly initialised trunk (pretrained ones keep theirs)."""
    crop_to_tissue: bool = True
    """Stream only the bounding box of the tissue (with tissue detection on); the rest is glass."""


@dataclass(frozen=True)
class Config:
    """A whole run."""

    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    streaming: StreamingConfig = field(default_factory=StreamingConfig)

    def to_dict(self) -> dict:
        return asdict(self)


def config_parser(prog: str = "loupe train"):
    """The jsonargparse parser of a run's settings: ``--config FILE`` (repeatable) and every field as an option."""
    from jsonargparse import ActionConfigFile, ArgumentParser

    parser = ArgumentParser(prog=prog, exit_on_error=True)
    parser.add_argument("--config", action=ActionConfigFile, help="YAML config file(s); later ones override")
    parser.add_class_arguments(DataConfig, "data")
    parser.add_class_arguments(ModelConfig, "model")
    parser.add_class_arguments(TrainConfig, "train")
    parser.add_class_arguments(StreamingConfig, "streaming")
    return parser


def config_from_namespace(parser, namespace) -> Config:
    """Turn a parsed namespace into a :class:`Config`."""
    init = parser.instantiate(namespace) if hasattr(parser, "instantiate") else parser.instantiate_classes(namespace)
    return Config(data=init.data, model=init.model, train=init.train, streaming=init.streaming)


def load_config(path: str | Path) -> Config:
    """Read a YAML config (a shipped preset or a run's resolved config.yaml); unknown keys are errors."""
    parser = config_parser()
    return config_from_namespace(parser, parser.parse_args(["--config", str(path)]))


def dump_config(cfg: Config) -> str:
    """The YAML form of a config, loadable by :func:`load_config`."""
    import yaml

    return yaml.safe_dump(_plain(cfg.to_dict()), sort_keys=False)


def _plain(obj: object) -> object:
    if isinstance(obj, dict):
        return {k: _plain(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_plain(v) for v in obj]
    return obj
