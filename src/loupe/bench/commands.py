"""The `loupe bench` subcommands in one table: a name, what it measures, and the module that holds its
``build_parser(prog)`` and ``run_command(ns)``.

A subcommand's options are parsed by the command line's own parser (jsonargparse, through
:func:`loupe.config.parsing.parse_arguments`), so a bad option is one line and exit status 2, as for every other
command. Modules are imported on first use: `loupe bench streaming` (and the processes it spawns) does not pay for
Lightning and the workflows. A new bench is one module with those two functions and one entry here.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol, cast

from loupe.errors import ConfigError

if TYPE_CHECKING:
    from jsonargparse import ArgumentParser, Namespace


class BenchModule(Protocol):
    """What the module of a subcommand provides."""

    def build_parser(self, prog: str) -> ArgumentParser: ...

    def run_command(self, ns: Namespace) -> int: ...


@dataclass(frozen=True)
class BenchCommand:
    """One `loupe bench NAME` subcommand."""

    module: str
    """The module holding ``build_parser`` and ``run_command`` (imported on first use)."""
    summary: str
    """What it measures, as ``loupe --help`` lists it."""

    def load(self) -> BenchModule:
        return cast(BenchModule, importlib.import_module(self.module))


#: The subcommand `loupe bench` runs when no name is given.
DEFAULT = "tables"

BENCH_COMMANDS: dict[str, BenchCommand] = {
    "tables": BenchCommand(
        "loupe.bench.command",
        "the paper's speed tables and a profile (the default; --accuracy: joint vs baselines on the same splits)",
    ),
    "accuracy": BenchCommand(
        "loupe.bench.cohort",
        "any cohort: k-fold CV of joint, single magnifications, all patches, gated MIL; patches read, time",
    ),
    "wsi": BenchCommand("loupe.bench.wsi", "whole-slide cost of loupe against patch-everything"),
    "streaming": BenchCommand("loupe.bench.streaming", "the streaming engine: memory, time, exact gradients"),
    "sparse": BenchCommand("loupe.bench.sparse", "learning when the evidence is under 1% of the image, across seeds"),
}


def new_parser(prog: str, description: str | None = None) -> ArgumentParser:
    """A subcommand's parser: errors are raised (and become one line), not printed with the usage."""
    from jsonargparse import ArgumentParser

    return ArgumentParser(prog=prog, description=description, exit_on_error=False)


def split_bench_args(args: list[str]) -> tuple[str, list[str]]:
    """(subcommand, its arguments) of `loupe bench ARGS`; an unknown name is one message listing the known."""
    if not args or args[0].startswith("-"):
        return DEFAULT, args
    if args[0] not in BENCH_COMMANDS:
        raise ConfigError(f"unknown bench {args[0]!r}: choose one of {', '.join(BENCH_COMMANDS)}")
    return args[0], args[1:]


def run_bench_command(args: list[str]) -> int:
    """Parse and run `loupe bench [NAME] OPTIONS...`."""
    from loupe.config.parsing import parse_arguments

    name, rest = split_bench_args(args)
    module = BENCH_COMMANDS[name].load()
    prog = "loupe bench" if name == DEFAULT and (not args or args[0] != DEFAULT) else f"loupe bench {name}"
    return module.run_command(parse_arguments(module.build_parser(prog), rest))
