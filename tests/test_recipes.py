"""The recipes of docs/ARCHITECTURE.md ("Where new things go"), done: a new encoder family, reader backend, command
and bench subcommand each added exactly where the recipe says, and nowhere else, then used through the public path.
(The architecture recipe is checked by ``tests/models/test_factory.py``.)"""

from __future__ import annotations

import dataclasses
import sys
import types
from pathlib import Path

import numpy as np
import pytest
import timm
import torch
from PIL import Image

from loupe import cli
from loupe.bench import commands as bench_commands
from loupe.config import Config, DataConfig, ModelConfig
from loupe.models import build_model, check_config, create_backbone
from loupe.models import encoders as encoder_registry
from loupe.slides import formats, open_slide
from loupe.slides import open as opener
from loupe.slides.image_reader import ImageReader


def test_a_new_encoder_is_one_registry_entry(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """One ``EncoderSpec`` in ``ENCODERS``: the settings accept its name, it loads its published file, and a run
    builds with it as the patch network."""
    spec = dataclasses.replace(
        encoder_registry.ENCODERS["uni"],
        name="Tiny-ViT (recipe)",
        timm_model="vit_tiny_patch16_224",
        timm_kwargs={"img_size": 32, "patch_size": 16, "depth": 1, "num_classes": 0, "dynamic_img_size": True},
        input_size=32,
        embed_dim=192,
        weights_file="tiny_vit.pth",
    )
    monkeypatch.setitem(encoder_registry.ENCODERS, "tiny-vit-recipe", spec)
    net = timm.create_model(spec.timm_model, pretrained=False, **spec.timm_kwargs)
    weights = tmp_path / spec.weights_file
    torch.save(net.state_dict(), weights)

    cfg = check_config(Config(model=ModelConfig(patch_backbone="tiny-vit-recipe", patch_pretrained=str(weights))))
    encoder = create_backbone("tiny-vit-recipe", pretrained=str(weights))
    assert encoder.num_features == 192
    assert torch.equal(encoder.state_dict()["net.cls_token"], net.state_dict()["cls_token"])
    assert build_model(cfg, n_classes=2).patch_network() is not None


class _FlippedImageReader(ImageReader):
    """A 'new format': an image stored mirrored left to right."""

    @property
    def vendor(self) -> str:
        return "flipped"

    def _decode(self) -> np.ndarray:
        return np.ascontiguousarray(super()._decode()[:, ::-1])


def test_a_new_reader_backend_is_a_reader_one_entry_and_its_name(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A ``SlideReader``, one entry in ``slides/open.py:READERS`` and its name in ``slides/formats.py:BACKENDS``:
    the opener, the settings and the command line take it."""
    image = tmp_path / "slide.png"
    Image.fromarray(np.full((64, 96, 3), 200, np.uint8)).save(image)
    monkeypatch.setitem(opener.READERS, "flipped", _FlippedImageReader)
    monkeypatch.setattr(formats, "BACKENDS", (*formats.BACKENDS, "flipped"))

    reader = open_slide(image, backend="flipped", mpp=0.5)
    assert isinstance(reader, _FlippedImageReader) and reader.level_dimensions[0] == (96, 64)
    assert reader.vendor == "flipped"
    reader.close()
    assert Config(data=DataConfig(backend="flipped")).data.backend == "flipped"
    assert cli.main(["info", str(image), "--backend", "flipped", "--slide-mpp", "0.5"]) == 0


def test_the_backend_list_names_every_reader() -> None:
    assert ("auto", *opener.READERS) == formats.BACKENDS


def test_a_new_command_is_one_table_entry(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    """One ``Command`` in ``cli.py:COMMANDS`` over a keyword-only function: parsed like every command (bad options
    one line, exit status 2) and listed by ``loupe --help``."""
    seen: list[int] = []

    def parser(prog: str):
        p = cli._parser(prog)
        p.add_argument("--count", type=int, required=True)
        return p

    def run(ns, args: list[str]) -> int:
        seen.append(ns.count)
        return 0

    command = cli.Command("count things (recipe)", "count --count N", parser, run)
    monkeypatch.setitem(cli.COMMANDS, "count", command)
    assert cli.main(["count", "--count", "3"]) == 0 and seen == [3]
    assert cli.main(["count", "--count", "three"]) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err
    assert "loupe count --count N" in cli.usage()


def test_a_new_bench_is_one_module_and_one_table_entry(monkeypatch: pytest.MonkeyPatch) -> None:
    """A module with ``build_parser`` and ``run_command`` and one ``BenchCommand`` in ``bench/commands.py``."""
    module = types.ModuleType("loupe_recipe_bench")
    ran: list[str] = []

    def build_parser(prog: str):
        p = bench_commands.new_parser(prog)
        p.add_argument("--out", required=True)
        return p

    module.build_parser = build_parser  # type: ignore[attr-defined]
    module.run_command = lambda ns: ran.append(ns.out) or 0  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "loupe_recipe_bench", module)
    monkeypatch.setitem(bench_commands.BENCH_COMMANDS, "recipe", bench_commands.BenchCommand("loupe_recipe_bench", "x"))
    assert cli.main(["bench", "recipe", "--out", "somewhere"]) == 0 and ran == ["somewhere"]
    assert cli.main(["bench", "recipe"]) == 2
