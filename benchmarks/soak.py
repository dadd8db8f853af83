"""Soak test of the reliability promises: many more kill points and fuzz cases than tests/reliability/ runs in CI.

For a time budget it alternates rounds of:

- training killed with SIGKILL at random moments (a random delay after a checkpoint was written, or inside a
  checkpoint write: torch.save dies after writing a few bytes), then run again to the end: survived when the final
  checkpoint holds exactly the steps of an uninterrupted run and ``resumes.json`` counts every resume;
- predict killed at random moments, then run again: every slide must end done exactly once (``slides lost`` counts
  those missing, failed or duplicated), with no partial folder visible;
- the property-based fuzz tests of tests/reliability/test_fuzz.py with new random examples.

Every `loupe` run's stderr is searched for a Python traceback. Prints (and writes OUT/soak.json):
kills survived / tried, fuzz cases tried, tracebacks seen (must be 0), slides lost (must be 0).

    python benchmarks/soak.py --minutes 10 --out runs/soak
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from loupe.datasets.synthetic import SyntheticSpec, generate_dataset
from loupe.training.checkpoint_io import RESUMES_FILE, is_complete

ROOT = Path(__file__).resolve().parents[1]
DEMO = ROOT / "src" / "loupe" / "configs" / "demo.yaml"
STEPS_PER_EPOCH = 2  # 8 training slides, batches of 4

#: Runs the CLI with torch.save dying (SIGKILL) at its DIE_AT-th call, after writing a few bytes.
DIE_DURING_SAVE = """
import os, signal, sys
import torch
real_save, calls = torch.save, [0]
def dying_save(obj, f, *args, **kwargs):
    calls[0] += 1
    if calls[0] == int(os.environ["DIE_AT"]):
        f.write(b"PK\\x03\\x04 half a checkpoint")
        f.flush()
        os.kill(os.getpid(), signal.SIGKILL)
    return real_save(obj, f, *args, **kwargs)
torch.save = dying_save
from loupe.cli import main
sys.exit(main(sys.argv[1:]))
"""


@dataclass
class Figures:
    """What the soak counts."""

    kills_tried: int = 0
    kills_survived: int = 0
    train_rounds: int = 0
    predict_rounds: int = 0
    fuzz_cases: int = 0
    fuzz_failures: int = 0
    tracebacks: int = 0
    slides_lost: int = 0
    problems: list[str] | None = None

    def note(self, problem: str) -> None:
        self.problems = [*(self.problems or []), problem]
        print(f"  PROBLEM: {problem}", flush=True)


def _env(**extra: str) -> dict[str, str]:
    return os.environ | {"OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore", **extra}


def _command(args: list[str], script: str | None = None) -> list[str]:
    head = [sys.executable, "-c", script] if script else [sys.executable, "-m", "loupe.cli"]
    return [*head, *args]


def _train_args(manifest: Path, out: Path, epochs: int) -> list[str]:
    return [
        "train", str(DEMO), "--out", str(out), "--data.manifest", str(manifest), "--data.batch_size", "4",
        "--train.epochs", str(epochs), "--train.progress_bar", "false",
    ]  # fmt: skip


def _mtime(path: Path) -> float:
    try:
        return path.stat().st_mtime
    except FileNotFoundError:
        return 0.0


def _run(figures: Figures, args: list[str], script: str | None = None, **env: str) -> subprocess.CompletedProcess:
    proc = subprocess.run(_command(args, script), env=_env(**env), capture_output=True, text=True, timeout=600)
    if "Traceback" in proc.stderr:
        figures.tracebacks += 1
        figures.note(f"traceback in `loupe {' '.join(args[:1])}`: {proc.stderr[-800:]}")
    return proc


def _kill_after(figures: Figures, args: list[str], watch: Path, delay: float) -> bool:
    """Start `loupe ARGS`, SIGKILL it ``delay`` s after ``watch`` changed; False when it ended first."""
    before = _mtime(watch)
    proc = subprocess.Popen(_command(args), env=_env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 300
    while _mtime(watch) == before and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.02)
    time.sleep(delay)
    ended = proc.poll() is not None
    if not ended:
        proc.send_signal(signal.SIGKILL)
    _, err = proc.communicate()
    if "Traceback" in (err or ""):
        figures.tracebacks += 1
        figures.note(f"traceback before the kill: {err[-800:]}")
    return not ended


def train_round(figures: Figures, manifest: Path, folder: Path, rng: random.Random) -> None:
    """Kill a training 2-4 times (some inside a checkpoint write), then finish it; check it is whole."""
    run = folder / f"train-{figures.train_rounds}"
    epochs = rng.randint(12, 30)
    args = _train_args(manifest, run, epochs)
    kills = 0
    for _ in range(rng.randint(2, 4)):
        if rng.random() < 0.3:  # inside a checkpoint write
            proc = _run(figures, args, DIE_DURING_SAVE, DIE_AT=str(rng.randint(1, 4)))  # in its first 2 epochs
            kills += proc.returncode == -signal.SIGKILL
        else:
            kills += _kill_after(figures, args, run / "checkpoints" / "last.ckpt", rng.uniform(0.0, 1.5))
        for name in ("last.ckpt", "best.ckpt"):
            path = run / "checkpoints" / name
            if path.exists() and not is_complete(path):
                figures.note(f"{path} left incomplete after a kill")
    figures.kills_tried += kills
    done = _run(figures, args)
    state = torch.load(run / "checkpoints" / "last.ckpt", weights_only=True) if done.returncode == 0 else {}
    resumes_file = run / RESUMES_FILE
    resumes = json.loads(resumes_file.read_text())["resumes"] if resumes_file.is_file() else 0
    whole = state.get("global_step") == epochs * STEPS_PER_EPOCH and state.get("epoch") == epochs - 1
    if whole and resumes >= 1:
        figures.kills_survived += kills
    else:
        figures.note(f"training round {figures.train_rounds}: rc {done.returncode}, state {state.get('global_step')}")
    figures.train_rounds += 1
    shutil.rmtree(run, ignore_errors=True)


def predict_round(figures: Figures, trained: Path, slides: list[Path], folder: Path, rng: random.Random) -> None:
    """Kill a predict 1-3 times at random moments, then finish it; every slide must be done exactly once."""
    out = folder / f"predict-{figures.predict_rounds}"
    args = ["predict", str(trained), *map(str, slides), "--out", str(out), "--workers", "0"]
    kills = 0
    for _ in range(rng.randint(1, 3)):
        states = out / "state"
        finished = len(list(states.glob("*.json"))) if states.is_dir() else 0
        watch = states / f"{slides[min(finished, len(slides) - 1)].stem}.json"
        kills += _kill_after(figures, args, watch, rng.uniform(0.0, 0.4))
    figures.kills_tried += kills
    done = _run(figures, args)
    expected = sorted(s.stem for s in slides)
    try:
        status = json.loads((out / "status.json").read_text())["slides"]
        with (out / "predictions.csv").open(newline="") as handle:
            rows = [r["slide_id"] for r in csv.DictReader(handle)]
        folders = sorted(p.name for p in (out / "slides").iterdir())
    except (OSError, ValueError, KeyError):
        status, rows, folders = {}, [], []
    ok = [s for s in expected if status.get(s, {}).get("status") == "done" and rows.count(s) == 1]
    lost = len(expected) - len(ok) + (len(folders) != len(expected))
    figures.slides_lost += lost
    if done.returncode == 0 and not lost:
        figures.kills_survived += kills
    else:
        figures.note(f"predict round {figures.predict_rounds}: rc {done.returncode}, {lost} slide(s) lost")
    figures.predict_rounds += 1
    shutil.rmtree(out, ignore_errors=True)


def fuzz_round(figures: Figures, examples: int) -> None:
    """The hypothesis properties of tests/reliability/test_fuzz.py with ``examples`` new random examples each."""
    properties = ["test_any_manifest_loads_correctly_or_fails_with_one_message",
                  "test_any_config_is_refused_with_one_message_before_training"]  # fmt: skip
    proc = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "tests/reliability/test_fuzz.py", "-k",
         " or ".join(properties)],
        cwd=ROOT, env=_env(LOUPE_FUZZ_EXAMPLES=str(examples), LOUPE_FUZZ_RANDOM="1"), capture_output=True, text=True,
    )  # fmt: skip
    figures.fuzz_cases += examples * len(properties)
    if proc.returncode != 0:
        figures.fuzz_failures += 1
        figures.tracebacks += max(1, proc.stdout.count("\nFAILED "))  # each failing property: a traceback
        figures.note(f"fuzz failure: {proc.stdout[-1500:]}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--minutes", type=float, default=10.0, help="time budget (a round started is finished)")
    parser.add_argument("--out", type=Path, default=Path("runs/soak"))
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--fuzz-examples", type=int, default=300, help="examples per fuzz property per round")
    args = parser.parse_args(argv)
    rng = random.Random(args.seed)
    args.out.mkdir(parents=True, exist_ok=True)
    os.environ.setdefault("LOUPE_CACHE_DIR", str(args.out / "cache"))
    spec = SyntheticSpec(labels=("5x", "10x", "20x"), splits={"train": 8, "val": 4, "test": 4}, seed=3)
    manifest = generate_dataset(args.out / "data", spec)
    slides = sorted((manifest.parent / "images").glob("*.tif"))
    figures = Figures()
    trained = args.out / "trained"
    if not (trained / "checkpoints" / "last.ckpt").is_file():
        _run(figures, _train_args(manifest, trained, 1))
    start = time.monotonic()
    deadline = start + 60 * args.minutes
    round_ = 0
    while time.monotonic() < deadline:
        kind = round_ % 3
        if kind == 0:
            train_round(figures, manifest, args.out, rng)
        elif kind == 1:
            predict_round(figures, trained, slides, args.out, rng)
        else:
            fuzz_round(figures, args.fuzz_examples)
        round_ += 1
        print(
            f"[{(time.monotonic() - start) / 60:.1f} min] kills survived {figures.kills_survived}/"
            f"{figures.kills_tried}, fuzz cases {figures.fuzz_cases}, tracebacks {figures.tracebacks}, "
            f"slides lost {figures.slides_lost}",
            flush=True,
        )
    summary = asdict(figures) | {"minutes": round((time.monotonic() - start) / 60, 1), "seed": args.seed}
    (args.out / "soak.json").write_text(json.dumps(summary, indent=2) + "\n")
    print(
        f"kills survived / tried: {figures.kills_survived} / {figures.kills_tried} "
        f"({figures.train_rounds} training and {figures.predict_rounds} predict rounds)\n"
        f"fuzz cases tried: {figures.fuzz_cases} ({figures.fuzz_failures} failing rounds)\n"
        f"tracebacks seen: {figures.tracebacks} (must be 0)\n"
        f"slides lost: {figures.slides_lost} (must be 0)"
    )
    ok = figures.tracebacks == 0 and figures.slides_lost == 0 and figures.kills_survived == figures.kills_tried
    return 0 if ok and not figures.fuzz_failures else 1


if __name__ == "__main__":
    sys.exit(main())
