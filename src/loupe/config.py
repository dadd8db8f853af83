"""Typed, frozen settings of a run. YAML configs and the command line bind to these (jsonargparse).

A run has the shared sections ``data``, ``model`` (what every architecture uses) and ``train`` (the optimisation),
plus one section per architecture (``joint``, ``gated_mil``, ``streamingclam``) holding what only that
architecture uses. A setting of another architecture's section is an error, not silently ignored, and every value
is checked when the config is built (:func:`validate_config`), before any slide is opened.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field, fields, is_dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, get_args

from loupe.errors import ConfigError

if TYPE_CHECKING:
    from jsonargparse import ArgumentParser, Namespace

Architecture = Literal["joint", "gated_mil", "streamingclam"]
InferenceMode = Literal["sample", "mean", "topk", "exhaustive"]

#: Every architecture, in the order they are documented; each has a settings section of the same name.
ARCHITECTURES: tuple[str, ...] = get_args(Architecture)
#: How the joint model pools patches at inference: one sample of k, the mean over several samples, the top-k
#: cells, or every cell.
INFERENCE_MODES: tuple[str, ...] = get_args(InferenceMode)
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


@dataclass(frozen=True)
class ModelConfig:
    """What every architecture has: which one, the magnifications it reads, its patch (or trunk) network and the
    classifier's dropout. The rest is in the architecture's own section."""

    architecture: Architecture = "joint"
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
    """false, true (timm hub weights) or the path of a local checkpoint (a registry encoder: its weights file)."""
    freeze_patch_backbone: bool = False
    """Keep the patch network as loaded: no gradient, eval mode, and on a GPU with mixed precision held in the
    compute dtype. The attention network, the thumbnail network and the classifier still train end to end (the
    estimator's gradient reaches the attention through P). For StreamingCLAM: the trunk never trains."""
    classifier_dropout: float = 0.5


@dataclass(frozen=True)
class JointConfig:
    """The joint spatial and magnification attention-sampling model (``model.architecture: joint``)."""

    patch_size: int = 32
    """Side of a patch (one grid cell) in pixels at its magnification."""
    thumbnail_size: tuple[int, int] = (96, 96)
    """(width, height) of the thumbnail given to h."""
    thumbnail_backbone: str = "tiny"
    thumbnail_pretrained: bool | str = False
    """false, true (timm hub weights) or the path of a local checkpoint."""
    k: int = 5
    """Patches read per sample."""
    replace: bool = False
    """Sample with replacement (i.i.d.) or without (Gumbel-top-k)."""
    uniform_mix: float = 0.5
    """Training draws come from (1 − uniform_mix)·attention + uniform_mix·uniform over the cells, weighted by
    attention/proposal (unbiased): every cell keeps being read while the attention still knows nothing."""
    train_draws: int = 4
    """Independent draws of k cells per slide in a training step, each classified and scored on its own (the loss
    is their mean: the same objective as one draw, with 1/train_draws of its variance). Rare evidence is read
    train_draws times as often, at full weight; one draw (the paper's) is unstable on hard tasks. Costs
    train_draws × k patches per slide and step."""
    novelty: float = 1.0
    """Weight, during the first novelty_epochs epochs, of a pull of the attention towards the drawn cells whose
    patches look least like the rest of the slide: a prior that finds small lesions before the classifier can (it
    shapes the attention only; the estimate of Σ P f stays unbiased)."""
    novelty_epochs: int = 10
    magnification_aware: bool = True
    """A learned linear map per magnification after the patch network (identity at the start): the same pattern
    may mean something else at another scale, and the pooled features keep which magnification they came from."""
    normalisation: Literal["sigmoid", "softmax"] = "sigmoid"
    balance_magnifications: bool = True
    """Start every magnification with the same total attention, whatever its number of cells."""
    attention_dropout: float = 0.0
    entropy_alpha: float = 0.01
    estimator: Literal["sampled", "exhaustive"] = "sampled"
    """sampled: k cells per image; exhaustive: f on every cell and the exact sum (the all-patches baseline)."""
    inference: InferenceMode = "mean"
    """How validation, evaluation and prediction pool patches: one sample of k, the mean over
    inference_samples samples, the top-k cells, or every cell."""
    inference_samples: int = 8


@dataclass(frozen=True)
class GatedMILConfig:
    """Gated-attention MIL over every valid patch of one magnification (``model.architecture: gated_mil``)."""

    patch_size: int = 32
    """Side of a patch (one grid cell) in pixels at the magnification."""
    attention_hidden: int = 128
    attention_dropout: float = 0.0


@dataclass(frozen=True)
class StreamingCLAMConfig:
    """StreamingCLAM (``model.architecture: streamingclam``): the CNN ``model.patch_backbone`` runs over the whole
    image at ``model.magnifications[0]`` tile by tile. One grid cell is one position of the attention head: the
    trunk's stride × ``local_pool`` pixels (32 for a ResNet), derived, not set. ``data.batch_size`` slides are
    streamed one at a time and their gradients accumulated into one optimiser step."""

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
    max_image_in_memory_mb: int = 2048
    """Largest image (MB of uint8 RGB, after the tissue crop) read whole into host memory; a larger one is read
    from the slide crop by crop as the streamed tiles need it (twice per step: the backward recomputes each tile),
    through a cache of 1 GB of chunks, so host memory stays near that cache, not the image (12.9 GB at 65,536²).
    0: always read per tile."""
    k: int = 5
    """Most attended positions listed as a slide's key cells in predict's outputs."""
    checkpoint_segments: bool = True
    """Recompute each residual block in a tile's backward (ResNet trunks): less memory per tile, one more forward
    per tile. Off, with large tiles, a step costs least time (1.7× the ordinary step at 4096² in 2048-px tiles)."""
    fold_normalisation: bool = False
    """Compute with the frozen BatchNorms folded into their convolutions: exact in real arithmetic, about 5% less
    time and a third less memory per tile; off by default because in float32 its activations differ from the
    unfolded ones by rounding (1e-6), which flips a few max-pool choices (3 of 4.2 million at 1024²) and so moves
    single weight gradients by up to 5e-4 relative (the unfolded streamed step stays within 2e-6 of the ordinary
    one)."""
    stem_tile: int = 512
    """Stream the trunk's first ``stem_depth`` children (a ResNet's stem: a 64-channel map at half resolution, the
    largest activation of a tile) over each tile's crop in sub-tiles of this side: the same result, a fraction of
    a tile's peak memory, a few % more time. 0: off."""
    stem_depth: int = 1
    """How many leading children of the ResNet trunk (stem, then its residual blocks in order) are sub-streamed
    with ``stem_tile``: 1 the stem; 4 the stem and layer1 of a ResNet-34 (8 with layer2), less memory again for
    more time (``loupe bench streaming --stem-depth``)."""


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
SECTIONS: dict[str, type] = {"joint": JointConfig, "gated_mil": GatedMILConfig, "streamingclam": StreamingCLAMConfig}


@dataclass(frozen=True)
class Config:
    """A whole run. Built only from valid values: construction runs :func:`validate_config`."""

    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    joint: JointConfig = field(default_factory=JointConfig)
    gated_mil: GatedMILConfig = field(default_factory=GatedMILConfig)
    streamingclam: StreamingCLAMConfig = field(default_factory=StreamingCLAMConfig)

    def __post_init__(self) -> None:
        validate_config(self)

    def section(self) -> JointConfig | GatedMILConfig | StreamingCLAMConfig:
        """The settings section of this run's architecture."""
        section: JointConfig | GatedMILConfig | StreamingCLAMConfig = getattr(self, self.model.architecture)
        return section

    def to_dict(self) -> dict[str, Any]:
        """The plain form, with only the section of the run's architecture (the others do not apply)."""
        unused = set(SECTIONS) - {self.model.architecture}
        return {k: v for k, v in asdict(self).items() if k not in unused}


# --- validation ---------------------------------------------------------------------------------------------------

Check = Callable[[Any], bool]


def _int_at_least(low: int) -> tuple[Check, str]:
    return (lambda v: isinstance(v, int) and not isinstance(v, bool) and v >= low), f"an integer ≥ {low}"


def _finite(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


POSITIVE_INT = _int_at_least(1)
NON_NEGATIVE_INT = _int_at_least(0)
POSITIVE = (lambda v: _finite(v) and v > 0), "a number > 0"
NON_NEGATIVE = (lambda v: _finite(v) and v >= 0), "a number ≥ 0"
FRACTION = (lambda v: _finite(v) and 0 <= v <= 1), "a number in [0, 1]"
DROPOUT = (lambda v: _finite(v) and 0 <= v < 1), "a number in [0, 1)"
OPEN_FRACTION = (lambda v: _finite(v) and 0 < v < 1), "a number in (0, 1)"
OPTIONAL_POSITIVE = (lambda v: v is None or (_finite(v) and v > 0)), "null or a number > 0"
FOLDS = (lambda v: v is None or (isinstance(v, int) and not isinstance(v, bool) and v >= 2)), "null or an integer ≥ 2"


def _backbone(v: Any) -> bool:
    if not isinstance(v, str) or not v.strip():
        return False
    from loupe.models.backbones import TINY  # the model layer owns the names

    if v in TINY:
        return True
    from loupe.models.encoders import ENCODERS

    if v in ENCODERS:
        return True
    import timm

    return bool(timm.is_model(v))


BACKBONE = _backbone, 'a backbone name: "tiny", "tiny_s8", a registry encoder (loupe.models.encoders) or a timm name'


def _pretrained(v: Any) -> bool:
    return isinstance(v, bool) or (isinstance(v, str) and Path(v).expanduser().is_file())


PRETRAINED = _pretrained, "false, true (timm hub weights) or the path of an existing checkpoint file"
THUMBNAIL = (
    (lambda v: isinstance(v, (tuple, list)) and len(v) == 2 and all(isinstance(x, int) and x >= 8 for x in v)),
    "[width, height], each an integer ≥ 8",
)

#: Range and form of every value the types alone do not constrain, by ``section.key``.
RULES: dict[str, tuple[Check, str]] = {
    "data.slide_mpp": OPTIONAL_POSITIVE,
    "data.tissue_min_fraction": FRACTION,
    "data.folds": FOLDS,
    "data.fold": NON_NEGATIVE_INT,
    "data.batch_size": POSITIVE_INT,
    "data.num_workers": NON_NEGATIVE_INT,
    "data.read_threads": POSITIVE_INT,
    "data.val_fraction": (lambda v: _finite(v) and 0 <= v < 1, "a number in [0, 1)"),
    "data.test_fraction": (lambda v: _finite(v) and 0 <= v < 1, "a number in [0, 1)"),
    "data.max_failed_fraction": FRACTION,
    "model.magnifications": (lambda v: isinstance(v, list) and len(v) >= 1, "a list of at least one magnification"),
    "model.patch_backbone": BACKBONE,
    "model.patch_pretrained": PRETRAINED,
    "model.classifier_dropout": DROPOUT,
    "joint.patch_size": _int_at_least(8),
    "joint.thumbnail_size": THUMBNAIL,
    "joint.thumbnail_backbone": BACKBONE,
    "joint.thumbnail_pretrained": PRETRAINED,
    "joint.k": POSITIVE_INT,
    "joint.attention_dropout": DROPOUT,
    "joint.entropy_alpha": NON_NEGATIVE,
    "joint.uniform_mix": FRACTION,
    "joint.train_draws": POSITIVE_INT,
    "joint.novelty_epochs": NON_NEGATIVE_INT,
    "joint.novelty": NON_NEGATIVE,
    "joint.inference_samples": POSITIVE_INT,
    "gated_mil.patch_size": _int_at_least(8),
    "gated_mil.attention_hidden": POSITIVE_INT,
    "gated_mil.attention_dropout": DROPOUT,
    "streamingclam.tile_size": _int_at_least(32),
    "streamingclam.local_pool": POSITIVE_INT,
    "streamingclam.attention_hidden": POSITIVE_INT,
    "streamingclam.attention_dropout": DROPOUT,
    "streamingclam.instance_k": POSITIVE_INT,
    "streamingclam.instance_weight": FRACTION,
    "streamingclam.freeze_encoder_epochs": NON_NEGATIVE_INT,
    "streamingclam.k": POSITIVE_INT,
    "streamingclam.max_image_in_memory_mb": NON_NEGATIVE_INT,
    "streamingclam.stem_tile": NON_NEGATIVE_INT,
    "streamingclam.stem_depth": POSITIVE_INT,
    "train.epochs": POSITIVE_INT,
    "train.lr": POSITIVE,
    "train.weight_decay": NON_NEGATIVE,
    "train.lr_patience": NON_NEGATIVE_INT,
    "train.lr_factor": OPEN_FRACTION,
    "train.seed": NON_NEGATIVE_INT,
    "train.accelerator": ((lambda v: v in ACCELERATORS), f"one of {', '.join(ACCELERATORS)}"),
    "train.precision": ((lambda v: str(v) in PRECISIONS), f"one of {', '.join(PRECISIONS)}"),
    "train.devices": POSITIVE_INT,
    "train.num_nodes": POSITIVE_INT,
    "train.strategy": ((lambda v: v in STRATEGIES), f"one of {', '.join(STRATEGIES)}"),
}


def _values(cfg: Config) -> Iterator[tuple[str, Any]]:
    for section in fields(cfg):
        value = getattr(cfg, section.name)
        for f in fields(value):
            yield f"{section.name}.{f.name}", getattr(value, f.name)


def validate_config(cfg: Config) -> None:
    """Raise :class:`ConfigError` naming the first invalid setting, its value and what is accepted.

    Checks each value's range (:data:`RULES`), the relations between settings (folds, fractions, magnifications
    and their labels, what the architecture supports) and that no section of another architecture is set.
    """
    for key, value in _values(cfg):
        rule = RULES.get(key)
        if rule is not None and not rule[0](value):
            raise ConfigError(f"{key}={_show(value)}: expected {rule[1]}")
    d, m = cfg.data, cfg.model
    if d.folds is not None and d.fold >= d.folds:
        raise ConfigError(f"data.fold={d.fold}: expected an integer in [0, {d.folds}) for data.folds={d.folds}")
    if d.val_fraction + d.test_fraction >= 1:
        raise ConfigError(
            f"data.val_fraction + data.test_fraction = {d.val_fraction + d.test_fraction:g}: expected < 1 "
            "(some slides must be left to train on)"
        )
    if m.magnification_labels is not None and len(m.magnification_labels) != len(m.magnifications):
        raise ConfigError(
            f"model.magnification_labels={_show(m.magnification_labels)}: expected one label per magnification "
            f"({len(m.magnifications)}: {', '.join(m.magnifications)})"
        )
    from loupe.slides.magnification import parse_magnifications  # the slides layer owns the notation

    parse_magnifications(m.magnifications, m.magnification_labels)
    if m.architecture in ("gated_mil", "streamingclam") and len(m.magnifications) != 1:
        raise ConfigError(
            f"model.magnifications={_show(m.magnifications)}: {m.architecture} reads one magnification; give one, "
            'e.g. ["0.5"]'
        )
    _check_encoders(cfg)
    for name, kind in SECTIONS.items():
        if name != m.architecture:
            changed = _changed_keys(getattr(cfg, name), kind())
            if changed:
                raise unused_settings_error(m.architecture, [f"{name}.{key}" for key in changed])


def _check_encoders(cfg: Config) -> None:
    """Registry encoders: weights only from a local file; StreamingCLAM streams a CNN trunk, not a ViT."""
    from loupe.models.encoders import ENCODERS

    pairs = [("model.patch", cfg.model.patch_backbone, cfg.model.patch_pretrained)]
    if cfg.model.architecture == "joint":
        pairs.append(("joint.thumbnail", cfg.joint.thumbnail_backbone, cfg.joint.thumbnail_pretrained))
    for key, name, pretrained in pairs:
        if name in ENCODERS and pretrained is True:
            raise ConfigError(
                f"{key}_pretrained=true: loupe never downloads weights; get {name}'s {ENCODERS[name].weights_file} "
                f"from {ENCODERS[name].weights_url} under its licence and pass its path: --{key}_pretrained FILE"
            )
    if cfg.model.architecture == "streamingclam" and cfg.model.patch_backbone in ENCODERS:
        raise ConfigError(
            f"model.patch_backbone={cfg.model.patch_backbone!r}: streamingclam streams a convolutional trunk "
            '(e.g. "resnet34"); registry encoders are vision transformers: use them with joint or gated_mil'
        )


def _changed_keys(value: Any, default: Any) -> list[str]:
    return [f.name for f in fields(value) if _plain(getattr(value, f.name)) != _plain(getattr(default, f.name))]


def unused_settings_error(architecture: str, keys: list[str]) -> ConfigError:
    """The error for settings of another architecture's section."""
    sections = sorted({k.split(".")[0] for k in keys})
    return ConfigError(
        f"{', '.join(keys)}: not used by model.architecture {architecture} (the {'/'.join(sections)} section "
        f"belongs to another architecture): remove {'it' if len(keys) == 1 else 'them'}, or set "
        f"model.architecture {sections[0]}"
    )


def _show(value: Any) -> str:
    return repr(value) if isinstance(value, str) else str(_plain(value))


# --- parsing ------------------------------------------------------------------------------------------------------


def config_parser(prog: str = "loupe train") -> ArgumentParser:
    """The jsonargparse parser of a run's settings: ``--config FILE`` (repeatable) and every field as an option."""
    from jsonargparse import ActionConfigFile, ArgumentParser, set_parsing_settings

    set_parsing_settings(docstring_parse_attribute_docstrings=True)  # each setting's docstring is its --help text
    parser = ArgumentParser(prog=prog, exit_on_error=False)
    parser.add_argument("--config", action=ActionConfigFile, help="YAML config file(s); later ones override")
    for f in fields(Config):
        parser.add_class_arguments(f.type if isinstance(f.type, type) else _SECTION_TYPES[f.name], f.name)
    return parser


_SECTION_TYPES: dict[str, type] = {
    "data": DataConfig,
    "model": ModelConfig,
    "train": TrainConfig,
    **SECTIONS,
}


def config_from_namespace(parser: ArgumentParser, namespace: Namespace, given: Namespace | None = None) -> Config:
    """Turn a parsed namespace into a validated :class:`Config`. ``given`` (the same arguments parsed without
    defaults) lets settings of another architecture's section be refused even when equal to their defaults."""
    init = parser.instantiate(namespace)
    sections = {name: init[name] for name in _SECTION_TYPES}
    architecture = sections["model"].architecture
    if given is not None:
        explicit = []
        for name, kind in SECTIONS.items():
            keys = _given_keys(given, name)
            if name == architecture or not keys:
                continue
            listed = {f.name for f in fields(kind) if getattr(kind(), f.name) is not None}  # null ones read as unset
            if set(keys) >= listed:  # a complete section, as --print_config writes it: only changed values count
                keys = _changed_keys(sections[name], kind())
            explicit += [f"{name}.{key}" for key in keys]
        if explicit:
            raise unused_settings_error(architecture, explicit)
    return Config(**sections)


def _given_keys(given: Namespace, section: str) -> list[str]:
    value = given.get(section) if hasattr(given, "get") else None
    if value is None:
        return []
    return sorted(k for k in vars(value) if value.get(k) is not None) if hasattr(value, "get") else []


def parse_config(args: list[str], prog: str = "loupe train", parser: ArgumentParser | None = None) -> Config:
    """Parse command-line style arguments (``--config FILE``, ``--section.key VALUE``...) into a validated config;
    bad input raises :class:`ConfigError` with one message naming the setting."""
    parser = parser or config_parser(prog)
    namespace = parse_arguments(parser, args)
    given = parse_arguments(parser, args, defaults=False)
    return config_from_namespace(parser, namespace, given)


def parse_arguments(parser: ArgumentParser, args: list[str], defaults: bool = True) -> Namespace:
    """jsonargparse's parse, with its errors turned into one :class:`ConfigError` line."""
    from jsonargparse import ArgumentError

    for flag, value in itertools.pairwise(args):
        if flag == "--config":
            check_config_file(Path(value))
    try:
        return parser.parse_args(args, defaults=defaults)
    except ArgumentError as err:
        raise ConfigError(argument_error_message(str(err))) from None


def check_config_file(path: Path) -> None:
    """Refuse, with one message naming the file, what jsonargparse would meet with a traceback: a file that is not
    UTF-8 text, not YAML, not a mapping, or with a section that is not a mapping of settings."""
    import yaml

    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as err:
        reason = f"{err.reason} at byte {err.start}"
        raise ConfigError(f"config {path} is not UTF-8 text ({reason}): save it as UTF-8") from None
    except OSError:
        return  # missing or unreadable: reported by the parser
    try:
        raw = yaml.safe_load(text)
    except yaml.YAMLError as err:
        raise ConfigError(f"config {path} is not readable YAML ({' '.join(str(err).split())})") from None
    if raw is None:
        return
    if not isinstance(raw, dict):
        raise ConfigError(
            f"config {path} must be a mapping of sections (data:, model:, train:, ...), not a {type(raw).__name__}"
        )
    for name, value in raw.items():
        if name in _SECTION_TYPES and not isinstance(value, dict):
            raise ConfigError(
                f"config {path}: section {name} must be a mapping of settings (e.g. {name}:\n  key: value), "
                f"got {_show(value)}"
            )


def argument_error_message(text: str) -> str:
    """One line from a jsonargparse error: the key, the value and what is accepted."""
    import re

    lines = [line.strip() for line in text.strip().splitlines() if line.strip()]
    key = re.search(r'(?:Parser )?[Kk]ey "([^"]+)"', text)
    value = re.search(r"(?:Got|Given) value: (.+)", text)
    expected = [_plain_type(e) for e in re.findall(r"Expected a (.+?)(?:\. Got value|$)", text, flags=re.M)]
    expected = list(dict.fromkeys(e for e in expected if e))
    if key and expected:
        shown = value.group(1).strip() if value else "?"
        return f"{key.group(1)}={shown}: expected {' or '.join(expected)}"
    found = re.search(r"[Uu]nrecognized arguments:\s*(.+)", text)
    if found:
        return f"unknown setting {found.group(1).strip()}: see --help for the settings"
    if key and lines:
        rest = " ".join(line for line in lines if not line.startswith("Parser key"))
        return f"{key.group(1)}: {rest}" if rest else lines[0]
    return " ".join(lines) if lines else "invalid arguments"


def _plain_type(text: str) -> str:
    import re

    text = text.strip().rstrip(".")
    literal = re.fullmatch(r"typing\.Literal\[(.+)\]", text)
    if literal:
        return "one of " + ", ".join(v.strip().strip("'\"") for v in literal.group(1).split(","))
    names = {
        "<class 'int'>": "an integer",
        "<class 'float'>": "a number",
        "<class 'bool'>": "true or false",
        "<class 'str'>": "a string",
        "<class 'list'>": "a list, e.g. [a, b]",
        "<class 'tuple'>": "a list, e.g. [a, b]",
        "<class 'NoneType'>": "null",
    }
    return names.get(text, text)


def load_config(path: str | Path) -> Config:
    """Read a YAML config (a shipped preset or a run's resolved config.yaml); unknown keys are errors. A run folder
    written by loupe 0.1 (joint settings under ``model``, ``streaming``) is read in the current layout."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config {path} not found: give the path of a YAML config")
    import yaml

    try:
        raw = yaml.safe_load(path.read_text())
    except (OSError, UnicodeDecodeError, yaml.YAMLError) as err:
        raise ConfigError(f"config {path} is not readable YAML ({' '.join(str(err).split())})") from None
    if isinstance(raw, dict) and is_legacy_layout(raw):
        import logging
        import tempfile

        logging.getLogger("loupe").warning("%s: a loupe 0.1 config; read in the current layout", path)
        with tempfile.TemporaryDirectory() as folder:
            migrated = Path(folder) / path.name
            migrated.write_text(yaml.safe_dump(migrate_legacy_layout(raw), sort_keys=False))
            return parse_config(["--config", str(migrated)])
    return parse_config(["--config", str(path)])


#: Settings that loupe 0.1 kept under ``model`` (and ``train``) and that now live in the ``joint`` section.
_LEGACY_JOINT_MODEL = (
    "patch_size", "thumbnail_size", "thumbnail_backbone", "thumbnail_pretrained", "k", "replace", "normalisation",
    "balance_magnifications", "attention_dropout", "entropy_alpha", "estimator",
)  # fmt: skip
_LEGACY_JOINT_TRAIN = ("inference", "inference_samples")


def is_legacy_layout(raw: dict[str, Any]) -> bool:
    """A config dict in loupe 0.1's layout (a ``streaming`` section, or joint settings under model/train)."""
    model, train = raw.get("model") or {}, raw.get("train") or {}
    return (
        "streaming" in raw
        or any(k in model for k in _LEGACY_JOINT_MODEL)
        or any(k in train for k in _LEGACY_JOINT_TRAIN)
    )


def migrate_legacy_layout(raw: dict[str, Any]) -> dict[str, Any]:
    """loupe 0.1's layout → the current one. Settings that 0.1 ignored for an architecture (e.g. ``model.k`` of
    gated MIL, ``model.patch_size`` of StreamingCLAM, which is now derived) are dropped, as they had no effect."""
    out = {k: dict(v) if isinstance(v, dict) else v for k, v in raw.items()}
    model: dict[str, Any] = out.setdefault("model", {}) or {}
    train: dict[str, Any] = out.setdefault("train", {}) or {}
    arch = model.get("architecture", "joint")
    moved = {k: model.pop(k) for k in _LEGACY_JOINT_MODEL if k in model}
    moved |= {k: train.pop(k) for k in _LEGACY_JOINT_TRAIN if k in train}
    streaming = out.pop("streaming", None) or {}
    if arch == "joint":
        out["joint"] = {**moved, **(out.get("joint") or {})}
    elif arch == "gated_mil":
        out["gated_mil"] = {**{k: moved[k] for k in ("patch_size",) if k in moved}, **(out.get("gated_mil") or {})}
    elif arch == "streamingclam":
        section = {**streaming, **{k: moved[k] for k in ("k",) if k in moved}}
        out["streamingclam"] = {**section, **(out.get("streamingclam") or {})}
    return out


def dump_config(cfg: Config) -> str:
    """The YAML form of a config, loadable by :func:`load_config`."""
    import yaml

    return yaml.safe_dump(_plain(cfg.to_dict()), sort_keys=False)


def _plain(obj: object) -> object:
    if is_dataclass(obj) and not isinstance(obj, type):
        return _plain(asdict(obj))
    if isinstance(obj, dict):
        return {k: _plain(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_plain(v) for v in obj]
    return obj
