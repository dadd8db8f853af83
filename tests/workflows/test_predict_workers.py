"""`loupe predict` as several workers on one output folder: each slide done once, the same summary as one worker's,
and a worker killed with SIGKILL loses nothing (its slides are finished by the others or by a re-run)."""

from __future__ import annotations

import csv
import json
import os
import re
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path
from urllib.parse import quote, unquote

import pytest

from loupe.workflows.prediction import predict

pytestmark = pytest.mark.slow  # every test predicts with trained_run, a session fixture that trains

OUTPUTS = ("prediction.json", "attention.npz", "attention.geojson")
LOGGED = re.compile(r"\[\d+/\d+\] (\S+?)(?: failed)?: ")  # one line per slide processed, done or failed


@pytest.fixture
def slide_folder(small_manifest: Path, tmp_path: Path) -> Path:
    """Fifteen small slides (copies of the test images under other names) and a broken one."""
    folder = tmp_path / "slides"
    folder.mkdir()
    images = sorted((small_manifest.parent / "images").glob("test_*.tif"))
    for n in range(15):
        (folder / f"slide_{n:02d}.tif").write_bytes(images[n % len(images)].read_bytes())
    (folder / "broken.svs").write_bytes(b"not a slide at all" * 100)
    return folder


def _ids(folder: Path) -> list[str]:
    return sorted(p.stem for p in folder.iterdir())


def _command(run: Path, folder: Path, out: Path, log: Path, *extra: str) -> subprocess.Popen:
    """`loupe predict` in a process of its own, its console written to ``log``."""
    args = [sys.executable, "-m", "loupe.cli", "predict", str(run), str(folder), "--out", str(out)]
    with log.open("w") as handle:
        return subprocess.Popen([*args, "--loader-workers", "0", *extra], stdout=handle, stderr=subprocess.STDOUT)


def _logged(text: str) -> list[str]:
    return LOGGED.findall(text)


def _summary(out: Path) -> tuple[str, dict[str, tuple]]:
    """predictions.csv as text and each slide's status (and failure reason) from status.json."""
    slides = json.loads((out / "status.json").read_text())["slides"]
    return (out / "predictions.csv").read_text(), {k: (v["status"], v.get("reason")) for k, v in slides.items()}


def _complete_folders(out: Path) -> list[str]:
    """The visible slide folders, each checked to be complete."""
    visible = sorted(p for p in (out / "slides").iterdir() if not p.name.startswith("."))
    for folder in visible:
        for name in OUTPUTS:
            assert (folder / name).is_file(), (folder.name, name)
    return [p.name for p in visible]


def _assert_finished(out: Path, folder: Path) -> None:
    """Every slide of ``folder`` done once (the broken one failed), no leftovers, no claims."""
    ids = _ids(folder)
    text, status = _summary(out)
    assert sorted(status) == ids
    assert {k for k, (s, _) in status.items() if s == "failed"} == {"broken"}
    assert {k for k, (s, _) in status.items() if s == "done"} == set(ids) - {"broken"}
    rows = [r["slide_id"] for r in csv.DictReader(text.splitlines())]
    assert rows == [i for i in ids if i != "broken"]  # once each, in input order
    assert _complete_folders(out) == rows
    assert not [p.name for p in (out / "slides").iterdir() if p.name.startswith(".")]  # no partial folder left
    assert not list((out / "claims").glob("*.claim"))


@pytest.fixture
def single(trained_run: Path, slide_folder: Path, tmp_path: Path) -> tuple[str, dict]:
    """The summary of one worker alone over the same slides."""
    out = tmp_path / "single"
    predict(trained_run, [slide_folder], out=out, loader_workers=0)
    return _summary(out)


def test_two_commands_on_one_folder_process_each_slide_once(trained_run, slide_folder, single, tmp_path):
    out = tmp_path / "shared"
    logs = [tmp_path / "worker1.log", tmp_path / "worker2.log"]
    workers = [_command(trained_run, slide_folder, out, log) for log in logs]
    for w in workers:
        w.wait(timeout=600)
    texts = [log.read_text() for log in logs]
    assert [w.returncode for w in workers] == [1, 1], texts  # 1: a slide (the broken one) failed
    counts = Counter(s for text in texts for s in _logged(text))
    assert counts == dict.fromkeys(_ids(slide_folder), 1), texts
    assert all(_logged(text) for text in texts), "each worker should have taken some slides"
    _assert_finished(out, slide_folder)
    assert _summary(out) == single


def test_workers_option_starts_processes_that_share_the_slides(
    trained_run, slide_folder, single, tmp_path, capfd, caplog
):
    out = tmp_path / "shared"
    caplog.set_level("INFO", logger="loupe")  # the workers log as this process would: here, every slide
    run = predict(trained_run, [slide_folder], out=out, workers=2, loader_workers=0)
    text = capfd.readouterr().err
    counts = Counter(_logged(text))
    assert counts == dict.fromkeys(_ids(slide_folder), 1), text
    assert "[worker 1/2]" in text and "[worker 2/2]" in text
    assert sorted(run.processed) == _ids(slide_folder)
    assert run.counts() == {"done": 15, "failed": 1, "pending": 0}
    _assert_finished(out, slide_folder)
    assert _summary(out) == single


def _wait_for(condition, proc: subprocess.Popen, what: str, timeout: float = 300) -> None:
    deadline = time.time() + timeout
    while not condition():
        assert proc.poll() is None, f"the worker ended before {what}: give it more slides"
        assert time.time() < deadline, f"timed out waiting for {what}"
        time.sleep(0.005)


def _partials(out: Path) -> list[str]:
    try:
        return [p.name for p in os.scandir(out / "slides") if ".partial-" in p.name]
    except FileNotFoundError:
        return []


def _states(out: Path) -> list[str]:
    """The slides recorded (done or failed) in the state folder."""
    try:
        return [p.name.removesuffix(".json") for p in os.scandir(out / "state") if not p.name.startswith(".")]
    except FileNotFoundError:
        return []


def test_a_worker_killed_while_writing_leaves_no_partial_folder_and_a_rerun_finishes(
    trained_run, slide_folder, tmp_path
):
    out = tmp_path / "out"
    victim = _command(trained_run, slide_folder, out, tmp_path / "killed.log")
    _wait_for(lambda: len(_states(out)) >= 2 and _partials(out), victim, "a slide folder was being written")
    victim.send_signal(signal.SIGKILL)
    victim.wait()
    assert victim.returncode == -signal.SIGKILL
    held = list((out / "claims").glob("*.claim"))
    assert held, "the killed worker held the claim of the slide it was writing"
    # Finished: recorded, or with a complete folder (killed between the folder and its state file).
    finished_before = set(_states(out)) | set(_complete_folders(out))  # every visible folder is complete
    assert 2 <= len(finished_before) < len(_ids(slide_folder))

    # A re-run on this machine takes the dead worker's claim over at once (not after the 10-minute expiry).
    rerun = _command(trained_run, slide_folder, out, tmp_path / "rerun.log")
    rerun.wait(timeout=300)
    text = (tmp_path / "rerun.log").read_text()
    assert rerun.returncode in (0, 1), text
    assert sorted(_logged(text)) == sorted(set(_ids(slide_folder)) - finished_before), text
    _assert_finished(out, slide_folder)


def test_a_killed_workers_slides_are_finished_by_the_other_worker(trained_run, slide_folder, tmp_path):
    out = tmp_path / "out"
    logs = [tmp_path / "victim.log", tmp_path / "survivor.log"]
    victim, survivor = (_command(trained_run, slide_folder, out, log) for log in logs)

    held: dict[str, str] = {}  # slide id -> the victim's worker token, in its claims

    def victim_holds_claims() -> bool:
        held.clear()
        for claim in (out / "claims").glob("*.claim"):
            try:
                owner = json.loads(claim.read_text())
            except (OSError, ValueError):
                continue
            if owner["pid"] == victim.pid:
                held[unquote(claim.name.removesuffix(".claim"))] = owner["worker"]
        return bool(held) and len(_states(out)) >= 2

    _wait_for(victim_holds_claims, victim, "the victim claimed a slide")
    victim.send_signal(signal.SIGKILL)  # not reaped until the end: a zombie, which is dead all the same
    survivor.wait(timeout=300)
    victim.wait()
    texts = [log.read_text() for log in logs]
    assert survivor.returncode == 1, texts[1]
    counts = Counter(s for text in texts for s in _logged(text))
    assert max(counts.values()) == 1, counts
    assert set(_logged(texts[0])).isdisjoint(_logged(texts[1]))
    _assert_finished(out, slide_folder)
    # The slides the victim held when it died: recorded by the victim itself, or else taken over by the survivor.
    for slide_id, token in held.items():
        recorded_by = json.loads((out / "state" / f"{quote(slide_id, safe='')}.json").read_text())["worker"]
        assert recorded_by == token or slide_id in _logged(texts[1]), (slide_id, recorded_by, texts[1])
