"""A whole run's settings (:class:`Config`) and their validation: every value's range, the relations between
settings, and no setting of another architecture's section. A :class:`Config` is only ever built valid."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import asdict, dataclass, field, fields
from typing import Any

from loupe.config.architectures import SECTIONS, ArchitectureSettings, GatedMILConfig, JointConfig, StreamingCLAMConfig
from loupe.config.checks import Rule, one_of, plain, show
from loupe.config.sections import DataConfig, ModelConfig, TrainConfig
from loupe.errors import ConfigError


@dataclass(frozen=True)
class Config:
    """A whole run. Built only from valid values: construction runs :func:`validate_config`.

    The shared sections ``data``, ``model`` and ``train``, then one section per architecture (its dataclass in
    :mod:`loupe.config.architectures`, listed in ``SECTIONS``); only the section of ``model.architecture`` may
    differ from its defaults.
    """

    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    joint: JointConfig = field(default_factory=JointConfig)
    gated_mil: GatedMILConfig = field(default_factory=GatedMILConfig)
    streamingclam: StreamingCLAMConfig = field(default_factory=StreamingCLAMConfig)

    def __post_init__(self) -> None:
        validate_config(self)

    def section(self) -> ArchitectureSettings:
        """The settings section of this run's architecture."""
        section: ArchitectureSettings = getattr(self, self.model.architecture)
        return section

    def to_dict(self) -> dict[str, Any]:
        """The plain form, with only the section of the run's architecture (the others do not apply)."""
        unused = set(SECTIONS) - {self.model.architecture}
        return {k: v for k, v in asdict(self).items() if k not in unused}


#: Every section of a run by name: its dataclass.
SECTION_TYPES: dict[str, type[Any]] = {"data": DataConfig, "model": ModelConfig, "train": TrainConfig, **SECTIONS}


def _collect_rules() -> dict[str, Rule]:
    return {f"{name}.{key}": rule for name, kind in SECTION_TYPES.items() for key, rule in kind.RULES.items()}


#: The range and form of every value the types alone do not constrain, by ``section.key`` (each section declares its
#: own, as ``RULES``).
RULES: dict[str, Rule] = _collect_rules()


def _values(cfg: Config) -> Iterator[tuple[str, Any]]:
    for section in fields(cfg):
        value = getattr(cfg, section.name)
        for f in fields(value):
            yield f"{section.name}.{f.name}", getattr(value, f.name)


def validate_config(cfg: Config) -> None:
    """Raise :class:`ConfigError` naming the first invalid setting, its value and what is accepted.

    Checks each value's range (:data:`RULES`), the relations between settings (folds, fractions, magnifications
    and their labels, what the architecture's section declares) and that no section of another architecture is
    set. What only the models layer knows (which networks exist, which read weights from where) is checked by
    :func:`loupe.models.factory.check_config`.
    """
    for key, value in _values(cfg):
        rule = RULES.get(key)
        if rule is not None and not rule[0](value):
            raise ConfigError(f"{key}={show(value)}: expected {rule[1]}")
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
            f"model.magnification_labels={show(m.magnification_labels)}: expected one label per magnification "
            f"({len(m.magnifications)}: {', '.join(m.magnifications)})"
        )
    from loupe.slides.formats import BACKENDS  # the slides layer owns its readers' names
    from loupe.slides.magnification import parse_magnifications  # and the notation

    if cfg.data.backend not in BACKENDS:
        raise ConfigError(f"data.backend={show(cfg.data.backend)}: expected {one_of(BACKENDS)[1]}")

    parse_magnifications(m.magnifications, m.magnification_labels)
    relation = cfg.section().relation_error()
    if relation is not None:
        raise ConfigError(relation)
    if cfg.section().one_magnification and len(m.magnifications) != 1:
        raise ConfigError(
            f"model.magnifications={show(m.magnifications)}: {m.architecture} reads one magnification; give one, "
            'e.g. ["0.5"]'
        )
    for name, kind in SECTIONS.items():
        if name != m.architecture:
            changed = changed_keys(getattr(cfg, name), kind())
            if changed:
                raise unused_settings_error(m.architecture, [f"{name}.{key}" for key in changed])


def changed_keys(value: Any, default: Any) -> list[str]:
    """The settings of a section that differ from another instance (its defaults)."""
    return [f.name for f in fields(value) if plain(getattr(value, f.name)) != plain(getattr(default, f.name))]


def unused_settings_error(architecture: str, keys: list[str]) -> ConfigError:
    """The error for settings of another architecture's section."""
    sections = sorted({k.split(".")[0] for k in keys})
    return ConfigError(
        f"{', '.join(keys)}: not used by model.architecture {architecture} (the {'/'.join(sections)} section "
        f"belongs to another architecture): remove {'it' if len(keys) == 1 else 'them'}, or set "
        f"model.architecture {sections[0]}"
    )
