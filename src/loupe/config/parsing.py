"""Settings from YAML files and the command line (jsonargparse), with every error as one line naming the setting;
and configs back to YAML."""

from __future__ import annotations

import itertools
from dataclasses import fields
from pathlib import Path
from typing import TYPE_CHECKING

from loupe.config.architectures import SECTIONS
from loupe.config.checks import plain, show
from loupe.config.migration import is_legacy_layout, migrate_legacy_layout
from loupe.config.run import SECTION_TYPES, Config, changed_keys, unused_settings_error
from loupe.errors import ConfigError

if TYPE_CHECKING:
    from jsonargparse import ArgumentParser, Namespace


def config_parser(prog: str = "loupe train") -> ArgumentParser:
    """The jsonargparse parser of a run's settings: ``--config FILE`` (repeatable) and every field as an option."""
    from jsonargparse import ActionConfigFile, ArgumentParser, set_parsing_settings

    set_parsing_settings(docstring_parse_attribute_docstrings=True)  # each setting's docstring is its --help text
    parser = ArgumentParser(prog=prog, exit_on_error=False)
    parser.add_argument("--config", action=ActionConfigFile, help="YAML config file(s); later ones override")
    for name, kind in SECTION_TYPES.items():
        parser.add_class_arguments(kind, name)
    return parser


def config_from_namespace(parser: ArgumentParser, namespace: Namespace, given: Namespace | None = None) -> Config:
    """Turn a parsed namespace into a validated :class:`Config`. ``given`` (the same arguments parsed without
    defaults) lets settings of another architecture's section be refused even when equal to their defaults."""
    init = parser.instantiate(namespace)
    sections = {name: init[name] for name in SECTION_TYPES}
    architecture = sections["model"].architecture
    if architecture not in SECTIONS:  # before its sections are compared with it
        raise ConfigError(f"model.architecture={show(architecture)}: expected one of {', '.join(SECTIONS)}")
    if given is not None:
        explicit = []
        for name, kind in SECTIONS.items():
            keys = _given_keys(given, name)
            if name == architecture or not keys:
                continue
            listed = {f.name for f in fields(kind) if getattr(kind(), f.name) is not None}  # null ones read as unset
            if set(keys) >= listed:  # a complete section, as --print_config writes it: only changed values count
                keys = changed_keys(sections[name], kind())
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
        if name in SECTION_TYPES and not isinstance(value, dict):
            raise ConfigError(
                f"config {path}: section {name} must be a mapping of settings (e.g. {name}:\n  key: value), "
                f"got {show(value)}"
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


def dump_config(cfg: Config) -> str:
    """The YAML form of a config, loadable by :func:`load_config`."""
    import yaml

    return yaml.safe_dump(plain(cfg.to_dict()), sort_keys=False)
