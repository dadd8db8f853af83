"""Every setting is validated when the config is parsed, before any slide is opened: a wrong-typed or out-of-range
value gives one message naming the key, the value and what is accepted (exit status 2, no traceback), and a setting
of another architecture's section is refused, not ignored."""

from __future__ import annotations

import contextlib
import dataclasses
import typing
from pathlib import Path

import pytest

from loupe.cli import main
from loupe.config import RULES, SECTION_TYPES, SECTIONS, Config, load_config

PRESETS = Path(__file__).resolve().parents[1] / "src" / "loupe" / "configs"
DEMO = PRESETS / "demo.yaml"

#: Values that fail each rule, by rule key (several per key where the rule has several edges).
OUT_OF_RANGE: dict[str, list[str]] = {
    "data.slide_mpp": ["0", "-0.5", "nan"],
    "data.tissue_min_fraction": ["-0.1", "1.5"],
    "data.folds": ["1", "0"],
    "data.fold": ["-1"],
    "data.batch_size": ["0", "-4"],
    "data.num_workers": ["-1"],
    "data.read_threads": ["0"],
    "data.val_fraction": ["-0.1", "1"],
    "data.test_fraction": ["1.2"],
    "data.max_failed_fraction": ["-0.01", "1.5", "nan"],
    "model.architecture": ["transmil"],
    "model.magnifications": ["[]"],
    "model.patch_backbone": ["no_such_net", " "],
    "model.patch_pretrained": ["/no/such/weights.pth"],
    "model.classifier_dropout": ["1", "-0.5"],
    "joint.patch_size": ["0", "-3", "4"],
    "joint.thumbnail_size": ["[0, 64]", "[64]"],
    "joint.thumbnail_backbone": ["resnet_9000"],
    "joint.thumbnail_pretrained": ["/no/such/weights.pth"],
    "joint.k": ["0", "-3"],
    "joint.attention_dropout": ["1", "-0.1"],
    "joint.entropy_alpha": ["-0.01", "inf"],
    "joint.uniform_mix": ["-0.1", "1.5"],
    "joint.train_draws": ["0", "-2"],
    "joint.novelty_epochs": ["-1"],
    "joint.novelty": ["-1", "nan"],
    "joint.inference_samples": ["0"],
    "joint.adaptive_epsilon": ["0", "-0.1", "nan"],
    "joint.adaptive_budget": ["0", "-5"],
    "gated_mil.patch_size": ["0"],
    "gated_mil.attention_hidden": ["0"],
    "gated_mil.attention_dropout": ["1"],
    "streamingclam.tile_size": ["0", "16"],
    "streamingclam.local_pool": ["0"],
    "streamingclam.attention_hidden": ["0"],
    "streamingclam.attention_dropout": ["1"],
    "streamingclam.instance_k": ["0"],
    "streamingclam.instance_weight": ["1.5"],
    "streamingclam.freeze_encoder_epochs": ["-1"],
    "streamingclam.k": ["0"],
    "streamingclam.max_image_in_memory_mb": ["-1"],
    "streamingclam.stem_tile": ["-1"],
    "streamingclam.stem_depth": ["0"],
    "train.epochs": ["0"],
    "train.lr": ["-1", "0", "nan"],
    "train.weight_decay": ["-1"],
    "train.lr_patience": ["-1"],
    "train.lr_factor": ["0", "1", "2"],
    "train.seed": ["-1"],
    "train.accelerator": ["tpu"],
    "train.precision": ["8-bit"],
    "train.devices": ["0", "-1"],
    "train.num_nodes": ["0"],
    "train.strategy": ["fsdp", "deepspeed"],
}

#: The architecture whose section a key's value must be tried under (the others are refused as unused).
ARCH_OF = {"joint": "joint", "gated_mil": "gated_mil", "streamingclam": "streamingclam"}


def _every_key() -> list[str]:
    return [f"{name}.{f.name}" for name, kind in SECTION_TYPES.items() for f in dataclasses.fields(kind)]


def _wrong_type(key: str) -> str | None:
    """A value of the wrong type for ``key`` (None: every string is of its type, e.g. a name)."""
    section, name = key.split(".")
    hints = typing.get_type_hints(SECTION_TYPES[section])
    kind = hints[name]
    args = typing.get_args(kind)
    if kind is bool or kind == (bool | None):
        return "maybe"
    if typing.get_origin(kind) is typing.Literal:
        return "nonsense"
    if kind in (int, float) or (args and set(args) <= {int, float, type(None)}):
        return "many"
    if typing.get_origin(kind) in (list, tuple) or (args and any(typing.get_origin(a) in (list, tuple) for a in args)):
        return "{not: a list}"
    return None


def _base_args(tmp_path: Path, key: str) -> list[str]:
    section = key.split(".")[0]
    arch = ARCH_OF.get(section, "joint")
    args = ["--config", str(DEMO), "--data.manifest", str(tmp_path / "never-read.csv"), "--out", str(tmp_path / "r")]
    if arch != "joint":  # the demo preset sets joint settings: start from the architecture's own preset
        preset = "bach_gated_mil.yaml" if arch == "gated_mil" else "camelyon16_streamingclam.yaml"
        args = ["--config", str(PRESETS / preset), *args[2:], "--model.patch_pretrained", "false"]
        if arch == "streamingclam":
            args += ["--model.patch_backbone", "tiny"]
    return args


def _run(capsys, args: list[str]) -> tuple[int, str]:
    try:
        code = main(["train", *args])
    except SystemExit as exc:
        code = exc.code if isinstance(exc.code, int) else 1
    return code, capsys.readouterr().err


def _assert_one_message(code: int, err: str, *needles: str) -> None:
    assert code == 2, err
    assert "Traceback" not in err, err
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1, err
    assert lines[0].startswith("loupe train: error: "), err
    for needle in needles:
        assert needle in lines[0], (needle, err)
    assert "never-read.csv" not in err  # nothing was opened: the settings failed first


def test_every_rule_names_an_existing_setting_and_has_out_of_range_values():
    keys = set(_every_key())
    assert set(RULES) <= keys
    assert set(OUT_OF_RANGE) == set(RULES)


@pytest.mark.parametrize(
    ("key", "value"), [(k, v) for k, values in OUT_OF_RANGE.items() for v in values], ids=lambda x: str(x)
)
def test_out_of_range_values_give_one_message(capsys, tmp_path: Path, key: str, value: str):
    code, err = _run(capsys, [*_base_args(tmp_path, key), f"--{key}", value])
    _assert_one_message(code, err, key)


@pytest.mark.parametrize("key", [k for k in _every_key() if _wrong_type(k) is not None])
def test_wrong_typed_values_give_one_message(capsys, tmp_path: Path, key: str):
    value = _wrong_type(key)
    assert value is not None
    code, err = _run(capsys, [*_base_args(tmp_path, key), f"--{key}", value])
    _assert_one_message(code, err, key)


@pytest.mark.parametrize(
    ("args", "needles"),
    [
        (["--joint.k", "0"], ["joint.k=0", "≥ 1"]),
        (["--joint.k", "-3"], ["joint.k=-3"]),
        (["--data.batch_size", "0"], ["data.batch_size=0", "≥ 1"]),
        (["--train.lr", "-1"], ["train.lr=-1", "> 0"]),
        (["--joint.patch_size", "0"], ["joint.patch_size=0"]),
        (["--joint.k", "x"], ["joint.k=x", "an integer"]),
        (["--model.architecture", "transmil"], ["model.architecture='transmil'", "joint, gated_mil, streamingclam"]),
        (["--data.fold", "5", "--data.folds", "5"], ["data.fold=5", "[0, 5)"]),
        (["--data.backend", "vips"], ["data.backend='vips'", "auto, openslide, tiffslide, image"]),
        (["--data.val_fraction", "0.6", "--data.test_fraction", "0.5"], ["data.val_fraction + data.test_fraction"]),
        (
            ["--joint.inference", "adaptive", "--joint.adaptive_budget", "3", "--joint.k", "5"],
            ["joint.adaptive_budget=3", "joint.k=5"],
        ),
    ],
)
def test_the_issue_examples(capsys, tmp_path: Path, args: list[str], needles: list[str]):
    code, err = _run(capsys, [*_base_args(tmp_path, "joint.k"), *args])
    _assert_one_message(code, err, *needles)


def test_a_setting_of_another_architecture_is_refused_even_at_its_default(capsys, tmp_path: Path):
    args = _base_args(tmp_path, "gated_mil.patch_size")
    code, err = _run(capsys, [*args, "--joint.k", "5"])  # 5 is the default, still not used by gated MIL
    _assert_one_message(code, err, "joint.k", "gated_mil")
    code, err = _run(capsys, [*_base_args(tmp_path, "joint.k"), "--streamingclam.tile_size", "64"])
    _assert_one_message(code, err, "streamingclam.tile_size", "model.architecture joint")


def test_unknown_keys_and_non_mapping_yaml_give_one_message(capsys, tmp_path: Path):
    code, err = _run(capsys, [*_base_args(tmp_path, "joint.k"), "--joint.n_patches", "3"])
    _assert_one_message(code, err, "n_patches")
    bad = tmp_path / "list.yaml"
    bad.write_text("- 1\n- 2\n")
    code, err = _run(capsys, ["--config", str(bad), "--out", str(tmp_path / "r")])
    assert code == 2 and "Traceback" not in err and len(err.strip().splitlines()) == 1, err


def test_the_python_api_validates_too():
    from loupe.config import GatedMILConfig, JointConfig, ModelConfig
    from loupe.errors import ConfigError

    with pytest.raises(ConfigError, match=r"joint\.k=0: expected an integer ≥ 1"):
        Config(joint=JointConfig(k=0))
    with pytest.raises(ConfigError, match=r"gated_mil\.patch_size: not used by model\.architecture joint"):
        Config(gated_mil=GatedMILConfig(patch_size=64))
    with pytest.raises(ConfigError, match=r"model\.magnification_labels"):
        Config(model=ModelConfig(magnifications=["1.0"], magnification_labels=["a", "b"]))


@pytest.mark.parametrize("path", sorted(PRESETS.glob("*.yaml")), ids=lambda p: p.stem)
def test_a_run_config_holds_only_its_architecture_section(path: Path, tmp_path: Path):
    from loupe.config import dump_config

    cfg = load_config(path)
    text = dump_config(cfg)
    for name in SECTIONS:
        assert (f"\n{name}:" in "\n" + text) == (name == cfg.model.architecture), name


def test_a_printed_config_trains_as_it_was_printed(capsys, tmp_path: Path):
    """`--print_config` writes every section; read back, the other architectures' sections at their defaults are not
    settings the user made, so they are accepted; a changed value among them is still refused."""
    args = _base_args(tmp_path, "gated_mil.patch_size")
    with contextlib.suppress(SystemExit):  # jsonargparse exits after printing
        main(["train", *args, "--print_config"])
    printed = tmp_path / "printed.yaml"
    printed.write_text(capsys.readouterr().out)
    assert "joint:" in printed.read_text() and "streamingclam:" in printed.read_text()
    code, err = _run(capsys, ["--config", str(printed), "--out", str(tmp_path / "r")])
    assert code == 2 and "never-read.csv" in err, err  # the settings passed: the (missing) manifest is read next
    code, err = _run(capsys, ["--config", str(printed), "--out", str(tmp_path / "r"), "--joint.k", "7"])
    _assert_one_message(code, err, "joint.k:", "gated_mil")
    assert "joint.replace" not in err


def test_registry_encoders_take_weights_from_a_file_and_are_not_streamed():
    """Checked by the models layer, which knows the networks, before anything is built or read."""
    from loupe.config import JointConfig, ModelConfig
    from loupe.errors import ConfigError
    from loupe.models import build_model, check_config

    with pytest.raises(ConfigError, match="never downloads"):
        check_config(Config(model=ModelConfig(patch_backbone="uni", patch_pretrained=True)))
    with pytest.raises(ConfigError, match=r"joint\.thumbnail_pretrained.*never downloads"):
        check_config(Config(joint=JointConfig(thumbnail_backbone="conch", thumbnail_pretrained=True)))
    streamed = Config(model=ModelConfig(architecture="streamingclam", magnifications=["0.5"], patch_backbone="uni"))
    with pytest.raises(ConfigError, match="streams a convolutional trunk"):
        check_config(streamed)
    with pytest.raises(ConfigError, match="streams a convolutional trunk"):
        build_model(streamed, 2)  # building checks first
    with pytest.raises(ConfigError, match=r"model\.patch_backbone='no_such_net'"):
        check_config(Config(model=ModelConfig(patch_backbone="no_such_net")))
    assert check_config(Config()) == Config()


def test_a_registry_thumbnail_network_fits_the_attention_to_its_feature_map():
    """CONCH's embedding (512) is not its feature map's width (768): A is sized by the map."""
    import torch

    from loupe.config import JointConfig
    from loupe.models import JointAttentionSampler, build_model

    with torch.device("meta"):
        model = build_model(Config(joint=JointConfig(thumbnail_backbone="conch")), 2)
    assert isinstance(model, JointAttentionSampler)
    assert model.attention.heads[0].in_channels == model.thumbnail_net.map_channels == 768
