"""An output folder that cannot be written (under /proc, under a file, read-only) is one message naming it and the
fix, exit status 2, before any work: for every command that takes --out."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from loupe.cli import main
from loupe.errors import OutputError, prepare_output_folder

PRESETS = Path(__file__).resolve().parents[1] / "src" / "loupe" / "configs"


def _commands(out: Path, tmp_path: Path) -> dict[str, list[str]]:
    """Each command with --out ``out``; the run and the slides need not exist: the folder is checked first."""
    run, slide = str(tmp_path / "no-run"), str(tmp_path / "no-slide.tif")
    return {
        "predict": ["predict", run, slide, "--out", str(out), "--workers", "0"],
        "evaluate": ["evaluate", run, "--out", str(out)],
        "train": ["train", str(PRESETS / "demo.yaml"), "--out", str(out)],
        "demo": ["demo", "--out", str(out)],
    }


def _blocked(kind: str, tmp_path: Path) -> Path:
    """An output path no one (not even root) can create or write."""
    if kind == "proc":
        return Path("/proc/loupe-test-out")
    blocker = tmp_path / "a-file"
    blocker.write_text("a file where a folder should be")
    return blocker / "out" if kind == "under-a-file" else blocker


@pytest.mark.parametrize("command", ["predict", "evaluate", "train", "demo"])
@pytest.mark.parametrize("kind", ["proc", "under-a-file", "a-file"])
def test_an_unwritable_output_folder_is_one_line_and_status_2(
    command: str, kind: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = _blocked(kind, tmp_path)
    status = main(_commands(out, tmp_path)[command])
    err = capsys.readouterr().err
    assert status == 2, err
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1, err
    assert err.startswith(f"loupe {command}: error: ") and str(out) in err
    assert "--out" in err and "run the command again" in err
    assert not (tmp_path / "no-run").exists()  # nothing was made of the missing run


@pytest.mark.skipif(hasattr(os, "geteuid") and os.geteuid() == 0, reason="root writes in a read-only folder")
def test_a_read_only_folder_is_one_line_and_status_2(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    folder = tmp_path / "ro"
    folder.mkdir()
    folder.chmod(0o555)
    try:
        status = main(_commands(folder / "out", tmp_path)["predict"])
        err = capsys.readouterr().err
        assert status == 2 and len(err.strip().splitlines()) == 1 and str(folder / "out") in err, err
        status = main(_commands(folder, tmp_path)["predict"])
        err = capsys.readouterr().err
        assert status == 2 and "cannot write in the output folder (--out)" in err, err
    finally:
        folder.chmod(0o755)


def test_an_existing_folder_root_cannot_write_is_refused() -> None:
    """/sys is read-only to every user: the probe file cannot be created there."""
    if not Path("/sys").is_dir():
        pytest.skip("no /sys here")
    with pytest.raises(OutputError, match=r"cannot write in the run folder /sys \("):
        prepare_output_folder("/sys", "run folder")


def test_a_writable_folder_is_made_and_left_clean(tmp_path: Path) -> None:
    folder = prepare_output_folder(tmp_path / "a" / "b", "output folder")
    assert folder.is_dir() and list(folder.iterdir()) == []  # the probe file is gone
    assert prepare_output_folder(folder) == folder  # an existing folder is fine
