"""Shared pieces of the reliability suite: a tiny synthetic dataset, and `loupe` run as a user runs it (a separate
process that can be killed, whose exit status and stderr are what the user sees)."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path

import pytest

from loupe.datasets.synthetic import SyntheticSpec, generate_dataset

PRESETS = Path(__file__).resolve().parents[2] / "src" / "loupe" / "configs"
DEMO = PRESETS / "demo.yaml"
SPEC = SyntheticSpec(labels=("5x", "10x", "20x"), splits={"train": 8, "val": 4, "test": 4}, seed=3)


@pytest.fixture(scope="session")
def dataset(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The manifest of 16 synthetic 256×256 slides (8 train, 4 val, 4 test)."""
    return generate_dataset(tmp_path_factory.mktemp("reliability-data"), SPEC)


@pytest.fixture(scope="session")
def trained_run(dataset: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A run folder trained for one epoch on ``dataset`` (for predict tests; copy it before changing it)."""
    run = tmp_path_factory.mktemp("reliability-run") / "run"
    proc = run_loupe(train_args(dataset, run, 1))
    assert proc.returncode == 0, proc.stderr[-3000:]
    return run


def child_env() -> dict[str, str]:
    """The environment of a `loupe` child process: this session's cache folder, one thread (the machine is shared)."""
    return os.environ | {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}


def loupe_command(*args: str | os.PathLike[str], script: str | None = None) -> list[str]:
    """``python -m loupe.cli ARGS`` (or ``python -c SCRIPT ARGS``, a script that ends by calling the CLI)."""
    head = [sys.executable, "-c", script] if script else [sys.executable, "-m", "loupe.cli"]
    return [*head, *(str(a) for a in args)]


def failing_save(variable: str, failure: str, imports: str = "os, sys") -> str:
    """A script that runs the CLI with torch.save replaced by one that, at its N-th call (N: environment variable
    ``variable``), writes the first bytes of a checkpoint and then runs ``failure`` (one statement: a SIGKILL, a
    raised OSError): a fault in the middle of a checkpoint write. ``imports``: the modules ``failure`` needs."""
    return f"""
import {imports}
import torch
real_save, calls = torch.save, [0]
def failing_save(obj, f, *args, **kwargs):
    calls[0] += 1
    if calls[0] == int(os.environ["{variable}"]):
        f.write(b"PK\\x03\\x04 half a checkpoint")
        f.flush()
        {failure}
    return real_save(obj, f, *args, **kwargs)
torch.save = failing_save
from loupe.cli import main
sys.exit(main(sys.argv[1:]))
"""


def train_args(manifest: Path, out: Path, epochs: int, *extra: str) -> list[str]:
    """`loupe train` of the demo preset on ``manifest``: batches of 4 (two steps per epoch), no progress bar."""
    return [
        "train", str(DEMO), "--out", str(out), "--data.manifest", str(manifest), "--data.batch_size", "4",
        "--train.epochs", str(epochs), "--train.progress_bar", "false", *extra,
    ]  # fmt: skip


def run_loupe(args: Sequence[str], timeout: float = 300, script: str | None = None) -> subprocess.CompletedProcess:
    """Run `loupe ARGS` to its end; stdout and stderr captured as text."""
    return subprocess.run(
        loupe_command(*args, script=script), env=child_env(), capture_output=True, text=True, timeout=timeout
    )


def no_traceback(proc: subprocess.CompletedProcess) -> None:
    """A user-facing failure: exit status 2 and one `loupe ...: error:` message, never a Python traceback."""
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
    assert proc.returncode == 2, (proc.returncode, proc.stderr[-3000:])
    assert "error:" in proc.stderr


def pyramidal_slide(path: Path, seed: int) -> Path:
    """A 256×256 Aperio-style SVS at 0.5 µm/px (the demo slides' size and resolution) with 64 px JPEG tiles and
    three levels, so that the thumbnail comes from level 2 and 20x patches from level 0."""
    from loupe.datasets.synthetic_wsi import make_pyramidal_slide

    return make_pyramidal_slide(path, 256, 256, mpp=0.5, tile=64, levels=3, seed=seed, workers=1).path


def corrupt_level0_tiles(path: Path, tiles: Sequence[int] | None = None) -> None:
    """Overwrite bytes in the middle of the JPEG data of level-0 tiles (all, or those listed): the header and the
    other levels stay valid, so the slide opens and gives a thumbnail, and fails only when level 0 is read."""
    import tifffile

    with tifffile.TiffFile(path) as tif:
        offsets, counts = tif.pages[0].dataoffsets, tif.pages[0].databytecounts
    with path.open("r+b") as handle:
        for t in range(len(offsets)) if tiles is None else tiles:
            handle.seek(offsets[t] + counts[t] // 2)
            handle.write(b"\x00" * 64)


def truncate_after_header(path: Path, keep: int = 600) -> None:
    """Cut the file after its first ``keep`` bytes (the TIFF header and part of the first IFD)."""
    data = path.read_bytes()
    path.write_bytes(data[:keep])
