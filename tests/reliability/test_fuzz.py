"""Malformed input, tried systematically (hypothesis, fixed seed, bounded examples): manifests, configs and slide
ids that would escape or break outputs. Every case ends in a correct result or in one message naming the file
(exit status 2 from the CLI), never in a traceback, and never in a path outside the output folder.

``LOUPE_FUZZ_EXAMPLES`` sets the examples per property (default 60); ``LOUPE_FUZZ_RANDOM=1`` draws new ones
each run instead of the fixed sequence (benchmarks/soak.py uses both)."""

from __future__ import annotations

import contextlib
import csv
import io
import json
import os
from pathlib import Path

import pytest
import yaml
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from loupe.cli import main
from loupe.data.manifest import load_manifest, unsafe_slide_id
from loupe.errors import ManifestError

from .conftest import run_loupe

EXAMPLES = int(os.environ.get("LOUPE_FUZZ_EXAMPLES", "60"))
FUZZ = settings(
    max_examples=EXAMPLES,
    derandomize=os.environ.get("LOUPE_FUZZ_RANDOM") != "1",
    deadline=None,
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture, HealthCheck.data_too_large],
)

#: Cell values a spreadsheet or a scanner export produces, and ones that try to escape the output folder.
NASTY = [
    "", " ", "a.svs", "b c.svs", "d,e.svs", "C:\\slides\\x.svs", "\\\\server\\share\\y.svs", "../../x", "/abs",
    "/etc/passwd", ".", "..", ".hidden", "naïve ünïcode", "tumour ", " normal", "NaN", "nan", "inf", "-1", "0",
    "0.25", "1e9", "train", "TRAIN", "validation", "holdout", 'quo"te', "semi;colon", "tab\there", "new\nline",
    "=HYPERLINK(\"x\")", "<script>", "# head", "| pipe |", "`tick`", "x" * 300, "\x00nul", "\u202eevil",
    "~nosuchuser/a.svs", "~/a.svs",
]  # fmt: skip
COLUMNS = ["slide_id", "path", "label", "split", "mpp", "group", "patient", "extra", "PATH", " Label "]


@pytest.fixture(scope="module")
def slide_files(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A folder with a few files that manifests may name (existence is all a manifest check needs)."""
    folder = tmp_path_factory.mktemp("fuzz-slides")
    for name in ("a.svs", "b c.svs", "d,e.svs", "naïve ünïcode"):
        (folder / name).write_bytes(b"x")
    return folder


def _csv_text(header: list[str], rows: list[list[str]], delimiter: str) -> str:
    buffer = io.StringIO()
    writer = csv.writer(buffer, delimiter=delimiter, quoting=csv.QUOTE_MINIMAL, lineterminator="\r\n")
    writer.writerow(header)
    writer.writerows(rows)
    return buffer.getvalue()


@st.composite
def manifests(draw: st.DrawFn) -> bytes:
    """Manifest files: random bytes, or CSVs of nasty cells in various delimiters, encodings and BOMs."""
    if draw(st.integers(0, 5)) == 0:
        return draw(st.binary(max_size=400))
    header = draw(st.lists(st.sampled_from(COLUMNS), min_size=1, max_size=6))
    cell = st.sampled_from(NASTY) | st.text(max_size=12)
    rows = draw(st.lists(st.lists(cell, min_size=0, max_size=len(header) + 1), max_size=8))
    if rows and draw(st.booleans()):
        rows.append(list(rows[0]))  # a duplicated row: duplicate slide ids
    text = _csv_text(header, rows, draw(st.sampled_from([",", ";", "\t", "|"])))
    encoding = draw(st.sampled_from(["utf-8", "utf-8-sig", "utf-16", "latin-1", "cp1252"]))
    return text.encode(encoding, errors="replace")


@FUZZ
@given(content=manifests(), require_labels=st.booleans())
@example(content=b"path\r\n~0\r\n", require_labels=False)  # found by the soak: a RuntimeError from expanduser
def test_any_manifest_loads_correctly_or_fails_with_one_message(
    slide_files: Path, tmp_path_factory: pytest.TempPathFactory, content: bytes, require_labels: bool
) -> None:
    path = slide_files / "manifest.csv"
    path.write_bytes(content)
    try:
        manifest = load_manifest(path, require_labels=require_labels)
    except ManifestError as err:
        assert str(path) in str(err)  # names the file (and, per problem, the row and the fix)
        return
    out = tmp_path_factory.getbasetemp() / "out"
    ids = [r.slide_id for r in manifest.records]
    assert len(set(ids)) == len(ids)
    for rec in manifest.records:
        assert unsafe_slide_id(rec.slide_id) is None
        assert rec.path.is_absolute() and rec.path.exists()
        for place in (out / "slides" / rec.slide_id, out / "state" / f"{rec.slide_id}.json"):
            assert place.resolve().parent in ((out / "slides").resolve(), (out / "state").resolve())
        assert rec.mpp is None or rec.mpp > 0
        assert rec.split in (None, "train", "val", "test")
        assert not require_labels or rec.label


def _cli(args: list[str]) -> tuple[int, str]:
    """``loupe ARGS`` in this process: exit status and stderr; any exception escaping is a traceback (a failure)."""
    err = io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
        try:
            code = main(args)
        except SystemExit as exit_:  # argparse's own exits
            code = int(exit_.code or 0)
    return code, err.getvalue()


SECTIONS = ["data", "model", "train", "joint", "gated_mil", "streamingclam", "nonsense", ""]
KEYS = [
    "manifest", "batch_size", "epochs", "lr", "k", "magnifications", "patch_size", "thumbnail_size", "tissue",
    "max_failed_fraction", "precision", "accelerator", "architecture", "patch_backbone", "folds", "fold",
    "val_fraction", "seed", "devices", "no_such_key", "cache_dir", "normalisation", "entropy_alpha",
]  # fmt: skip
VALUES = st.one_of(
    st.none(), st.booleans(), st.integers(-(10**12), 10**12), st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=20), st.sampled_from(NASTY), st.lists(st.integers(-5, 500), max_size=4),
    st.lists(st.sampled_from(["5x", "20x", "0.5", "ds4", "-1", "x"]), max_size=4),
    st.dictionaries(st.text(max_size=5), st.integers(), max_size=2),
)  # fmt: skip


@st.composite
def configs(draw: st.DrawFn) -> bytes:
    """Config files: YAML that is not a mapping, sections of wrong types, settings of wrong types or out of
    range, unknown keys, broken YAML and bytes."""
    kind = draw(st.integers(0, 9))
    if kind == 0:
        return draw(st.binary(max_size=200))
    if kind == 1:
        return yaml.safe_dump(draw(st.one_of(VALUES, st.lists(VALUES, max_size=3)))).encode()
    doc: dict = {}
    for section in draw(st.lists(st.sampled_from(SECTIONS), max_size=4)):
        if draw(st.integers(0, 6)) == 0:
            doc[section] = draw(VALUES)  # a section that is not a mapping
        else:
            doc[section] = draw(st.dictionaries(st.sampled_from(KEYS), VALUES, max_size=3))
    text = yaml.safe_dump(doc, allow_unicode=True)
    if kind == 2:
        text = text.replace(":", "", 1)  # broken YAML
    return text.encode()


@FUZZ
@given(content=configs())
def test_any_config_is_refused_with_one_message_before_training(
    tmp_path_factory: pytest.TempPathFactory, content: bytes
) -> None:
    folder = tmp_path_factory.getbasetemp() / "fuzz-config"
    folder.mkdir(exist_ok=True)
    config = folder / "config.yaml"
    config.write_bytes(content)
    code, err = _cli(["train", str(config), "--out", str(folder / "run"), "--data.manifest", str(folder / "none.csv")])
    # A valid config reaches the manifest, which does not exist: every case ends in a message, none trains.
    assert code == 2, err
    assert "loupe train: error:" in err and "Traceback" not in err, err
    assert not (folder / "run" / "checkpoints").exists()


#: Slide ids and labels that need escaping in CSV, JSON, GeoJSON and Markdown/HTML, or would escape the output.
ESCAPING = ["naïve slide, 1", 'quo"te', "<b>bold<b> &amp;", "semi;colon", '=HYPERLINK("x")', "| pipe |", "# hash"]
ESCAPING_OUT = ["../../x", "/abs", "sub/dir", "..", ".hidden", "back\\slash"]


@pytest.mark.parametrize("slide_id", ESCAPING_OUT)
def test_slide_ids_that_would_escape_the_output_are_refused_naming_the_fix(tmp_path: Path, slide_id: str) -> None:
    (tmp_path / "a.svs").write_bytes(b"x")
    manifest = tmp_path / "m.csv"
    manifest.write_text(_csv_text(["slide_id", "path", "label"], [[slide_id, "a.svs", "x"]], ","))
    with pytest.raises(ManifestError) as err:
        load_manifest(manifest)
    assert str(manifest) in str(err.value) and "slide_id" in str(err.value) and "row 2" in str(err.value)


@pytest.mark.slow
def test_slide_ids_and_labels_needing_escapes_round_trip_through_predict_outputs(
    dataset: Path, trained_run: Path, tmp_path: Path
) -> None:
    """Predict slides named with characters special to CSV, JSON, GeoJSON and Markdown: every output parses back
    to the same names, and nothing is written outside the output folder."""
    run = trained_run
    images = sorted((dataset.parent / "images").glob("test_*.tif"))
    manifest = tmp_path / "m.csv"
    rows = [[sid, str(img), "horizontal"] for sid, img in zip(ESCAPING, images * 2, strict=False)]
    manifest.write_text(_csv_text(["slide_id", "path", "label"], rows, ","), encoding="utf-8")
    out = tmp_path / "sandbox" / "out"
    before = set(tmp_path.rglob("*"))
    proc = run_loupe(["predict", str(run), str(manifest), "--out", str(out), "--workers", "0"])
    assert proc.returncode == 0, proc.stderr[-3000:]
    written = set(tmp_path.rglob("*")) - before
    assert all(p == out.parent or out in p.parents or p == out for p in written)
    with (out / "predictions.csv").open(newline="", encoding="utf-8") as handle:
        assert [r["slide_id"] for r in csv.DictReader(handle)] == ESCAPING
    status = json.loads((out / "status.json").read_text(encoding="utf-8"))["slides"]
    assert sorted(status) == sorted(ESCAPING)
    for sid in ESCAPING:
        folder = out / "slides" / sid
        assert json.loads((folder / "prediction.json").read_text(encoding="utf-8"))["slide_id"] == sid
        json.loads((folder / "attention.geojson").read_text(encoding="utf-8"))


def test_a_huge_file_given_as_manifest_is_refused_without_reading_it(tmp_path: Path) -> None:
    huge = tmp_path / "huge.csv"
    with huge.open("wb") as handle:  # sparse: 600 MB that take no space
        handle.truncate(600 * 2**20)
    with pytest.raises(ManifestError, match="600 MB") as err:
        load_manifest(huge)
    assert str(huge) in str(err.value)


def test_a_slide_file_name_that_cannot_name_an_output_is_refused(tmp_path: Path) -> None:
    from loupe.data.manifest import manifest_from_paths

    (tmp_path / ("x" * 230 + ".svs")).write_bytes(b"x")
    with pytest.raises(ManifestError, match="longer than 200 bytes"):
        manifest_from_paths([tmp_path])
