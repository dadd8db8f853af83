"""How adaptive inference is asked for: ``joint.inference: adaptive`` with ``joint.adaptive_epsilon`` and
``joint.adaptive_budget``, or ``--inference adaptive --epsilon E --budget B`` on evaluate and predict."""

from __future__ import annotations

import dataclasses

import pytest

from loupe.cli import _evaluate_parser, _predict_parser
from loupe.config import Config, JointConfig, ModelConfig
from loupe.config.run import validate_config
from loupe.errors import ConfigError
from loupe.models import resolve_inference
from loupe.models.joint import inference_settings


def test_the_run_settings_and_the_options_resolve_into_the_inference_settings():
    cfg = Config(joint=JointConfig(inference="adaptive", adaptive_epsilon=0.05, adaptive_budget=25))
    assert inference_settings(cfg.joint).record() == {
        "mode": "adaptive", "samples": 1, "k": 5, "epsilon": 0.05, "budget": 25,
    }  # fmt: skip
    settings = resolve_inference(cfg, k=4, epsilon=0.01, budget=12)
    assert (settings.mode, settings.k, settings.epsilon, settings.budget) == ("adaptive", 4, 0.01, 12)
    assert resolve_inference(Config(), "mean").record() == {"mode": "mean", "samples": 8, "k": 5}  # as before


@pytest.mark.parametrize(
    ("kwargs", "needle"),
    [
        ({"mode": "adaptive", "budget": 4}, "--budget 4: expected at least k = 5"),
        ({"mode": "adaptive", "epsilon": 0.0}, "--epsilon 0.0: expected a number > 0"),
        ({"mode": "adaptive", "budget": 0}, "--budget 0: expected an integer ≥ 1"),
    ],
)
def test_bad_adaptive_options_give_one_message(kwargs, needle):
    with pytest.raises(ConfigError, match=needle):
        resolve_inference(Config(), **kwargs)


def test_adaptive_is_refused_where_it_cannot_run():
    gated = Config(model=ModelConfig(architecture="gated_mil", magnifications=["1.0"]))
    with pytest.raises(ConfigError, match=r"--epsilon: not used by model\.architecture gated_mil"):
        resolve_inference(gated, epsilon=0.1)
    with pytest.raises(ConfigError, match="accepts exhaustive"):
        resolve_inference(gated, "adaptive")
    with pytest.raises(ConfigError, match=r"joint\.adaptive_budget=2"):
        validate_config(dataclasses.replace(Config(), joint=JointConfig(inference="adaptive", adaptive_budget=2)))


@pytest.mark.parametrize("parser", [_evaluate_parser, _predict_parser])
def test_evaluate_and_predict_take_epsilon_and_budget(parser):
    extra = ["slide.svs", "--out", "o"] if parser is _predict_parser else []
    ns = parser("loupe").parse_args(["run", *extra, "--inference", "adaptive", "--epsilon", "0.03", "--budget", "30"])
    assert (ns.inference, ns.epsilon, ns.budget) == ("adaptive", 0.03, 30)
