"""`loupe bench` on tiny generated images: the table's keys and layout, positive timings, a profile whose parts
add up to its total, the accuracy comparison's table, and the CLI (including the streaming sub-command's wiring).
Speed itself is measured by the bench, never asserted here."""

from __future__ import annotations

import json
import sys
import types
from pathlib import Path

import pytest

from loupe.bench import run_accuracy, run_bench
from loupe.bench.commands import BENCH_COMMANDS, new_parser
from loupe.bench.data import Geometry, generate_images, geometry_config
from loupe.bench.speed import Variant, variants
from loupe.cli import main
from loupe.config import dump_config, load_config
from loupe.slides import open_slide

TINY = Geometry(
    width=160, height=128, mpp=0.5, magnifications=("2.0", "1.0", "0.5"), labels=("5x", "10x", "20x"),
    patch_size=32, thumbnail_size=(40, 32), k=3, classes=("a", "b"),
)  # fmt: skip
SINGLES = ("5x", "10x", "20x")


@pytest.fixture(scope="module")
def bench(tmp_path_factory) -> tuple[Path, dict]:
    out = tmp_path_factory.mktemp("bench")
    result = run_bench(out=out, n_train=2, n_test=2, repeats=2, geometry=TINY, batch_size=2, log=lambda *_: None)
    return out, result


def test_generated_images_are_real_files_with_the_geometry_and_resolution(tmp_path: Path):
    manifest = generate_images(tmp_path, 1, 1, TINY)
    rows = manifest.read_text().splitlines()
    assert rows[0] == "slide_id,path,label,split" and len(rows) == 4  # train, val, test
    with open_slide(tmp_path / "images" / "train_000.tif") as slide:
        assert slide.dimensions == (160, 128) and slide.mpp == pytest.approx(0.5)


def test_variants_narrow_the_config_to_their_magnifications():
    cfg = geometry_config(Path("m.csv"), TINY)
    names = [(v.name, v.all_patches) for v in variants(cfg)]
    assert names == [(m, a) for m in SINGLES for a in (False, True)] + [("joint", False), ("joint", True)]
    one = Variant("10x", (1,), True).config(cfg)
    assert one.model.magnifications == ["1.0"] and one.model.magnification_labels == ["10x"]
    assert one.joint.estimator == "exhaustive"


@pytest.mark.slow
def test_bench_writes_the_table_ratios_and_profile(bench):
    out, result = bench
    saved = json.loads((out / "bench.json").read_text())
    assert saved["ratios"] == pytest.approx(result["ratios"])
    train, infer = saved["train_s_per_epoch"], saved["infer_ms_per_image"]
    for name in SINGLES:
        assert train[name]["k"] > 0 and train[name]["all"] > 0
        assert infer[name]["k"] > 0 and infer[name]["all"] > 0
    assert train["combined"]["k"] == pytest.approx(sum(train[m]["k"] for m in SINGLES))
    assert train["joint"]["k"] > 0 and infer["joint"]["k"] > 0 and infer["joint"]["all"] > 0
    r = saved["ratios"]
    assert r["train_combined_over_joint"] == pytest.approx(train["combined"]["k"] / train["joint"]["k"])
    assert r["infer_all_over_joint"] == pytest.approx(infer["joint"]["all"] / infer["joint"]["k"])
    assert all(len(v) == 2 for v in saved["raw"].values())  # every figure is a median of the repeats
    s = saved["settings"]
    assert s["cells"] == 2 + 6 + 20 and s["grids"] == "2×1, 3×2, 5×4"  # 160×128 px at 4, 2 and 1 px per px
    md = (out / "bench.md").read_text()
    assert "| joint (ours) |" in md and "| combined |" in md and "all patches ÷ joint" in md


@pytest.mark.slow
def test_profile_parts_add_up_to_the_total(bench):
    _, result = bench
    for key in ("train_step", "inference"):
        prof = result["profile"][key]
        parts = prof["parts_ms"]
        assert set(parts) == {"slide_reading", "thumbnail_backbone", "patch_backbone", "sampling_attention", "other"}
        assert sum(parts.values()) == pytest.approx(prof["total_ms"])
        assert parts["slide_reading"] > 0 and parts["thumbnail_backbone"] > 0 and parts["patch_backbone"] > 0
    detail = result["profile"]["train_step"]["detail_ms"]
    assert detail["thumbnail_backward"] > 0 and detail["patch_backward"] > 0


def _tiny_config(tmp_path: Path) -> Path:
    manifest = generate_images(tmp_path / "data", 2, 2, TINY)
    path = tmp_path / "tiny.yaml"
    path.write_text(dump_config(geometry_config(manifest, TINY, batch_size=2)))
    return path


@pytest.mark.slow
def test_accuracy_mode_trains_every_model_on_the_same_splits(tmp_path: Path):
    config = _tiny_config(tmp_path)
    result = run_accuracy(out=tmp_path / "acc", config=config, epochs=1, log=lambda *_: None)
    names = [row["name"] for row in result["models"]]
    assert names == ["joint", "single 5x", "single 10x", "single 20x", "all patches", "gated MIL 20x"]
    assert all(row["metrics"]["n"] == result["n_test"] for row in result["models"])
    c = result["comparison"]
    assert c["joint_minus_best_single"] == pytest.approx(
        result["models"][0]["metrics"]["accuracy"] - max(r["metrics"]["accuracy"] for r in result["models"][1:4])
    )
    assert "| gated MIL 20x |" in (tmp_path / "acc" / "accuracy.md").read_text()


@pytest.mark.slow
def test_cli_bench_runs_a_config_and_dispatches_streaming(tmp_path: Path, monkeypatch, capsys):
    config = _tiny_config(tmp_path)
    assert load_config(config).joint.patch_size == 32
    args = ["--repeats", "1", "--train-images", "2", "--test-images", "1"]
    assert main(["bench", "--config", str(config), "--out", str(tmp_path / "out"), *args]) == 0
    assert "inference all patches ÷ joint" in capsys.readouterr().out
    assert json.loads((tmp_path / "out" / "bench.json").read_text())["settings"]["n_test"] == 1

    seen = []
    fake = types.ModuleType("loupe.bench.streaming")

    def build_parser(prog):
        parser = new_parser(prog)
        parser.add_argument("--tiles", type=int, required=True)
        return parser

    fake.build_parser = build_parser
    fake.run_command = lambda ns: seen.append(ns.tiles) or 0
    monkeypatch.setitem(sys.modules, "loupe.bench.streaming", fake)
    assert main(["bench", "streaming", "--tiles", "2"]) == 0
    assert seen == [2]


@pytest.mark.parametrize("name", sorted(BENCH_COMMANDS))
def test_every_bench_subcommand_has_its_parser_and_runner_and_lists_its_options(name: str, capsys):
    module = BENCH_COMMANDS[name].load()
    assert callable(module.run_command)
    with pytest.raises(SystemExit) as done:
        main(["bench", name, "--help"])
    assert done.value.code == 0
    assert "--out" in capsys.readouterr().out


@pytest.mark.parametrize(
    ("args", "needles"),
    [
        (["nope", "--out", "x"], ["unknown bench 'nope'", ", ".join(BENCH_COMMANDS)]),
        (["wsi", "--out", "x", "--k", "many"], ["k=many", "integer"]),
        (["sparse", "--out", "x", "--seeds"], ["--seeds"]),
        (["streaming", "--out", "x"], ["required", "size"]),
        (["--out", "x", "--repeats", "two"], ["repeats=two"]),
    ],
)
def test_bad_bench_options_are_one_line_and_exit_status_2(args: list[str], needles: list[str], capsys):
    assert main(["bench", *args]) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1, err
    for needle in needles:
        assert needle in err, err
