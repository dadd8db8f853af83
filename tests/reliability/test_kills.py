"""SIGKILL at any moment, also in the middle of writing a checkpoint or a slide folder: the same command run again
resumes from the last good checkpoint (or the slides not finished) and ends as an uninterrupted run does."""

from __future__ import annotations

import csv
import json
import os
import random
import signal
import subprocess
import time
from pathlib import Path

import pytest
import torch

from loupe.training.checkpoint_io import RESUMES_FILE, is_complete

from .conftest import child_env, failing_save, loupe_command, run_loupe, train_args

pytestmark = pytest.mark.slow  # each kills and reruns `loupe` several times (6-27 s each on 2 busy cores)

EPOCHS = 30
STEPS_PER_EPOCH = 2  # 8 training slides in batches of 4


def _mtime(path: Path) -> float:
    try:
        return path.stat().st_mtime
    except FileNotFoundError:
        return 0.0


def _kill_after_progress(args: list[str], watch: Path, delay: float, timeout: float = 120) -> bool:
    """Start `loupe ARGS`; once ``watch`` has been (re)written, wait ``delay`` s more and SIGKILL the process.
    Returns False if it ended by itself first."""
    before = _mtime(watch)
    proc = subprocess.Popen(loupe_command(*args), env=child_env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + timeout
        while _mtime(watch) == before and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.02)
        time.sleep(delay)
        if proc.poll() is not None:
            return False
        proc.send_signal(signal.SIGKILL)
        return True
    finally:
        proc.wait()


def _last(run: Path) -> dict:
    return torch.load(run / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)


def test_training_killed_at_random_moments_resumes_and_finishes(dataset: Path, tmp_path: Path) -> None:
    rng = random.Random(14)
    run = tmp_path / "run"
    args = train_args(dataset, run, EPOCHS)
    kills = 0
    for _ in range(3):  # killed a random moment after a checkpoint was written (between, or during, the next ones)
        kills += _kill_after_progress(args, run / "checkpoints" / "last.ckpt", rng.uniform(0.0, 1.0))
        assert is_complete(run / "checkpoints" / "last.ckpt")  # never truncated in place of a good one
    assert kills == 3
    interrupted_at = _last(run)["global_step"]
    assert 0 < interrupted_at < EPOCHS * STEPS_PER_EPOCH

    done = run_loupe(args)
    assert done.returncode == 0, done.stderr[-3000:]
    final = _last(run)
    # Exactly the steps of an uninterrupted run: every epoch trained once, none lost or repeated.
    assert final["global_step"] == EPOCHS * STEPS_PER_EPOCH and final["epoch"] == EPOCHS - 1
    resumes = json.loads((run / RESUMES_FILE).read_text())
    assert resumes["resumes"] == 3 and len(resumes["history"]) == 3
    assert all(h["checkpoint"] == "last.ckpt" for h in resumes["history"])
    steps = [h["global_step"] for h in resumes["history"]]
    assert steps == sorted(steps) and steps[-1] == interrupted_at
    assert not list((run / "checkpoints").glob(".*.tmp"))  # the killed writes' temporary files are gone
    assert (run / "checkpoints" / "best.ckpt").is_file()


#: Runs the CLI with torch.save SIGKILLing the process at its DIE_AT-th call, after writing a few bytes: a kill
#: while a checkpoint file is being written.
DIE_DURING_SAVE = failing_save("DIE_AT", "os.kill(os.getpid(), signal.SIGKILL)", imports="os, signal, sys")


def test_a_kill_during_a_checkpoint_write_leaves_the_previous_checkpoint(dataset: Path, tmp_path: Path) -> None:
    run = tmp_path / "run"
    args = train_args(dataset, run, 4)
    os.environ["DIE_AT"] = "4"  # epoch 0 writes best and last; the 4th save is epoch 1's last (or best)
    try:
        killed = run_loupe(args, script=DIE_DURING_SAVE)
    finally:
        del os.environ["DIE_AT"]
    assert killed.returncode == -signal.SIGKILL
    leftovers = list((run / "checkpoints").glob(".*.ckpt.*.tmp"))
    assert leftovers  # it did die inside the write...
    for name in ("last.ckpt", "best.ckpt"):  # ...and the files in place are the complete earlier ones
        assert is_complete(run / "checkpoints" / name)
    assert _last(run)["global_step"] in (STEPS_PER_EPOCH, 2 * STEPS_PER_EPOCH)

    done = run_loupe(args)
    assert done.returncode == 0, done.stderr[-3000:]
    assert _last(run)["global_step"] == 4 * STEPS_PER_EPOCH
    assert json.loads((run / RESUMES_FILE).read_text())["resumes"] == 1
    assert not list((run / "checkpoints").glob(".*.tmp"))


def test_a_damaged_last_checkpoint_falls_back_on_best(dataset: Path, tmp_path: Path) -> None:
    """A last.ckpt cut short by a crash of the machine (or written by another tool) is set aside, not loaded."""
    run = tmp_path / "run"
    first = run_loupe(train_args(dataset, run, 2))
    assert first.returncode == 0, first.stderr[-3000:]
    last = run / "checkpoints" / "last.ckpt"
    last.write_bytes(last.read_bytes()[: last.stat().st_size // 2])
    done = run_loupe(train_args(dataset, run, 3))
    assert done.returncode == 0, done.stderr[-3000:]
    assert "damaged" in done.stderr
    assert (run / "checkpoints" / "last.ckpt.damaged").is_file()
    assert _last(run)["epoch"] == 2
    assert json.loads((run / RESUMES_FILE).read_text())["history"][0]["checkpoint"] == "best.ckpt"


def test_prediction_killed_at_random_moments_completes_every_slide_once(
    dataset: Path, trained_run: Path, tmp_path: Path
) -> None:
    rng = random.Random(41)
    run = trained_run
    slides = sorted((dataset.parent / "images").glob("*.tif"))[:8]
    out = tmp_path / "out"
    # --heatmaps: every output of a slide is written (the most files a kill can cut short), and each slide takes
    # long enough that the kills land mid-run rather than after the last slide
    args = ["predict", str(run), *map(str, slides), "--out", str(out), "--workers", "0", "--heatmaps"]
    killed = 0
    for _ in range(3):
        states = out / "state"
        before = len(list(states.glob("*.json"))) if states.is_dir() else 0
        watch = states / f"{slides[min(before, len(slides) - 1)].stem}.json"
        killed += _kill_after_progress(args, watch, rng.uniform(0.0, 0.3))
        visible = [p.name for p in (out / "slides").iterdir()] if (out / "slides").is_dir() else []
        for name in visible:  # a slide folder is either complete or hidden (a dot-named partial)
            assert name.startswith(".") or (out / "slides" / name / "prediction.json").is_file()
    assert killed >= 2
    done = run_loupe(args)
    assert done.returncode == 0, done.stderr[-3000:]
    status = json.loads((out / "status.json").read_text())["slides"]
    assert sorted(status) == sorted(s.stem for s in slides)
    assert all(v["status"] == "done" for v in status.values())
    rows = list(csv.DictReader((out / "predictions.csv").open()))
    assert sorted(r["slide_id"] for r in rows) == sorted(s.stem for s in slides)  # each exactly once
    assert sorted(p.name for p in (out / "slides").iterdir()) == sorted(s.stem for s in slides)  # no partials
