"""The command line: bad inputs give one clear message (file + fix) and no traceback, before any training."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from loupe.cli import main
from loupe.datasets.synthetic import write_tiff

PRESETS = Path(__file__).resolve().parents[1] / "src" / "loupe" / "configs"


@dataclass
class Result:
    returncode: int
    stdout: str
    stderr: str


@pytest.fixture
def loupe(capsys):
    """Run the CLI in-process (as the console script would) and capture what it printed."""

    def run(*args: str) -> Result:
        try:
            code = main(list(args))
        except SystemExit as exc:  # jsonargparse's usage errors
            code = exc.code if isinstance(exc.code, int) else 1
        out = capsys.readouterr()
        return Result(code, out.out, out.err)

    return run


def _slide(path: Path, size: int = 256, mpp: float | None = 0.5) -> Path:
    img = np.random.default_rng(0).integers(0, 255, (size, size, 3), dtype=np.uint8)
    if mpp is None:
        Image.fromarray(img).save(path)
    else:
        write_tiff(path, img, mpp)
    return path


def _manifest(folder: Path, rows: list[tuple[str, str, str]]) -> Path:
    path = folder / "manifest.csv"
    path.write_text("path,label,split\n" + "".join(f"{p},{lab},{s}\n" for p, lab, s in rows))
    return path


def _good_rows(folder: Path) -> list[tuple[str, str, str]]:
    rows = []
    for i, (lab, split) in enumerate([("a", "train"), ("b", "train"), ("a", "val"), ("b", "val")]):
        _slide(folder / f"ok{i}.tif")
        rows.append((f"ok{i}.tif", lab, split))
    return rows


def _train(loupe, manifest: Path, tmp_path: Path, *extra: str) -> Result:
    return loupe(
        "train",
        str(PRESETS / "demo.yaml"),
        "--data.manifest",
        str(manifest),
        "--out",
        str(tmp_path / "run"),
        "--train.epochs",
        "1",
        *extra,
    )


def _assert_clean_error(res: Result, *needles: str) -> None:
    assert res.returncode != 0
    assert "Traceback" not in res.stderr, res.stderr
    for needle in needles:
        assert needle in res.stderr, (needle, res.stderr)


def test_all_missing_files_are_listed_before_training(loupe, tmp_path: Path):
    rows = [*_good_rows(tmp_path), ("gone1.tif", "a", "train"), ("sub/gone2.svs", "b", "test")]
    res = _train(loupe, _manifest(tmp_path, rows), tmp_path)
    _assert_clean_error(res, "gone1.tif", "gone2.svs", "manifest.csv")
    assert not (tmp_path / "run" / "checkpoints").exists()


def test_unknown_label(loupe, tmp_path: Path):
    rows = [*_good_rows(tmp_path), ("ok0.tif", "tumour", "test")]
    res = _train(loupe, _manifest(tmp_path, rows), tmp_path, "--data.classes", "[a, b]")
    _assert_clean_error(res, "tumour")


def test_unreadable_slide(loupe, tmp_path: Path):
    (tmp_path / "corrupt.svs").write_bytes(b"\x00garbage" * 500)
    rows = [*_good_rows(tmp_path), ("corrupt.svs", "a", "test")]
    res = _train(loupe, _manifest(tmp_path, rows), tmp_path)
    _assert_clean_error(res, "corrupt.svs")


def test_missing_resolution_names_the_slide_and_the_option(loupe, tmp_path: Path):
    _slide(tmp_path / "nompp.png", mpp=None)
    rows = [*_good_rows(tmp_path), ("nompp.png", "a", "test")]
    res = _train(loupe, _manifest(tmp_path, rows), tmp_path)
    _assert_clean_error(res, "nompp.png", "--slide-mpp")


def test_image_smaller_than_a_patch(loupe, tmp_path: Path):
    _slide(tmp_path / "tiny.tif", size=40)
    rows = [*_good_rows(tmp_path), ("tiny.tif", "b", "test")]
    res = _train(loupe, _manifest(tmp_path, rows), tmp_path)
    _assert_clean_error(res, "tiny.tif", "patch")


def test_config_key_that_does_not_exist(loupe, tmp_path: Path):
    cfg = tmp_path / "bad.yaml"
    cfg.write_text("joint:\n  k: 5\n  n_patches: 10\n")
    res = loupe("train", str(cfg), "--out", str(tmp_path / "run"))
    _assert_clean_error(res, "n_patches")


def test_info_on_a_real_slide_with_a_config(loupe, slides_dir: Path):
    res = loupe("info", str(slides_dir / "cmu-1-small-region-pyramid.svs"), "--config", str(PRESETS / "demo.yaml"))
    assert res.returncode == 0, res.stderr
    assert "aperio" in res.stdout.lower() and "0.499" in res.stdout


@pytest.mark.parametrize("command", ["evaluate", "predict"])
def test_not_a_run_folder(loupe, tmp_path: Path, command: str):
    args = [command, str(tmp_path)] + (["x.svs", "--out", str(tmp_path / "o")] if command == "predict" else [])
    _assert_clean_error(loupe(*args), "not a loupe run folder")


def test_info_reports_a_broken_slide_and_still_describes_the_others(loupe, slides_dir: Path, tmp_path: Path):
    broken = tmp_path / "broken.svs"
    broken.write_bytes(b"\x00garbage" * 100)
    res = loupe("info", str(broken), str(slides_dir / "cmu-1-small-region.svs"))
    _assert_clean_error(res, "broken.svs")
    assert "cmu-1-small-region.svs" in res.stdout


def test_import_bach_writes_a_manifest(loupe, tmp_path: Path):
    photos = tmp_path / "ICIAR2018_BACH_Challenge" / "Photos"
    lines = []
    for cls, prefix in [("Normal", "n"), ("Benign", "b"), ("InSitu", "is"), ("Invasive", "iv")]:
        (photos / cls).mkdir(parents=True)
        for i in range(2):
            Image.fromarray(np.full((48, 64, 3), 200, np.uint8)).save(photos / cls / f"{prefix}00{i}.tif")
            lines.append(f"{prefix}00{i}.tif,{cls}")
    (photos / "microscopy_ground_truth.csv").write_text("\n".join(lines) + "\n")
    res = loupe("import-bach", str(tmp_path / "ICIAR2018_BACH_Challenge"), "--out", str(tmp_path / "bach.csv"))
    assert res.returncode == 0, res.stderr
    assert "8 images" in res.stdout and "0.42" in res.stdout
    rows = (tmp_path / "bach.csv").read_text().splitlines()
    assert len(rows) == 9 and "mpp" in rows[0]
    bad = loupe("import-bach", str(tmp_path / "nowhere"), "--out", str(tmp_path / "x.csv"))
    _assert_clean_error(bad, "nowhere")


@pytest.mark.slow  # a fresh Python importing Lightning: ~5 s
def test_the_console_prints_each_lightning_message_once_and_no_advertisement():
    """In a fresh process (as `loupe train` starts): Lightning, imported after the console is set up, must not print
    its messages a second time through handlers of its own."""
    import subprocess
    import sys

    code = (
        "import logging\n"
        "from loupe.console import configure_console\n"
        "configure_console()\n"
        "import lightning.pytorch\n"
        "log = logging.getLogger('lightning.pytorch.utilities.rank_zero')\n"
        "log.info('GPU available: False, used: False')\n"
        "log.info('💡 Tip: try installing [litlogger]')\n"
    )
    err = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stderr
    assert err.count("GPU available") == 1 and "loupe: GPU available" in err, err
    assert "litlogger" not in err, err


def test_train_help_documents_every_setting_with_its_docstring(loupe):
    """`loupe train --help` shows each setting's attribute docstring (what the README promises)."""
    result = loupe("train", "--help")
    assert result.returncode == 0
    text = " ".join(result.stdout.split())
    assert "--train.devices" in text and "one training process each" in text
    assert "Training draws come from" in text  # joint.uniform_mix's docstring
