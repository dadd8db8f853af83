"""The package's layers depend one way (docs/ARCHITECTURE.md): each subpackage imports only the layers below it."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "src" / "loupe"

#: What each part may import (besides itself). Read from the bottom: errors/atomic/ranks/console, slides, config,
#: models, data/reports, datasets (generators and importers over data), training, workflows, bench, then the command
#: line.
ALLOWED: dict[str, set[str]] = {
    "errors": set(),
    "atomic": set(),
    "ranks": set(),
    "slides": {"errors", "atomic"},
    "config": {"errors"},  # + lazily, inside its validators: slides (magnification notation), models (backbones)
    "models": {"errors", "config"},
    "reports": {"errors", "atomic", "slides"},
    "data": {"errors", "atomic", "ranks", "slides", "config", "models"},
    "datasets": {"errors", "atomic", "slides", "data"},
    "training": {"errors", "atomic", "ranks", "console", "config", "models", "data"},
    "workflows": {
        "errors",
        "atomic",
        "ranks",
        "console",
        "slides",
        "config",
        "models",
        "data",
        "datasets",
        "reports",
        "training",
    },
    "bench": {
        "errors",
        "atomic",
        "console",
        "slides",
        "config",
        "models",
        "data",
        "datasets",
        "reports",
        "training",
        "workflows",
    },
    "viewer": {"errors", "slides"},  # reads predict's files by name: no torch, no workflows
    "console": set(),
    "cli": {
        "__version__",
        "errors",
        "ranks",
        "config",
        "console",
        "slides",
        "models",
        "data",
        "datasets",
        "workflows",
        "bench",
        "viewer",
    },
    "__main__": {"cli"},
}
#: Imports allowed only inside functions (never at module level): config's validators read the lower layers'
#: registries without making the settings module import them (or torch).
LAZY_ONLY = {"config": {"slides", "models"}}


def _part(path: Path) -> str:
    rel = path.relative_to(PACKAGE)
    return rel.parts[0] if len(rel.parts) > 1 else rel.stem


def _imports(path: Path) -> list[tuple[str, bool]]:
    """(imported loupe part, at module level?) for every loupe import of a file."""
    tree = ast.parse(path.read_text())
    top_level = {id(node) for node in tree.body}
    found = []
    for node in ast.walk(tree):
        names: list[str] = []
        if isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] == "loupe":
            parts = node.module.split(".")
            names = [parts[1]] if len(parts) > 1 else [a.name for a in node.names]
        elif isinstance(node, ast.Import):
            names = [a.name.split(".")[1] for a in node.names if a.name.startswith("loupe.")]
        found += [(name, id(node) in top_level) for name in names]
    return found


FILES = sorted(p for p in PACKAGE.rglob("*.py") if p.name != "__init__.py" or p.parent != PACKAGE)


@pytest.mark.parametrize("path", FILES, ids=lambda p: str(p.relative_to(PACKAGE)))
def test_imports_go_one_way(path: Path):
    part = _part(path)
    assert part in ALLOWED, f"{part}: a new part of the package; give it a place in ALLOWED and the map"
    for name, top in _imports(path):
        if name == part:
            continue
        lazy = LAZY_ONLY.get(part, set())
        assert name in ALLOWED[part] or (name in lazy and not top), f"{path.name} imports loupe.{name}"
