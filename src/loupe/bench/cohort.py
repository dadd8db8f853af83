"""`loupe bench accuracy`: is the joint model as accurate as its baselines on *my* cohort, and at what cost?

Any labelled manifest and a base config (a joint model's) go in. The manifest is cut into k stratified,
patient-grouped cross-validation folds (``data.folds`` / ``data.fold``: the folds `loupe train` makes, val drawn from
the other folds), and every method is trained by `loupe train` on the same folds with the same encoder, epochs and
optimiser (:func:`loupe.bench.accuracy.baseline_configs`): the joint model, each single magnification with the same
k, all patches (the exhaustive estimator) and gated-attention MIL over every tissue tile of the highest
magnification. Each fold's test slides are scored through the one inference path (:func:`infer`).

Per fold and method: accuracy, balanced accuracy, macro AUC-ROC, patches read per slide (distinct cells), train
seconds per epoch (the training pass, validation excluded) and inference seconds per slide; then mean ± standard
deviation over folds, as ``cohort.md``, ``cohort.json`` and ``cohort.png`` (accuracy against patches read per slide).
The trained joint model of each fold is also read at several patch budgets: one draw of B patches (fixed k = B)
and, where the model offers it, adaptive inference (rounds of k until the top class's standard error is under ε,
at most B patches).

With a frozen patch encoder (``model.freeze_patch_backbone``) every method reads through the shared embedding cache
(``data.cache_dir``): a cell is embedded once for all methods and folds. Resumable: each finished fold × method is
a ``row.json`` (written atomically) that a second run reads instead of training again; a killed training resumes
from its last checkpoint.
"""

from __future__ import annotations

import dataclasses
import json
import statistics
import time
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import lightning as L
import numpy as np

from loupe.bench.commands import new_parser
from loupe.bench.speed import Log
from loupe.bench.timing import sync
from loupe.config import Config, JointConfig, load_config
from loupe.console import progress
from loupe.errors import ConfigError
from loupe.reports import classification_metrics, write_json, write_text

if TYPE_CHECKING:
    from jsonargparse import ArgumentParser, Namespace

    from loupe.models import InferenceSettings

#: The figures of a row, and how the table names them.
METRICS: dict[str, str] = {
    "accuracy": "accuracy",
    "balanced_accuracy": "balanced acc.",
    "auc_roc_macro": "AUC-ROC (macro)",
    "patches_per_slide": "patches read / slide",
    "train_s_per_epoch": "train s / epoch",
    "infer_s_per_slide": "inference s / slide",
}
#: The joint model's inference at each budget: one draw of B patches, and adaptive rounds of k up to B.
BUDGET_MODES = ("fixed", "adaptive")
#: Adaptive inference stops once the top class's Monte-Carlo standard error is under this.
DEFAULT_EPSILON = 0.05


class TrainingPassTimer(L.Callback):
    """Wall time of each epoch's training pass (first batch to the end of the last: validation, which Lightning
    runs inside the epoch, and checkpoint writing are not training)."""

    def __init__(self) -> None:
        self.seconds: list[float] = []
        self._start: float | None = None
        self._end = 0.0

    def on_train_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        sync(pl_module.device)
        self._start = time.perf_counter()

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, *args: Any) -> None:
        sync(pl_module.device)
        self._end = time.perf_counter()

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self._start is not None and self._end >= self._start:
            self.seconds.append(self._end - self._start)
        self._start = None


def method_configs(cfg: Config) -> dict[str, Config]:
    """Method name → config: the joint model, each single magnification, all patches, gated MIL."""
    from loupe.bench.accuracy import baseline_configs

    return baseline_configs(cfg)


def fold_config(cfg: Config, folds: int, fold: int, epochs: int | None) -> Config:
    """``cfg`` on cross-validation fold ``fold`` of ``folds`` (its split column ignored), quiet, maybe fewer epochs."""
    data = dataclasses.replace(cfg.data, folds=folds, fold=fold)
    train = dataclasses.replace(cfg.train, progress_bar=False, epochs=epochs or cfg.train.epochs)
    return dataclasses.replace(cfg, data=data, train=train)


def score(run: Path, settings: InferenceSettings | None = None) -> tuple[dict[str, Any], dict[str, Any]]:
    """Score a trained run on its test split through :func:`infer`: (figures, the inference settings used)."""
    from loupe.data.manifest import load_manifest
    from loupe.models import resolve_inference
    from loupe.workflows.common import load_run, make_catalog
    from loupe.workflows.inference import infer

    cfg, model, _ = load_run(run)
    assert cfg.data.manifest is not None  # a run folder's config pins its split manifest
    manifest = load_manifest(cfg.data.manifest, cfg.data.classes).subset("test")
    records = list(manifest.records)
    catalog = make_catalog(records, cfg)
    settings = settings or resolve_inference(cfg)
    try:
        start = time.perf_counter()
        result = infer(model, catalog, list(range(len(records))), cfg, settings)
        seconds = time.perf_counter() - start
    finally:
        catalog.close()
    probs = np.stack([p.probs for p in result])
    metrics = classification_metrics(manifest.label_indices(), probs, list(manifest.classes))
    read = [patches_read(p) for p in result]
    figures = {
        "accuracy": metrics["accuracy"],
        "balanced_accuracy": metrics["balanced_accuracy"],
        "auc_roc_macro": metrics["auc_roc_macro"],
        "patches_per_slide": float(np.mean(read)),
        "infer_s_per_slide": seconds / len(records),
        "n_test": len(records),
    }
    return figures, settings.record() | dict(_adaptive_record(settings))


def patches_read(prediction: Any) -> int:
    """Distinct patches a prediction read: the model's own count where it gives one, else its distinct cells."""
    count = getattr(prediction, "patches_read", 0)
    return int(count) if count else len(np.unique(prediction.cells))


def _adaptive_record(settings: InferenceSettings) -> dict[str, Any]:
    if settings.mode != "adaptive":
        return {}
    return {k: getattr(settings, k) for k in ("epsilon", "budget") if getattr(settings, k, None) is not None}


def budget_settings(cfg: Config, mode: str, budget: int, epsilon: float) -> InferenceSettings:
    """The joint model's inference at a patch budget: ``fixed`` one draw of ``budget`` patches; ``adaptive``
    rounds of the run's k until the top class's standard error is under ``epsilon``. Checked as `loupe evaluate`'s
    options are (:func:`~loupe.models.resolve_inference`): a budget below k is one :class:`ConfigError`."""
    from loupe.models import resolve_inference

    if mode == "fixed":
        return resolve_inference(cfg, "sample", samples=1, k=budget)
    return resolve_inference(cfg, "adaptive", samples=1, epsilon=epsilon, budget=budget)


def run_method(cfg: Config, folder: Path) -> dict[str, Any]:
    """Train one method on one fold into ``folder/run`` (resuming a killed run), then score it on the test split."""
    from loupe.workflows.training import train

    timer = TrainingPassTimer()
    start = time.perf_counter()
    run = train(cfg, out=folder / "run", callbacks=[timer])
    wall = time.perf_counter() - start
    figures, settings = score(run)
    return figures | {
        "train_s_per_epoch": statistics.fmean(timer.seconds) if timer.seconds else None,
        "epochs_timed": len(timer.seconds),
        "train_wall_s": wall,
        "inference": settings,
    }


def _slug(name: str) -> str:
    return "".join(c if c.isalnum() or c in "-." else "_" for c in name)


def _cached(path: Path) -> dict[str, Any] | None:
    """A finished row, or None (absent; a half-written file cannot exist: rows are written atomically)."""
    return json.loads(path.read_text()) if path.is_file() else None


def summarise(rows: Sequence[dict[str, Any]], names: Sequence[str]) -> list[dict[str, Any]]:
    """Per method: mean and standard deviation over folds of every figure (sd 0 with one fold; None: not measured)."""
    out = []
    for name in names:
        rs = [r for r in rows if r["method"] == name]
        if not rs:
            continue
        entry: dict[str, Any] = {"method": name, "folds": len(rs)}
        for key in METRICS:
            values = [float(r[key]) for r in rs if r.get(key) is not None]
            entry[key] = statistics.fmean(values) if values else None
            entry[f"{key}_sd"] = statistics.pstdev(values) if len(values) > 1 else (0.0 if values else None)
        out.append(entry)
    return out


def cohort_markdown(result: dict[str, Any]) -> str:
    """The table (mean ± sd over folds), the budget table, and each fold's figures."""
    s = result["settings"]

    def cell(entry: dict[str, Any], key: str) -> str:
        mean, sd = entry.get(key), entry.get(f"{key}_sd")
        if mean is None:
            return "–"
        fmt = "{:.3f}" if key in ("accuracy", "balanced_accuracy", "auc_roc_macro", "infer_s_per_slide") else "{:.1f}"
        return f"{fmt.format(mean)} ± {fmt.format(sd or 0.0)}"

    lines = [
        f"# loupe bench accuracy: {s['dataset']}",
        "",
        f"{s['folds']}-fold cross-validation (stratified, patient-grouped; val drawn from the other folds), "
        f"{s['slides']} slides, {s['epochs']} epochs, patch network {s['patch_backbone']}"
        f"{' (frozen)' if s['frozen'] else ''}, k = {s['k']}, magnifications {', '.join(s['magnifications'])}. "
        "Mean ± standard deviation over folds.",
        "",
        "| method | " + " | ".join(METRICS.values()) + " |",
        "|---|" + "---|" * len(METRICS),
    ]
    lines += [f"| {e['method']} | " + " | ".join(cell(e, k) for k in METRICS) + " |" for e in result["summary"]]
    if result["budgets"]:
        lines += [
            "",
            f"The joint model of each fold at patch budgets B: fixed = one draw of B patches; adaptive = rounds of "
            f"k = {s['k']} patches, no cell read twice, until the top class's standard error < ε = {s['epsilon']} "
            "or B patches are read.",
            "",
            "| inference | budget B | accuracy | balanced acc. | patches read / slide | inference s / slide |",
            "|---|---|---|---|---|---|",
        ]
        for e in result["budgets"]:
            lines.append(
                f"| {e['mode']} | {e['budget']} | {cell(e, 'accuracy')} | {cell(e, 'balanced_accuracy')} | "
                f"{cell(e, 'patches_per_slide')} | {cell(e, 'infer_s_per_slide')} |"
            )
    lines += ["", "Per fold:", "", "| method | fold | " + " | ".join(METRICS.values()) + " |"]
    lines += ["|---|---|" + "---|" * len(METRICS)]
    for r in result["rows"]:
        values = [
            "–" if r.get(k) is None else (f"{r[k]:.3f}" if k != "patches_per_slide" else f"{r[k]:.1f}") for k in METRICS
        ]
        lines.append(f"| {r['method']} | {r['fold']} | " + " | ".join(values) + " |")
    lines += ["", f"Wall time of this invocation: {result['wall_s']:.0f} s."]
    return "\n".join(lines) + "\n"


def plot_cohort(result: dict[str, Any], path: Path) -> Path:
    """Accuracy against patches read per slide: one point per method (error bars: sd over folds, both axes), the
    joint model's budgets as lines."""
    from matplotlib.figure import Figure
    from matplotlib.ticker import NullFormatter

    from loupe.reports.plots import save_figure

    fig = Figure(figsize=(6.5, 4.5))
    ax = fig.add_subplot()
    markers = "os^vDPX*<>"
    for n, e in enumerate(result["summary"]):
        ax.errorbar(e["patches_per_slide"], e["accuracy"], xerr=e["patches_per_slide_sd"], yerr=e["accuracy_sd"],
                    fmt=markers[n % len(markers)], capsize=3, label=e["method"])  # fmt: skip
    for mode, style in zip(BUDGET_MODES, ("--", "-"), strict=True):
        pts = sorted((e for e in result["budgets"] if e["mode"] == mode), key=lambda e: e["patches_per_slide"])
        if pts:
            ax.errorbar([e["patches_per_slide"] for e in pts], [e["accuracy"] for e in pts],
                        yerr=[e["accuracy_sd"] for e in pts], linestyle=style, marker=".", capsize=2, alpha=0.7,
                        label=f"joint, {mode} budgets")  # fmt: skip
    ax.set_xscale("log")
    xs = [e["patches_per_slide"] for e in [*result["summary"], *result["budgets"]] if e["patches_per_slide"]]
    if xs:  # 5, 10, 20 rather than 5×10⁰: plain labels at 1-2-5 steps over the data's range
        ticks = [m * 10**d for d in range(-1, 7) for m in (1, 2, 5) if min(xs) / 1.5 <= m * 10**d <= max(xs) * 1.5]
        ax.set_xticks(ticks, [f"{t:g}" for t in ticks])
        ax.xaxis.set_minor_formatter(NullFormatter())
    ax.set(xlabel="patches read per slide (log scale)", ylabel="accuracy (mean ± sd over folds)")
    ax.set_title(f"{result['settings']['dataset']}: {result['settings']['folds']} folds", fontsize="small")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize="x-small", loc="best")
    return save_figure(fig, path)


def run_cohort(
    *,
    config: str | Path | Config,
    out: str | Path,
    folds: int = 5,
    epochs: int | None = None,
    methods: Sequence[str] | None = None,
    budgets: Sequence[int] = (),
    epsilon: float = DEFAULT_EPSILON,
    dataset: str | None = None,
    log: Log = print,
    bar: bool | None = None,
) -> dict[str, Any]:
    """Cross-validate every method of :func:`method_configs` (or ``methods``) on ``config``'s manifest into ``out``
    (``out/fold<f>/<method>/``: the run and its ``row.json``); write cohort.json, cohort.md and cohort.png; return
    the result. ``budgets``: patch budgets at which each fold's joint model is also read (fixed and adaptive)."""
    out = Path(out)
    cfg = config if isinstance(config, Config) else load_config(config)
    if not isinstance(cfg.section(), JointConfig):
        raise ConfigError(
            f"{config}: model.architecture {cfg.model.architecture}: `loupe bench accuracy` derives its baselines "
            f"from a joint model's config; give one with model.architecture {JointConfig.name}"
        )
    if folds < 2:
        raise ConfigError(f"loupe bench accuracy: --folds {folds}: cross-validation needs at least 2")
    if epochs is not None and epochs < 1:
        raise ConfigError(f"loupe bench accuracy: --epochs {epochs}: expected at least 1")
    if any(b < 1 for b in budgets):
        raise ConfigError(f"loupe bench accuracy: --budgets {list(budgets)}: every budget must be at least 1")
    if not 0.0 < epsilon < 1.0:
        raise ConfigError(f"loupe bench accuracy: --epsilon {epsilon}: expected a standard error in (0, 1)")
    every = method_configs(cfg)
    names = list(methods or every)
    for name in names:
        if name not in every:
            raise ConfigError(f"loupe bench accuracy: unknown method {name!r}; this config's: {', '.join(every)}")
    for mode in BUDGET_MODES:  # a budget below k is refused before anything is trained
        for b in budgets:
            budget_settings(every["joint"], mode, b, epsilon)
    from loupe.workflows.training import prepare_manifest

    n_slides = len(prepare_manifest(fold_config(cfg, folds, 0, epochs)).records)  # checks the folds can be made
    start = time.perf_counter()
    rows: list[dict[str, Any]] = []
    budget_rows: list[dict[str, Any]] = []
    jobs = [(f, name) for f in range(folds) for name in names]
    with progress(len(jobs), "runs", label="bench accuracy", bar=bar) as shown:
        say = shown.print if log is print else log
        for f, name in jobs:
            folder = out / f"fold{f}" / _slug(name)
            done = folder / "row.json"
            row = _cached(done)
            if row is None:
                row = {"method": name, "fold": f} | run_method(fold_config(every[name], folds, f, epochs), folder)
                write_json(done, row)
                say(
                    f"fold {f} / {name}: accuracy {row['accuracy']:.3f}, {row['patches_per_slide']:.1f} patches "
                    f"per slide, {row['train_wall_s']:.0f} s"
                )
            rows.append(row)
            if name == "joint":
                budget_rows += _budget_rows(every[name], folder, f, budgets, epsilon, say)
            shown.advance()
    budget_summary = [
        {"mode": mode, "budget": b} | s
        for mode in BUDGET_MODES
        for b in budgets
        for s in summarise([r for r in budget_rows if r["mode"] == mode and r["budget"] == b], ["joint"])
    ]
    model = cfg.model
    result = {
        "settings": {
            "dataset": dataset or str(cfg.data.manifest),
            "folds": folds,
            "slides": n_slides,
            "epochs": epochs or cfg.train.epochs,
            "patch_backbone": model.patch_backbone,
            "frozen": model.freeze_patch_backbone,
            "k": cfg.joint.k,
            "magnifications": list(model.magnification_labels or model.magnifications),
            "methods": names,
            "budgets": list(budgets),
            "epsilon": epsilon,
        },
        "summary": summarise(rows, names),
        "budgets": budget_summary,
        "rows": rows,
        "budget_rows": budget_rows,
        "wall_s": time.perf_counter() - start,
    }
    write_json(out / "cohort.json", result)
    write_text(out / "cohort.md", cohort_markdown(result))
    plot_cohort(result, out / "cohort.png")
    return result


def _budget_rows(
    cfg: Config, folder: Path, fold: int, budgets: Sequence[int], epsilon: float, say: Log
) -> list[dict[str, Any]]:
    """The fold's trained joint model read at each budget (each result a file of its own, reused when present)."""
    rows = []
    for mode in BUDGET_MODES:
        for b in budgets:
            path = folder / f"budget-{mode}-{b}.json"
            row = _cached(path)
            if row is None:
                settings = budget_settings(cfg, mode, b, epsilon)
                figures, record = score(folder / "run", settings)
                row = {"method": "joint", "mode": mode, "budget": b, "fold": fold, "inference": record} | figures
                write_json(path, row)
                say(f"fold {fold} / joint {mode} B={b}: accuracy {row['accuracy']:.3f}, {row['patches_per_slide']:.1f} "
                    "patches per slide")  # fmt: skip
            rows.append(row)
    return rows


def _ints(text: str) -> list[int]:
    try:
        return [int(t) for t in text.split(",") if t.strip()]
    except ValueError:
        raise ConfigError(f"--budgets {text!r}: expected comma-separated integers, e.g. 5,10,20") from None


def build_parser(prog: str) -> ArgumentParser:
    """`loupe bench accuracy --config CONFIG --out DIR [--folds N] [--epochs E] [--methods ...] [--budgets ...]`."""
    parser = new_parser(prog, description=__doc__.splitlines()[0])
    parser.add_argument("--config", type=str, required=True, help="a joint model's config (its manifest: any cohort)")
    parser.add_argument("--out", type=str, required=True, help="folder for cohort.md/.json/.png and the runs")
    parser.add_argument("--folds", type=int, default=5, help="cross-validation folds (stratified, patient-grouped)")
    parser.add_argument("--epochs", type=int, default=None, help="override the config's epochs (every method)")
    parser.add_argument(
        "--methods", type=str, default=None, help="comma-separated subset (default: every method of the config)"
    )
    parser.add_argument(
        "--budgets", type=str, default="", help="comma-separated patch budgets for the joint model's fixed/adaptive k"
    )
    parser.add_argument(
        "--epsilon", type=float, default=DEFAULT_EPSILON, help="adaptive: stop when the top class's s.e. is below"
    )
    return parser


def run_command(ns: Namespace) -> int:
    """Run `loupe bench accuracy` with parsed options."""
    result = run_cohort(
        config=ns.config,
        out=ns.out,
        folds=ns.folds,
        epochs=ns.epochs,
        methods=[m.strip() for m in ns.methods.split(",") if m.strip()] if ns.methods else None,
        budgets=_ints(ns.budgets),
        epsilon=ns.epsilon,
    )
    for e in result["summary"]:
        print(f"{e['method']}: accuracy {e['accuracy']:.3f} ± {e['accuracy_sd']:.3f}, "
              f"{e['patches_per_slide']:.1f} patches per slide")  # fmt: skip
    print(f"table: {ns.out}/cohort.md")
    return 0
