"""Typed, frozen settings of a run. YAML configs and the command line bind to these (jsonargparse).

A run has the shared sections ``data``, ``model`` (what every architecture uses) and ``train`` (the optimisation)
(:mod:`~loupe.config.sections`), plus one section per architecture holding what only that architecture uses
(:mod:`~loupe.config.architectures`). A setting of another architecture's section is an error, not silently
ignored, and every value is checked when the config is built (:mod:`~loupe.config.run`), before any slide is
opened. :mod:`~loupe.config.parsing` reads YAML and command lines, :mod:`~loupe.config.migration` loupe 0.1 configs.
"""

from loupe.config.architectures import (
    ARCHITECTURES,
    INFERENCE_MODES,
    SECTIONS,
    ArchitectureSettings,
    GatedMILConfig,
    InferenceMode,
    JointConfig,
    StreamingCLAMConfig,
)
from loupe.config.migration import is_legacy_layout, migrate_legacy_layout
from loupe.config.parsing import (
    argument_error_message,
    check_config_file,
    config_from_namespace,
    config_parser,
    dump_config,
    load_config,
    parse_arguments,
    parse_config,
)
from loupe.config.run import RULES, SECTION_TYPES, Config, unused_settings_error, validate_config
from loupe.config.sections import ACCELERATORS, PRECISIONS, STRATEGIES, DataConfig, ModelConfig, TrainConfig

__all__ = [
    "ACCELERATORS",
    "ARCHITECTURES",
    "INFERENCE_MODES",
    "PRECISIONS",
    "RULES",
    "SECTIONS",
    "SECTION_TYPES",
    "STRATEGIES",
    "ArchitectureSettings",
    "Config",
    "DataConfig",
    "GatedMILConfig",
    "InferenceMode",
    "JointConfig",
    "ModelConfig",
    "StreamingCLAMConfig",
    "TrainConfig",
    "argument_error_message",
    "check_config_file",
    "config_from_namespace",
    "config_parser",
    "dump_config",
    "is_legacy_layout",
    "load_config",
    "migrate_legacy_layout",
    "parse_arguments",
    "parse_config",
    "unused_settings_error",
    "validate_config",
]
