"""The `loupe` command: one table of subcommands, each a parser and a call of a keyword-only workflow function.

``loupe --help`` is generated from the table. User errors (bad settings, manifests, slides) print one line,
``loupe COMMAND: error: ...``, and exit with status 2; a batch that finished with failed slides exits 1.
"""

from __future__ import annotations

import pickle
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

from loupe.errors import ConfigError, LoupeError

if TYPE_CHECKING:
    from jsonargparse import ArgumentParser, Namespace

#: Exit status of bad input (argparse's convention) and of a batch run with failed slides.
USAGE_ERROR, PARTIAL_FAILURE = 2, 1


@dataclass(frozen=True)
class Command:
    """One subcommand: its one-line summary, its usage line, its parser and what it runs."""

    summary: str
    usage: str
    parser: Callable[[str], ArgumentParser]
    run: Callable[[Namespace, list[str]], int]


# --- parsers ------------------------------------------------------------------------------------------------------


def _parser(prog: str) -> ArgumentParser:
    from jsonargparse import ArgumentParser

    return ArgumentParser(prog=prog, exit_on_error=False)


def _train_parser(prog: str) -> ArgumentParser:
    from loupe.config import config_parser

    parser = config_parser(prog)
    parser.add_argument("--out", required=True, help="run folder (created; resumed if it holds a checkpoint)")
    return parser


def _run_parser(prog: str) -> ArgumentParser:
    """A parser for commands that use a trained run: the run folder and the inference settings."""
    from loupe.config import INFERENCE_MODES

    parser = _parser(prog)
    parser.add_argument("run", help="run folder written by `loupe train`")
    parser.add_argument(
        "--inference",
        default=None,
        choices=list(INFERENCE_MODES),
        help="joint model: pooling mode (default: the run's)",
    )
    parser.add_argument("--samples", type=int | None, default=None, help="joint model: samples averaged by mean")
    parser.add_argument(
        "--epsilon", type=float | None, default=None,
        help="joint model, --inference adaptive: stop once the top class's standard error is under this "
        "(default: the run's joint.adaptive_epsilon)",
    )  # fmt: skip
    parser.add_argument(
        "--budget", type=int | None, default=None,
        help="joint model, --inference adaptive: most patches read per slide (default: joint.adaptive_budget)",
    )  # fmt: skip
    return parser


def _evaluate_parser(prog: str) -> ArgumentParser:
    parser = _run_parser(prog)
    parser.add_argument("--split", default="test", help="manifest split to evaluate (train, val, test)")
    parser.add_argument("--out", default=None, help="output folder (default RUN/eval-SPLIT)")
    return parser


def _predict_parser(prog: str) -> ArgumentParser:
    parser = _run_parser(prog)
    parser.add_argument("slides", nargs="+", help="slide files, folders of slides, or manifest CSVs")
    parser.add_argument("--out", required=True, help="output folder (a re-run skips the slides finished there)")
    parser.add_argument(
        "--slide-mpp", "--slide_mpp", dest="slide_mpp", type=float | None, default=None,
        help="µm/px of files that record none",
    )  # fmt: skip
    parser.add_argument("--overwrite", action="store_true", help="redo slides that are already finished")
    parser.add_argument(
        "--heatmaps", action="store_true",
        help="also write each slide's PNG pictures (overlay, heatmaps, tissue); loupe view needs none of them",
    )  # fmt: skip
    parser.add_argument(
        "--workers", type=int, default=1,
        help="worker processes sharing --out (1: this one; N: N processes, one per GPU when several are visible; "
        "0: this one, preparing slides itself); on other machines, start more commands on the same --out",
    )  # fmt: skip
    parser.add_argument(
        "--loader-workers", "--loader_workers", dest="loader_workers", type=int | None, default=None,
        help="processes preparing slides ahead of the model, per worker (default 2)",
    )  # fmt: skip
    parser.add_argument(
        "--claim-expiry", "--claim_expiry", dest="claim_expiry", type=float, default=600.0,
        help="seconds without a heartbeat after which a worker's claimed slides are taken over (a dead worker on "
        "this machine: at once)",
    )  # fmt: skip
    parser.add_argument("--k", type=int | None, default=None, help="patches read per sample (default: the run's k)")
    parser.add_argument(
        "--tissue", type=bool | None, default=None, help="tissue detection on/off (default: the run's setting)"
    )
    return parser


def _info_parser(prog: str) -> ArgumentParser:
    from loupe.slides.formats import BACKENDS

    parser = _parser(prog)
    parser.add_argument("slides", nargs="+", help="slide files")
    parser.add_argument("--config", default=None, help="a config whose magnifications to place on the slide")
    parser.add_argument("--slide-mpp", "--slide_mpp", dest="slide_mpp", type=float | None, default=None)
    parser.add_argument("--backend", default="auto", choices=BACKENDS)
    return parser


def _demo_parser(prog: str) -> ArgumentParser:
    parser = _parser(prog)
    parser.add_argument("--out", default="runs/demo", help="output folder")
    parser.add_argument(
        "--signal-magnification", "--signal_magnification", dest="signal", default="highest",
        help="where the class evidence is planted: highest, lowest or a magnification label (5x, 10x, 20x)",
    )  # fmt: skip
    parser.add_argument("--epochs", type=int | None, default=None, help="override the demo preset's epochs")
    return parser


def _export_parser(prog: str) -> ArgumentParser:
    parser = _parser(prog)
    parser.add_argument("run", help="run folder written by `loupe train`")
    parser.add_argument("--out", required=True, help="weights file to write (a PyTorch state dict)")
    parser.add_argument("--checkpoint", default="best", choices=["best", "last"])
    return parser


def _export_run_parser(prog: str) -> ArgumentParser:
    parser = _parser(prog)
    parser.add_argument("run", help="run folder written by `loupe train`")
    parser.add_argument("--out", required=True, help="new folder: config.yaml and checkpoints/best.ckpt")
    parser.add_argument("--checkpoint", default="best", choices=["best", "last"])
    parser.add_argument(
        "--weights", default=None,
        help="the run's frozen encoder's weights file (or a folder holding it), when not where its config says",
    )  # fmt: skip
    return parser


def _import_bach_parser(prog: str) -> ArgumentParser:
    from loupe.datasets.bach import BACH_MPP

    parser = _parser(prog)
    parser.add_argument("root", help="the BACH dataset root (or its Photos folder)")
    parser.add_argument("--out", required=True, help="manifest CSV to write")
    parser.add_argument("--ground-truth", "--ground_truth", dest="ground_truth", default=None)
    parser.add_argument("--mpp", type=float, default=BACH_MPP, help="µm/px of the photos")
    parser.add_argument("--val-fraction", "--val_fraction", dest="val_fraction", type=float, default=0.0)
    parser.add_argument("--test-fraction", "--test_fraction", dest="test_fraction", type=float, default=0.0)
    parser.add_argument("--seed", type=int, default=0)
    return parser


def _view_parser(prog: str) -> ArgumentParser:
    parser = _parser(prog)
    parser.add_argument("folder", help="a `loupe predict` output folder (its --out), or a run folder")
    parser.add_argument("--port", type=int | None, default=None, help="TCP port (default: a free one)")
    parser.add_argument(
        "--host", default="127.0.0.1", help="address to listen on (0.0.0.0: every machine that can reach this one)"
    )
    parser.add_argument("--open", action="store_true", help="open the viewer in the default web browser")
    parser.add_argument("--split", default=None, help="a run folder's evaluated split to show (default: test)")
    return parser


# --- runners ------------------------------------------------------------------------------------------------------


def _train(ns: Namespace, args: list[str]) -> int:
    from loupe.config import config_from_namespace, parse_arguments
    from loupe.models import check_config
    from loupe.ranks import is_first_process
    from loupe.workflows.training import train

    parser = _train_parser("loupe train")
    given = parse_arguments(parser, args, defaults=False)
    cfg = check_config(config_from_namespace(parser, ns, given))
    run = train(cfg, out=ns.out)
    if is_first_process():  # of a DDP run, whose every process ends here
        print(f"run folder: {run}")
    return 0


def _evaluate(ns: Namespace, args: list[str]) -> int:
    from loupe.workflows.evaluation import evaluate

    m = evaluate(
        ns.run,
        split=ns.split,
        out=ns.out,
        inference=ns.inference,
        samples=ns.samples,
        epsilon=ns.epsilon,
        budget=ns.budget,
    )
    share = ", ".join(f"{k} {100 * v:.0f}%" for k, v in m.attention_share.items())
    print(f"{ns.split}: accuracy {_figure(m.accuracy)}, balanced {_figure(m.balanced_accuracy)}; attention {share}")
    return 0


def _predict(ns: Namespace, args: list[str]) -> int:
    import signal

    from loupe.workflows.prediction import predict

    if ns.workers < 0:
        raise ConfigError(f"--workers {ns.workers}: expected an integer ≥ 0")
    # A scheduler stops a job with SIGTERM: leave as on Ctrl-C, releasing this worker's claims for the others.
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))
    run = predict(
        ns.run,
        ns.slides,
        out=ns.out,
        inference=ns.inference,
        samples=ns.samples,
        slide_mpp=ns.slide_mpp,
        overwrite=ns.overwrite,
        workers=ns.workers,
        loader_workers=ns.loader_workers,
        claim_expiry_s=ns.claim_expiry,
        heatmaps=ns.heatmaps,
        tissue=ns.tissue,
        k=ns.k,
        epsilon=ns.epsilon,
        budget=ns.budget,
    )
    counts = run.counts()
    total = sum(counts.values())
    print(
        f"{counts['done']} of {total} slides done ({len(run.processed)} processed now), "
        f"{counts['failed']} failed: {ns.out}/status.json"
    )
    for slide_id, v in run.status.failed().items():
        print(f"  failed {slide_id}: {v['reason']}", file=sys.stderr)
    return PARTIAL_FAILURE if counts["failed"] else 0


def _info(ns: Namespace, args: list[str]) -> int:
    from loupe.slides.info import describe_slide, format_description

    mags, patch = None, None
    if ns.config:
        from loupe.config import load_config
        from loupe.models import architecture
        from loupe.workflows.common import magnifications_of

        cfg = load_config(ns.config)
        mags, patch = magnifications_of(cfg), architecture(cfg).cell_size(cfg)
    failed = 0
    for slide in ns.slides:  # one unreadable slide must not hide the others
        try:
            d = describe_slide(slide, backend=ns.backend, mpp=ns.slide_mpp, magnifications=mags, patch_size=patch)
        except LoupeError as err:
            print(f"loupe info: error: {err}", file=sys.stderr)
            failed += 1
            continue
        print(format_description(d))
    return PARTIAL_FAILURE if failed else 0


def _demo(ns: Namespace, args: list[str]) -> int:
    from loupe.workflows.demo import run_demo

    result = run_demo(out=ns.out, signal_magnification=ns.signal, epochs=ns.epochs)
    m = result.evaluation
    share = ", ".join(f"{k} {100 * v:.0f}%" for k, v in m.attention_share.items())
    print(
        f"demo: test accuracy {_figure(m.accuracy)}; attention {share} (planted at {result.signal_magnification}); "
        f"{result.timings_s.total} s; report: {ns.out}/report.md"
    )
    return 0


def _figure(value: float | None) -> str:
    """A metric to three decimals, or "n/a" where it is undefined (e.g. an empty split)."""
    return "n/a" if value is None else f"{value:.3f}"


def _export(ns: Namespace, args: list[str]) -> int:
    from loupe.workflows.export import export_patch_encoder

    path = export_patch_encoder(ns.run, out=ns.out, checkpoint=ns.checkpoint)
    print(f"wrote {path}: load it with --model.patch_pretrained {path} (and the run's model.patch_backbone)")
    return 0


def _export_run(ns: Namespace, args: list[str]) -> int:
    from loupe.workflows.export import export_run

    folder = export_run(ns.run, out=ns.out, checkpoint=ns.checkpoint, weights=ns.weights)
    print(f"wrote {folder}: a self-contained run (every tensor in checkpoints/best.ckpt, no weights file needed)")
    return 0


def _import_bach(ns: Namespace, args: list[str]) -> int:
    from loupe.datasets.bach import import_bach

    manifest = import_bach(
        ns.root,
        ns.out,
        ground_truth=ns.ground_truth,
        mpp=ns.mpp,
        val_fraction=ns.val_fraction,
        test_fraction=ns.test_fraction,
        seed=ns.seed,
    )
    counts = ", ".join(f"{c} {sum(r.label == c for r in manifest.records)}" for c in manifest.classes)
    print(f"wrote {ns.out}: {len(manifest.records)} images ({counts}) at {ns.mpp} µm/px")
    return 0


def _view(ns: Namespace, args: list[str]) -> int:
    from loupe.viewer.server import view

    view(ns.folder, host=ns.host, port=ns.port, open_browser=ns.open, split=ns.split)
    return 0


def _bench(ns: Namespace, args: list[str]) -> int:
    from loupe.bench.commands import run_bench_command

    return run_bench_command(args)


def _bench_summary() -> str:
    from loupe.bench.commands import BENCH_COMMANDS, DEFAULT

    others = "; ".join(f"`bench {name}`: {c.summary}" for name, c in BENCH_COMMANDS.items() if name != DEFAULT)
    return f"{BENCH_COMMANDS[DEFAULT].summary}; {others}"


def _bench_usage() -> str:
    from loupe.bench.commands import BENCH_COMMANDS, DEFAULT

    names = "|".join(name for name in BENCH_COMMANDS if name != DEFAULT)
    return f"bench [{names}] --out DIR [options]"


COMMANDS: dict[str, Command] = {
    "train": Command(
        "train (resumes if RUN has a last checkpoint); any setting overridable, e.g. --joint.k 10 --train.epochs 50",
        "train CONFIG --out RUN [--section.key VALUE ...]",
        _train_parser,
        _train,
    ),
    "evaluate": Command(
        "metrics.json, predictions.csv, ROC/PR/confusion PNGs of a split of the run's manifest",
        "evaluate RUN [--split test] [--out DIR]",
        _evaluate_parser,
        _evaluate,
    ),
    "predict": Command(
        "predictions.csv, status.json, timings.csv; per slide attention maps and QuPath GeoJSON (--heatmaps: PNGs "
        "too); a re-run skips finished slides (--overwrite redoes them); any number of workers may share --out "
        "(--workers N, or more commands, e.g. a SLURM array)",
        "predict RUN SLIDES_FOLDERS_OR_CSV... --out DIR [--workers N]",
        _predict_parser,
        _predict,
    ),
    "info": Command(
        "levels, dimensions, µm/px, vendor (and which level each magnification of a config reads)",
        "info SLIDE... [--config CONFIG]",
        _info_parser,
        _info,
    ),
    "demo": Command(
        "generate synthetic slides, train, evaluate, predict, report",
        "demo --out DIR [--signal-magnification highest|lowest|LABEL]",
        _demo_parser,
        _demo,
    ),
    "export": Command(
        "a self-contained copy of a run to share: its config and one checkpoint holding every tensor (a frozen "
        "encoder's too)",
        "export RUN --out DIR [--checkpoint best|last] [--weights FILE]",
        _export_run_parser,
        _export_run,
    ),
    "export-encoder": Command(
        "a trained run's patch network as a weights file, to load as an encoder (e.g. frozen) in another run",
        "export-encoder RUN --out FILE.pt",
        _export_parser,
        _export,
    ),
    "import-bach": Command(
        "a manifest of the BACH challenge photos (Normal/Benign/InSitu/Invasive, 0.42 µm/px)",
        "import-bach ROOT --out MANIFEST.csv",
        _import_bach_parser,
        _import_bach,
    ),
    "view": Command(
        "the slides of a predict output folder in the browser: cohort table, deep zoom, attention per "
        "magnification, the patches read (needs loupe[viewer])",
        "view OUT [--port N] [--host 127.0.0.1] [--open]",
        _view_parser,
        _view,
    ),
    "bench": Command(_bench_summary(), _bench_usage(), _parser, _bench),
}


def usage() -> str:
    """``loupe --help``, generated from :data:`COMMANDS`."""
    import textwrap

    from loupe import __version__

    width = max(len(name) for name in COMMANDS)
    indent = " " * (width + 4)
    lines = [f"usage: loupe COMMAND [options]   (loupe {__version__})", "", "commands:"]
    for name, cmd in COMMANDS.items():
        lines.append(f"  {name:<{width}}  loupe {cmd.usage}")
        lines += textwrap.wrap(cmd.summary, 110, initial_indent=indent, subsequent_indent=indent)
    lines += ["", "`loupe COMMAND --help` lists a command's options."]
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the console script; user errors print one clear line (exit status 2), not a traceback."""
    args = list(sys.argv[1:] if argv is None else argv)
    if not args or args[0] in ("-h", "--help"):
        print(usage())
        return 0 if args else USAGE_ERROR
    if args[0] in ("-V", "--version"):
        from loupe import __version__

        print(f"loupe {__version__}")
        return 0
    name, rest = args[0], args[1:]
    command = COMMANDS.get(name)
    if command is None:
        print(f"loupe: error: unknown command {name!r}\n\n{usage()}", file=sys.stderr)
        return USAGE_ERROR
    from loupe.console import configure_console

    configure_console(with_lightning=name not in ("info", "import-bach", "view"))
    try:
        if name == "bench":  # parses its subcommand's options (loupe.bench.commands)
            return command.run(_empty_namespace(), rest)
        if name == "train" and rest and not rest[0].startswith("-"):
            rest = ["--config", rest[0], *rest[1:]]  # `loupe train CONFIG ...`
        from loupe.config import parse_arguments

        ns = parse_arguments(command.parser(f"loupe {name}"), rest)
        return command.run(ns, rest)
    except LoupeError as err:
        print(f"loupe {name}: error: {err}", file=sys.stderr)
        return USAGE_ERROR
    except OSError as err:
        from loupe.errors import is_write_refusal, output_error

        if not is_write_refusal(err):
            raise
        print(f"loupe {name}: error: {output_error(err)}", file=sys.stderr)  # full disk, read-only folder
        return USAGE_ERROR
    except pickle.UnpicklingError as err:  # a weights-only load refused a file holding other objects
        reason = " ".join(str(err).split())[:300]
        print(
            f"loupe {name}: error: refused to load a checkpoint or weights file holding Python objects other than "
            f"weights ({reason}); loupe loads such files weights-only, so that they cannot run code",
            file=sys.stderr,
        )
        return USAGE_ERROR


def _empty_namespace() -> Namespace:
    from jsonargparse import Namespace

    return Namespace()


if __name__ == "__main__":
    sys.exit(main())
