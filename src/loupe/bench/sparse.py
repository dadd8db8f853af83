"""`loupe bench sparse`: does the joint model find evidence that covers under 1% of the image, seed after seed?

Each task is generated with a known answer (where the label is, at which magnification); each lever is a set of
``joint`` settings; every (task, lever) pair is trained from several seeds by ``loupe train`` and scored by
``loupe evaluate`` on the test split. A seed *learned* when its test accuracy is at least ``LEARNED_ACCURACY`` and
at least ``LEARNED_SHARE`` of the attention is on the informative magnification. *Left chance* is the first epoch
whose validation accuracy is at least halfway from chance to 1 (0.75 for two classes, 0.55 for ten).
"""

from __future__ import annotations

import csv
import dataclasses
import json
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from loupe.bench.commands import new_parser
from loupe.bench.speed import Log
from loupe.config import Config, JointConfig
from loupe.console import progress
from loupe.errors import ConfigError
from loupe.reports import write_json, write_text

if TYPE_CHECKING:
    from jsonargparse import ArgumentParser, Namespace

LEARNED_ACCURACY = 0.9
LEARNED_SHARE = 0.6


@dataclass(frozen=True)
class SparseTask:
    """A generated dataset with a known answer, and the config that trains on it."""

    name: str
    description: str
    build: Callable[[Path], tuple[Config, str, float]]
    """Generate the data under a folder; return (base config, informative magnification label, evidence share)."""
    n_classes: int
    epochs: int


def _synthetic_task(evidence: float) -> Callable[[Path], tuple[Config, str, float]]:
    def build(folder: Path) -> tuple[Config, str, float]:
        from loupe.datasets.synthetic import generate_dataset, sparse_spec
        from loupe.workflows.common import magnifications_of
        from loupe.workflows.demo import demo_config

        cfg = demo_config()
        labels = tuple(m.label for m in magnifications_of(cfg))
        spec = sparse_spec(evidence, labels=labels, magnifications=(2.0, 1.0, 0.5), patch_size=cfg.joint.patch_size)
        manifest = generate_dataset(folder, spec)
        finest = spec.image_size // spec.cell_pixels(spec.signal_index())
        side = 8 * finest  # the /8 thumbnail network then sees one feature per finest cell
        cfg = dataclasses.replace(
            cfg,
            data=dataclasses.replace(cfg.data, manifest=str(manifest)),
            joint=_loupe_defaults(dataclasses.replace(cfg.joint, thumbnail_size=(side, side))),
        )
        return cfg, spec.labels[spec.signal_index()], spec.evidence_fraction()

    return build


def _mnist_task(folder: Path) -> tuple[Config, str, float]:
    from loupe.datasets.megapixel_mnist import MegapixelMNISTSpec, generate_dataset
    from loupe.workflows.demo import demo_config

    spec = MegapixelMNISTSpec(image_size=MNIST_SIZE, patch_size=MNIST_PATCH, splits=dict(MNIST_SPLITS))
    manifest = generate_dataset(folder, spec)
    cfg = demo_config()
    side = 8 * spec.cells_per_side()
    cfg = dataclasses.replace(
        cfg,
        data=dataclasses.replace(cfg.data, manifest=str(manifest)),
        model=dataclasses.replace(cfg.model, magnifications=list(spec.labels)),
        # Ten classes: the learning rate drops ×0.1 after 5 epochs without a better validation accuracy.
        train=dataclasses.replace(cfg.train, lr_patience=5, lr_factor=0.1),
        joint=_loupe_defaults(dataclasses.replace(cfg.joint, patch_size=spec.patch_size, thumbnail_size=(side, side))),
    )
    return cfg, spec.informative_label(), spec.evidence_fraction()


def _loupe_defaults(joint: JointConfig) -> JointConfig:
    """The demo preset's joint settings with loupe's default discovery settings (the demo turns some off)."""
    d = JointConfig()
    return dataclasses.replace(
        joint,
        train_draws=d.train_draws,
        uniform_mix=d.uniform_mix,
        novelty=d.novelty,
        novelty_epochs=d.novelty_epochs,
        magnification_aware=d.magnification_aware,
    )


#: The reduced Megapixel MNIST: side, patch and split sizes (the reference: 1500², 5000 training images).
MNIST_SIZE = 384
MNIST_PATCH = 32
#: 2000 training images (1000 before: test error 20.8% at 40 epochs; 2000: 16%), 35 min per seed on a shared 2-core CPU.
MNIST_SPLITS = (("train", 2000), ("val", 200), ("test", 500))

TASKS: dict[str, SparseTask] = {
    "evidence-1%": SparseTask(
        "evidence-1%",
        "synthetic, 320×320: the label in one 20x cell (1.0% of the image), decoys at 5x and 10x",
        _synthetic_task(0.01),
        n_classes=2,
        epochs=30,
    ),
    "evidence-0.5%": SparseTask(
        "evidence-0.5%",
        "synthetic, 480×480: the label in one 20x cell (0.44% of the image), decoys at 5x and 10x",
        _synthetic_task(0.005),
        n_classes=2,
        epochs=30,
    ),
    "megapixel-mnist": SparseTask(
        "megapixel-mnist",
        f"Megapixel MNIST reduced to {MNIST_SIZE}², patch {MNIST_PATCH}: label = the majority of 3 + 2 digits, "
        "noise scribbles, 10 classes (2000 / 200 / 500 images)",
        _mnist_task,
        n_classes=10,
        epochs=40,
    ),
}
DEFAULT_TASKS = ("evidence-1%", "evidence-0.5%", "megapixel-mnist")

#: Lever name → ``joint`` settings over the task's config: "loupe 0.1" is one draw from the attention per step
#: (the paper's training), "defaults" loupe's defaults as shipped (4 draws, half-uniform proposal, novelty prior);
#: names hold no comma (the CLI takes comma-separated lists).
LEVERS: dict[str, dict[str, Any]] = {
    "loupe 0.1": {"train_draws": 1, "uniform_mix": 0.0, "novelty": 0.0, "magnification_aware": False},
    "uniform mix 0.5": {"train_draws": 1, "uniform_mix": 0.5, "novelty": 0.0, "magnification_aware": False},
    "4 draws": {"train_draws": 4, "uniform_mix": 0.0, "novelty": 0.0, "magnification_aware": False},
    "novelty prior": {"train_draws": 1, "uniform_mix": 0.0, "novelty": 1.0, "magnification_aware": False},
    "4 draws + novelty": {"train_draws": 4, "uniform_mix": 0.0, "novelty": 1.0, "magnification_aware": False},
    "defaults without magnification maps": {"magnification_aware": False},
    "defaults": {},
}


def _lever_config(cfg: Config, settings: dict[str, Any], seed: int, epochs: int) -> Config:
    return dataclasses.replace(
        cfg,
        train=dataclasses.replace(cfg.train, seed=seed, epochs=epochs, progress_bar=False),
        joint=dataclasses.replace(cfg.joint, **settings),
    )


def epoch_history(run: Path, labels: Sequence[str]) -> list[dict[str, float]]:
    """Per epoch: validation accuracy and attention share per magnification, from the run's CSV log."""
    logs = sorted(run.glob("logs/version_*/metrics.csv"))
    history: dict[int, dict[str, float]] = {}
    for path in logs:
        with path.open(newline="") as fh:
            for row in csv.DictReader(fh):
                if row.get("val_acc"):
                    entry = {"val_acc": float(row["val_acc"])}
                    entry |= {lab: float(row[f"val_attention_{lab}"]) for lab in labels}
                    history[int(row["epoch"])] = entry
    return [history[e] | {"epoch": e} for e in sorted(history)]


def left_chance(history: Sequence[dict[str, float]], n_classes: int) -> int | None:
    """The first epoch (1-based) whose validation accuracy is at least halfway from chance to 1."""
    chance = 1.0 / n_classes
    bar = chance + 0.5 * (1.0 - chance)
    return next((int(h["epoch"]) + 1 for h in history if h["val_acc"] >= bar), None)


def run_seed(task: SparseTask, lever: str, seed: int, folder: Path, epochs: int) -> dict[str, Any]:
    """Train and evaluate one seed of one lever on one task; return its row."""
    from loupe.workflows.common import magnifications_of
    from loupe.workflows.evaluation import evaluate
    from loupe.workflows.training import train

    base, informative, evidence = task.build(folder.parent.parent / "data")
    cfg = _lever_config(base, LEVERS[lever], seed, epochs)
    labels = [m.label for m in magnifications_of(cfg)]
    start = time.perf_counter()
    run = train(cfg, out=folder / "run")
    seconds = time.perf_counter() - start
    metrics = evaluate(run, split="test", out=folder / "eval")
    history = epoch_history(run, labels)
    share = float(metrics["attention_share"][informative])
    return {
        "task": task.name,
        "lever": lever,
        "seed": seed,
        "epochs": epochs,
        "evidence_fraction": evidence,
        "informative": informative,
        "test_accuracy": float(metrics["accuracy"]),
        "informative_share": share,
        "attention_share": metrics["attention_share"],
        "left_chance_epoch": left_chance(history, task.n_classes),
        "learned": float(metrics["accuracy"]) >= LEARNED_ACCURACY and share >= LEARNED_SHARE,
        "train_s": seconds,
        "history": history,
    }


def summarise(rows: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """One line per (task, lever): seeds learned, epochs to leave chance, final accuracy, attention share."""
    groups: dict[tuple[str, str], list[dict[str, Any]]] = {}
    for r in rows:
        groups.setdefault((r["task"], r["lever"]), []).append(r)
    out = []
    for (task, lever), rs in groups.items():
        left = [r["left_chance_epoch"] for r in rs if r["left_chance_epoch"] is not None]
        out.append(
            {
                "task": task,
                "lever": lever,
                "seeds": len(rs),
                "learned": sum(r["learned"] for r in rs),
                "left_chance": len(left),
                "median_epochs_to_leave_chance": statistics.median(left) if left else None,
                "epochs_to_leave_chance": [r["left_chance_epoch"] for r in rs],
                "mean_test_accuracy": statistics.fmean(r["test_accuracy"] for r in rs),
                "test_accuracies": [r["test_accuracy"] for r in rs],
                "mean_informative_share": statistics.fmean(r["informative_share"] for r in rs),
                "informative": rs[0]["informative"],
                "evidence_fraction": rs[0]["evidence_fraction"],
                "epochs": rs[0]["epochs"],
                "mean_train_s": statistics.fmean(r["train_s"] for r in rs),
            }
        )
    return out


def sparse_markdown(result: dict[str, Any]) -> str:
    """The suite's table."""
    lines = [
        "# loupe bench sparse: learning when the evidence is a small part of the image",
        "",
        f"A seed learned: test accuracy ≥ {LEARNED_ACCURACY} and ≥ {100 * LEARNED_SHARE:.0f}% of the attention on "
        "the informative magnification. Left chance: first epoch with validation accuracy halfway from chance to 1.",
        "",
        "| task | evidence | lever | learned | epochs to leave chance (per seed) | test accuracy (per seed) | "
        "attention on informative | epochs | train s/seed |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for s in result["summary"]:
        epochs = ", ".join("–" if e is None else str(e) for e in s["epochs_to_leave_chance"])
        accs = ", ".join(f"{a:.2f}" for a in s["test_accuracies"])
        lines.append(
            f"| {s['task']} | {100 * s['evidence_fraction']:.2f}% | {s['lever']} | {s['learned']}/{s['seeds']} | "
            f"{epochs} | {accs} | {100 * s['mean_informative_share']:.0f}% ({s['informative']}) | {s['epochs']} | "
            f"{s['mean_train_s']:.0f} |"
        )
    lines += ["", "Tasks:", ""] + [f"- **{name}**: {desc}" for name, desc in result["tasks"].items()]
    lines += ["", "Levers (joint settings over the task's config):", ""]
    lines += [f"- **{name}**: {settings or 'loupe defaults'}" for name, settings in result["levers"].items()]
    return "\n".join(lines) + "\n"


def run_sparse(
    *,
    out: str | Path,
    tasks: Sequence[str] | None = None,
    levers: Sequence[str] | None = None,
    seeds: int = 5,
    epochs: int | None = None,
    table_only: bool = False,
    log: Log = print,
    bar: bool | None = None,
) -> dict[str, Any]:
    """Run the suite into ``out`` (one folder per task, lever and seed; a finished seed is reused when the suite is
    run again); write sparse.json and sparse.md; return the result. ``table_only``: train nothing, tabulate the
    seeds already finished in ``out`` (e.g. while other processes run the rest). Progress: a bar on a terminal
    (``bar``: default whether stderr is one), a line every 30 s in a log."""
    out = Path(out)
    task_names = list(tasks or TASKS)
    lever_names = list(levers or LEVERS)
    for name in task_names:
        if name not in TASKS:
            raise ConfigError(f"loupe bench sparse: unknown task {name!r}; known: {', '.join(TASKS)}")
    for name in lever_names:
        if name not in LEVERS:
            raise ConfigError(f"loupe bench sparse: unknown lever {name!r}; known: {', '.join(LEVERS)}")
    if seeds < 1:
        raise ConfigError(f"loupe bench sparse: --seeds {seeds}: expected at least 1")
    start = time.perf_counter()
    rows: list[dict[str, Any]] = []
    runs = [(t, lever, seed) for t in task_names for lever in lever_names for seed in range(seeds)]
    with progress(len(runs), "runs", label="bench sparse", bar=bar) as shown:
        say = shown.print if log is print else log
        for t, lever, seed in runs:
            task = TASKS[t]
            folder = out / t / _slug(lever) / f"seed{seed}"
            done = folder / "row.json"
            if done.is_file():
                rows.append(json.loads(done.read_text()))
                shown.advance()
                continue
            if table_only:
                continue
            row = run_seed(task, lever, seed, folder, epochs or task.epochs)
            write_json(done, row)
            rows.append(row)
            shown.advance()
            say(
                f"{t} / {lever} / seed {seed}: test accuracy {row['test_accuracy']:.3f}, "
                f"{100 * row['informative_share']:.0f}% on {row['informative']}, left chance at epoch "
                f"{row['left_chance_epoch']} ({row['train_s']:.0f} s)"
            )
    result = {
        "summary": summarise(rows),
        "runs": rows,
        "tasks": {t: TASKS[t].description for t in task_names},
        "levers": {lv: LEVERS[lv] for lv in lever_names},
        "wall_s": time.perf_counter() - start,
    }
    write_json(out / "sparse.json", result)
    write_text(out / "sparse.md", sparse_markdown(result))
    return result


def _slug(name: str) -> str:
    return "".join(c if c.isalnum() or c in "-." else "_" for c in name)


def build_parser(prog: str) -> ArgumentParser:
    """`loupe bench sparse --out DIR [--tasks ...] [--levers ...] [--seeds N] [--epochs E]`."""
    parser = new_parser(prog, description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=str, required=True, help="folder for sparse.json, sparse.md and the runs")
    parser.add_argument(
        "--tasks", type=str, default=",".join(DEFAULT_TASKS), help=f"comma-separated: {', '.join(TASKS)}"
    )
    parser.add_argument("--levers", type=str, default=",".join(LEVERS), help=f"comma-separated: {', '.join(LEVERS)}")
    parser.add_argument("--seeds", type=int, default=5, help="training seeds per task and lever")
    parser.add_argument("--epochs", type=int, default=None, help="override each task's epoch budget")
    parser.add_argument(
        "--table-only",
        "--table_only",
        dest="table_only",
        action="store_true",
        help="train nothing: tabulate the seeds already finished in --out",
    )
    return parser


def run_command(ns: Namespace) -> int:
    """Run `loupe bench sparse` with parsed options."""
    result = run_sparse(
        out=ns.out,
        tasks=[t.strip() for t in ns.tasks.split(",") if t.strip()],
        levers=[lv.strip() for lv in ns.levers.split(",") if lv.strip()],
        seeds=ns.seeds,
        epochs=ns.epochs,
        table_only=ns.table_only,
    )
    for s in result["summary"]:
        print(f"{s['task']} / {s['lever']}: {s['learned']}/{s['seeds']} seeds learned")
    print(f"table: {ns.out}/sparse.md")
    return 0
