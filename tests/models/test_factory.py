"""The architecture registry is the one place that knows architectures: every settings section has an entry, each
model is built from its section with the section's defaults, and no code outside asks an architecture's name."""

from __future__ import annotations

import ast
import dataclasses
import inspect
from pathlib import Path

import pytest
import torch

from loupe.config import SECTIONS, Config, GatedMILConfig, JointConfig, ModelConfig, StreamingCLAMConfig
from loupe.errors import ConfigError
from loupe.models import ARCHITECTURES, architecture, build_model, resolve_inference
from loupe.models.gated_mil import GatedAttentionMIL
from loupe.models.joint import JointAttentionSampler
from loupe.models.streamingclam import StreamingCLAM

PACKAGE = Path(__file__).resolve().parents[2] / "src" / "loupe"
#: Constructor parameters that mean a setting of another name.
RENAMED = {"instance_classifiers": "instance_loss", "freeze_patch_net": "freeze_patch_backbone",
           "freeze_trunk": "freeze_patch_backbone"}  # fmt: skip
MODELS = [
    (JointAttentionSampler, JointConfig),
    (GatedAttentionMIL, GatedMILConfig),
    (StreamingCLAM, StreamingCLAMConfig),
]


def test_every_settings_section_has_one_entry_and_back():
    assert set(ARCHITECTURES) == set(SECTIONS)
    for name, entry in ARCHITECTURES.items():
        assert entry.settings is SECTIONS[name] and entry.name == name


@pytest.mark.parametrize(("model", "section"), MODELS, ids=lambda x: getattr(x, "__name__", ""))
def test_constructor_defaults_are_the_settings_defaults(model: type, section: type):
    defaults = {f.name: f.default for f in dataclasses.fields(section)} | {
        f.name: f.default for f in dataclasses.fields(ModelConfig) if f.default is not dataclasses.MISSING
    }
    checked = 0
    for name, parameter in inspect.signature(model.__init__).parameters.items():
        if name == "inference":  # InferenceSettings, not the mode: its default is made of the settings' defaults
            continue
        setting = RENAMED.get(name, name)
        if setting in defaults and parameter.default is not inspect.Parameter.empty:
            assert parameter.default == defaults[setting], (model.__name__, name)
            checked += 1
    assert checked >= 3


@pytest.mark.parametrize(
    "cfg",
    [
        Config(joint=JointConfig(k=7, uniform_mix=0.25, train_draws=2)),
        Config(
            model=ModelConfig(architecture="gated_mil", magnifications=["1.0"]),
            gated_mil=GatedMILConfig(attention_hidden=16),
        ),
        Config(
            model=ModelConfig(architecture="streamingclam", magnifications=["1.0"]),
            streamingclam=StreamingCLAMConfig(tile_size=256, k=3),
        ),
    ],
    ids=lambda c: c.model.architecture,
)
def test_each_model_is_built_from_its_settings_section(cfg: Config):
    with torch.device("meta"):
        model = build_model(cfg, 3)
    assert isinstance(model, dict(MODELS_BY_SECTION)[type(cfg.section())])
    assert model.default_inference() == architecture(cfg).inference(cfg)
    section = cfg.section()
    if isinstance(section, JointConfig):
        assert isinstance(model, JointAttentionSampler)
        assert (model.k, model.uniform_mix, model.train_draws) == (7, 0.25, 2)
    if isinstance(section, StreamingCLAMConfig):
        assert isinstance(model, StreamingCLAM) and model.k == 3 and model.patch_network() is None
    else:
        assert model.patch_network() is not None


MODELS_BY_SECTION = [(section, model) for model, section in MODELS]


def test_inference_options_follow_what_the_entry_declares():
    joint, gated = Config(), Config(model=ModelConfig(architecture="gated_mil", magnifications=["1.0"]))
    assert resolve_inference(joint, "mean", 3, 4).samples == 3
    with pytest.raises(ConfigError, match=r"--samples: not used by model\.architecture gated_mil"):
        resolve_inference(gated, samples=2)
    with pytest.raises(ConfigError, match=r"--k: not used by model\.architecture gated_mil"):
        resolve_inference(gated, k=2)
    with pytest.raises(ConfigError, match=r"--inference topk: model\.architecture gated_mil accepts exhaustive"):
        resolve_inference(gated, "topk")


def _architecture_name_checks(path: Path) -> list[str]:
    """Comparisons of ``….architecture`` with something (``cfg.model.architecture == "joint"`` and the like)."""
    found = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Compare):
            sides = [node.left, *node.comparators]
            if any(isinstance(s, ast.Attribute) and s.attr == "architecture" for s in sides):
                found.append(f"{path.relative_to(PACKAGE)}:{node.lineno}")
    return found


def test_no_code_outside_the_settings_and_the_registry_compares_architecture_names():
    allowed = {PACKAGE / "config" / "run.py", PACKAGE / "config" / "parsing.py"}  # the section of the named one
    found = [hit for p in sorted(PACKAGE.rglob("*.py")) if p not in allowed for hit in _architecture_name_checks(p)]
    assert found == []
