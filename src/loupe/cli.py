"""The `loupe` command: thin parsing over the Python API (loupe.workflows, loupe.slides)."""

from __future__ import annotations

import logging
import sys
from collections.abc import Sequence

from loupe.errors import LoupeError

COMMANDS = ("train", "evaluate", "predict", "info", "demo", "import-bach", "bench")

USAGE = """usage: loupe COMMAND [options]

commands:
  train CONFIG --out RUN          train (resumes if RUN has a last checkpoint); any option overridable,
                                  e.g. --model.k 10 --train.epochs 50
  evaluate RUN --split test --out DIR
                                  metrics.json, predictions.csv, ROC/PR/confusion PNGs
  predict RUN SLIDES_FOLDERS_OR_CSV... --out DIR
                                  predictions.csv, status.json, timings.csv; per slide attention maps (.npz),
                                  QuPath GeoJSON, heatmap PNGs; a re-run skips finished slides (--overwrite)
  info SLIDE [--config CONFIG]    levels, dimensions, µm/px, vendor (and which level each magnification reads)
  demo --out DIR [--signal-magnification highest|lowest|LABEL]
                                  generate synthetic slides, train, evaluate, predict, report
  import-bach ROOT --out MANIFEST.csv
                                  a manifest of the BACH challenge photos (Normal/Benign/InSitu/Invasive, 0.42 µm/px)
  bench [--config CONFIG] --out DIR [--quick]
                                  the paper's speed tables (train s/epoch, inference ms/image: each magnification
                                  with k and all patches, combined, joint) and a profile: DIR/bench.md, bench.json;
                                  no --config: generated images of the BACH geometry, tiny backbone
  bench --accuracy [--config CONFIG] --out DIR
                                  train and evaluate joint, each single magnification, all patches and gated MIL
                                  on the same splits (default: the demo dataset): DIR/accuracy.md
  bench streaming ...             the streaming engine's benchmark (`loupe bench streaming --help`)

`loupe COMMAND --help` lists a command's options.
"""


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the console script; user errors print one clear line, not a traceback."""
    args = list(sys.argv[1:] if argv is None else argv)
    if not args or args[0] in ("-h", "--help"):
        print(USAGE)
        return 0 if args else 2
    command, rest = args[0], args[1:]
    if command not in COMMANDS:
        print(f"loupe: unknown command {command!r}\n\n{USAGE}", file=sys.stderr)
        return 2
    logging.basicConfig(level=logging.INFO, format="loupe: %(message)s")
    try:
        return globals()[f"_{command.replace('-', '_')}"](rest)
    except LoupeError as err:
        print(f"loupe {command}: error: {err}", file=sys.stderr)
        return 1


def _train(args: list[str]) -> int:
    from loupe.config import config_from_namespace, config_parser
    from loupe.workflows.training import train

    if args and not args[0].startswith("-"):
        args = ["--config", args[0], *args[1:]]
    parser = config_parser("loupe train")
    parser.add_argument("--out", required=True, help="run folder (created; resumed if it holds a checkpoint)")
    ns = parser.parse_args(args)
    run = train(config_from_namespace(parser, ns), ns.out)
    print(f"run folder: {run}")
    return 0


def _run_parser(prog: str):
    """A parser for commands that use a trained run: the run folder and the inference mode."""
    from jsonargparse import ArgumentParser

    from loupe.config import INFERENCE_MODES

    parser = ArgumentParser(prog=prog)
    parser.add_argument("run", help="run folder written by `loupe train`")
    parser.add_argument("--inference", default=None, choices=list(INFERENCE_MODES), help="default: the run's")
    parser.add_argument("--samples", type=int, default=None, help="samples averaged by --inference mean")
    return parser


def _evaluate(args: list[str]) -> int:
    from loupe.workflows.evaluation import evaluate

    parser = _run_parser("loupe evaluate")
    parser.add_argument("--split", default="test", help="manifest split to evaluate (train, val, test)")
    parser.add_argument("--out", default=None, help="output folder (default RUN/eval-SPLIT)")
    ns = parser.parse_args(args)
    m = evaluate(ns.run, ns.split, ns.out, ns.inference, ns.samples)
    share = ", ".join(f"{k} {100 * v:.0f}%" for k, v in m["attention_share"].items())
    print(f"{ns.split}: accuracy {m['accuracy']:.3f}, balanced {m['balanced_accuracy']:.3f}; attention {share}")
    return 0


def _predict(args: list[str]) -> int:
    from loupe.workflows.prediction import predict

    parser = _run_parser("loupe predict")
    parser.add_argument("slides", nargs="+", help="slide files, folders of slides, or manifest CSVs")
    parser.add_argument("--out", required=True, help="output folder (a re-run skips the slides finished there)")
    parser.add_argument(
        "--slide-mpp", "--slide_mpp", dest="slide_mpp", type=float, default=None, help="µm/px of files that record none"
    )
    parser.add_argument("--overwrite", action="store_true", help="redo slides that are already finished")
    parser.add_argument("--workers", type=int, default=2, help="processes preparing slides ahead of the model")
    parser.add_argument("--k", type=int, default=None, help="patches read per sample (default: the run's k)")
    parser.add_argument(
        "--tissue", type=bool | None, default=None, help="tissue detection on/off (default: the run's setting)"
    )
    ns = parser.parse_args(args)
    run = predict(
        ns.run, ns.slides, ns.out, ns.inference, ns.samples, ns.slide_mpp, ns.overwrite, ns.workers, ns.tissue, ns.k
    )
    counts = run.counts()
    total = sum(counts.values())
    print(
        f"{counts['done']} of {total} slides done ({len(run.processed)} processed now), "
        f"{counts['failed']} failed: {ns.out}/status.json"
    )
    for slide_id, v in run.status.failed().items():
        print(f"  failed {slide_id}: {v['reason']}", file=sys.stderr)
    return 1 if counts["failed"] else 0


def _info(args: list[str]) -> int:
    from jsonargparse import ArgumentParser

    from loupe.slides.info import describe_slide, format_description

    parser = ArgumentParser(prog="loupe info")
    parser.add_argument("slides", nargs="+", help="slide files")
    parser.add_argument("--config", default=None, help="a config whose magnifications to place on the slide")
    parser.add_argument("--slide-mpp", "--slide_mpp", dest="slide_mpp", type=float, default=None)
    parser.add_argument("--backend", default="auto", choices=["auto", "openslide", "tiffslide", "image"])
    ns = parser.parse_args(args)
    mags, patch = None, None
    if ns.config:
        from loupe.config import load_config
        from loupe.workflows.common import magnifications_of

        cfg = load_config(ns.config)
        mags, patch = magnifications_of(cfg), cfg.model.patch_size
    failed = 0
    for slide in ns.slides:  # one unreadable slide must not hide the others
        try:
            d = describe_slide(slide, backend=ns.backend, mpp=ns.slide_mpp, magnifications=mags, patch_size=patch)
        except LoupeError as err:
            print(f"loupe info: error: {err}", file=sys.stderr)
            failed += 1
            continue
        print(format_description(d))
    return 1 if failed else 0


def _demo(args: list[str]) -> int:
    from jsonargparse import ArgumentParser

    from loupe.workflows.demo import run_demo

    parser = ArgumentParser(prog="loupe demo")
    parser.add_argument("--out", default="runs/demo", help="output folder")
    parser.add_argument(
        "--signal-magnification",
        "--signal_magnification",
        dest="signal",
        default="highest",
        help="where the class evidence is planted: highest, lowest or a magnification label (5x, 10x, 20x)",
    )
    parser.add_argument("--epochs", type=int, default=None, help="override the demo preset's epochs")
    ns = parser.parse_args(args)
    m = run_demo(ns.out, ns.signal, ns.epochs)
    share = ", ".join(f"{k} {100 * v:.0f}%" for k, v in m["attention_share"].items())
    print(
        f"demo: test accuracy {m['accuracy']:.3f}; attention {share} (planted at {m['signal_magnification']}); "
        f"{m['timings_s']['total']} s; report: {ns.out}/report.md"
    )
    return 0


def _import_bach(args: list[str]) -> int:
    from jsonargparse import ArgumentParser

    from loupe.data.bach import BACH_MPP, import_bach

    parser = ArgumentParser(prog="loupe import-bach")
    parser.add_argument("root", help="the BACH dataset root (or its Photos folder)")
    parser.add_argument("--out", required=True, help="manifest CSV to write")
    parser.add_argument("--ground-truth", "--ground_truth", dest="ground_truth", default=None)
    parser.add_argument("--mpp", type=float, default=BACH_MPP, help="µm/px of the photos")
    parser.add_argument("--val-fraction", "--val_fraction", dest="val_fraction", type=float, default=0.0)
    parser.add_argument("--test-fraction", "--test_fraction", dest="test_fraction", type=float, default=0.0)
    parser.add_argument("--seed", type=int, default=0)
    ns = parser.parse_args(args)
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


def _bench(args: list[str]) -> int:
    if args and args[0] == "streaming":
        from loupe.bench.streaming import streaming_command

        return streaming_command(args[1:])
    from loupe.bench import bench_command

    return bench_command(args)


if __name__ == "__main__":
    sys.exit(main())
