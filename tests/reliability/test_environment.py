"""Faults from the environment and from files loupe did not make: a full disk during training and predict, an
output path that cannot be a folder, an unwritable cache, the output inside the input folder, and checkpoints
holding pickled code. Each ends in one message and exit status 2 (or in a correct result), never a traceback, and
a re-run after the fault is gone continues."""

from __future__ import annotations

import errno
import json
import os
import shutil
from collections.abc import Callable
from pathlib import Path

import pytest
import torch

from loupe.errors import CheckpointError
from loupe.training.checkpoint_io import RESUMES_FILE, is_complete, load_weights_only

from .conftest import PRESETS, failing_save, no_traceback, run_loupe, train_args

#: Runs the CLI with torch.save raising ENOSPC at its FAIL_AT-th call: the disk fills during a checkpoint write.
DISK_FULL_AT_SAVE = failing_save("FAIL_AT", "raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))", "errno, os, sys")

#: Runs the CLI with the GeoJSON writer of slide folders raising ENOSPC from its FAIL_AT-th call on.
DISK_FULL_IN_PREDICT = """
import errno, os, sys
import loupe.workflows.slide_outputs as outputs
real, calls = outputs.write_attention_geojson, [0]
def full(*args, **kwargs):
    calls[0] += 1
    if calls[0] >= int(os.environ["FAIL_AT"]):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(args[0]))
    return real(*args, **kwargs)
outputs.write_attention_geojson = full
from loupe.cli import main
sys.exit(main(sys.argv[1:]))
"""


@pytest.fixture
def trained(trained_run: Path) -> Path:
    return trained_run


def _with_env(name: str, value: str) -> Callable[[], object]:
    os.environ[name] = value
    return lambda: os.environ.pop(name, None)


@pytest.mark.slow
def test_a_full_disk_during_a_checkpoint_write_stops_with_one_message_and_a_rerun_continues(
    dataset: Path, tmp_path: Path
) -> None:
    run = tmp_path / "run"
    args = train_args(dataset, run, 3)
    restore = _with_env("FAIL_AT", "4")  # epoch 0 writes best and last; epoch 1's first write fails
    try:
        full = run_loupe(args, script=DISK_FULL_AT_SAVE)
    finally:
        restore()
    no_traceback(full)
    message = full.stderr.strip().splitlines()[-1]
    assert f"no space left in {run / 'checkpoints'}" in message and "MB" in message
    assert "run the same command again" in message
    for name in ("best.ckpt", "last.ckpt"):
        assert is_complete(run / "checkpoints" / name)  # the good checkpoints are untouched
    assert not list((run / "checkpoints").glob(".*.tmp"))

    again = run_loupe(args)
    assert again.returncode == 0, again.stderr[-3000:]
    assert torch.load(run / "checkpoints" / "last.ckpt", weights_only=True)["epoch"] == 2
    assert json.loads((run / RESUMES_FILE).read_text())["resumes"] == 1


@pytest.mark.slow
def test_a_full_disk_during_predict_stops_and_a_rerun_completes_every_slide(
    trained: Path, dataset: Path, tmp_path: Path
) -> None:
    slides = sorted((dataset.parent / "images").glob("test_*.tif"))
    out = tmp_path / "out"
    args = ["predict", str(trained), *map(str, slides), "--out", str(out), "--workers", "0"]
    restore = _with_env("FAIL_AT", "2")
    try:
        full = run_loupe(args, script=DISK_FULL_IN_PREDICT)
    finally:
        restore()
    no_traceback(full)
    assert f"no space left in {out / 'slides'} (this write needs about" in full.stderr
    finished = sorted(p.name for p in (out / "slides").iterdir())
    assert finished == [slides[0].stem]  # the slide finished before is kept; no partial folder is visible
    assert (out / "slides" / slides[0].stem / "prediction.json").is_file()

    again = run_loupe(args)
    assert again.returncode == 0, again.stderr[-3000:]
    status = json.loads((out / "status.json").read_text())["slides"]
    assert all(v["status"] == "done" for v in status.values()) and len(status) == len(slides)
    assert sorted(p.name for p in (out / "slides").iterdir()) == sorted(s.stem for s in slides)


@pytest.mark.slow
def test_an_output_path_through_a_file_is_one_message(dataset: Path, tmp_path: Path) -> None:
    blocker = tmp_path / "not-a-folder"
    blocker.write_text("a file where a folder should be")
    proc = run_loupe(train_args(dataset, blocker / "run", 1))
    no_traceback(proc)
    assert str(blocker) in proc.stderr


@pytest.mark.slow
def test_an_unwritable_cache_folder_falls_back_to_no_cache_with_one_warning(dataset: Path, tmp_path: Path) -> None:
    blocker = tmp_path / "cache-file"
    blocker.write_text("the cache folder cannot be made here")
    proc = run_loupe(train_args(dataset, tmp_path / "run", 1, "--data.cache_dir", str(blocker / "cache")))
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stderr.count("cannot write the slide cache") == 1
    assert (tmp_path / "run" / "checkpoints" / "last.ckpt").is_file()


@pytest.mark.slow
def test_an_output_folder_inside_the_input_folder_is_not_read_as_slides(
    trained: Path, dataset: Path, tmp_path: Path
) -> None:
    folder = tmp_path / "slides"
    folder.mkdir()
    for img in sorted((dataset.parent / "images").glob("test_*.tif"))[:2]:
        shutil.copy(img, folder / img.name)
    args = ["predict", str(trained), str(folder), "--out", str(folder / "out"), "--workers", "0"]
    for _ in range(2):  # the second run sees the first one's PNGs inside the input folder
        proc = run_loupe(args)
        assert proc.returncode == 0, proc.stderr[-3000:]
        status = json.loads((folder / "out" / "status.json").read_text())["slides"]
        assert sorted(status) == ["test_0000", "test_0001"]


class _Payload:
    """Unpickling this runs a shell command: what a crafted checkpoint would do."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[Callable[[str], int], tuple[str]]:
        return (os.system, (f"touch {self.marker}",))


def _craft(path: Path, marker: Path, like: Path | None = None) -> None:
    state = torch.load(like, weights_only=True) if like is not None else {"state_dict": {}}
    state["hyper_parameters"] = {"note": _Payload(marker)}
    torch.save(state, path)


def test_a_checkpoint_holding_pickled_code_is_refused(tmp_path: Path) -> None:
    marker = tmp_path / "pwned"
    path = tmp_path / "crafted.ckpt"
    _craft(path, marker)
    with pytest.raises(CheckpointError, match="refused to load") as err:
        load_weights_only(path)
    assert str(path) in str(err.value)
    assert not marker.exists()


@pytest.mark.slow
def test_predict_and_resume_refuse_a_crafted_checkpoint(trained: Path, dataset: Path, tmp_path: Path) -> None:
    run = tmp_path / "run"
    shutil.copytree(trained, run)
    marker = tmp_path / "pwned"
    for name in ("best.ckpt", "last.ckpt"):
        _craft(run / "checkpoints" / name, marker, like=trained / "checkpoints" / name)
    slide = sorted((dataset.parent / "images").glob("test_*.tif"))[0]
    predicted = run_loupe(["predict", str(run), str(slide), "--out", str(tmp_path / "out"), "--workers", "0"])
    no_traceback(predicted)
    assert "refused to load" in predicted.stderr and "best.ckpt" in predicted.stderr
    resumed = run_loupe(train_args(dataset, run, 2))
    no_traceback(resumed)
    assert "refused to load" in resumed.stderr and "last.ckpt" in resumed.stderr
    assert not marker.exists()  # nothing in the files ran


@pytest.mark.parametrize("code", [errno.EROFS, errno.EACCES, errno.ENOSPC])
def test_a_refused_write_anywhere_is_one_message_with_exit_status_2(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], tmp_path: Path, code: int
) -> None:
    """A read-only or unwritable output folder (not reproducible by permissions when the tests run as root):
    whatever write is refused, the CLI prints one message naming the path, exit status 2."""
    import loupe.workflows.training
    from loupe.cli import main

    target = tmp_path / "ro" / "run" / "config.yaml"

    def refused(*args: object, **kwargs: object) -> None:
        raise OSError(code, os.strerror(code), str(target))

    monkeypatch.setattr(loupe.workflows.training, "train", refused)
    status = main(["train", str(PRESETS / "demo.yaml"), "--out", str(tmp_path / "ro" / "run")])
    err = capsys.readouterr().err
    assert status == 2 and "Traceback" not in err
    assert err.startswith("loupe train: error:") and len(err.strip().splitlines()) == 1
    assert str(target.parent) in err
