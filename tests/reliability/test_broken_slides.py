"""Broken slides cost one line, never the run: a corrupt tile deep in level 0, a file truncated after its header,
a file replaced while in use, an absurd header. Predict fails that slide alone (reason in the status); training
skips it with a warning, counts it, lists it in the run folder, and stops with one message only when more than
``data.max_failed_fraction`` of the slides fail."""

from __future__ import annotations

import csv
import json
import math
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from loupe.data.catalog import SKIPPED_SLIDES_FILE, SlideCatalog, SlideFailures, run_dropping_failed
from loupe.data.loading import CellReader
from loupe.data.manifest import SlideRecord
from loupe.data.pixels import SlidePixels
from loupe.errors import SlideError, SlideReadError
from loupe.models.interface import SlideBatch
from loupe.slides import open_slide, parse_magnifications
from loupe.slides.open import check_header

from .conftest import corrupt_level0_tiles, no_traceback, pyramidal_slide, run_loupe, train_args, truncate_after_header


@pytest.fixture(scope="module")
def broken(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A good pyramidal slide, one with corrupt JPEG data in every level-0 tile, one cut after its header."""
    folder = tmp_path_factory.mktemp("broken")
    good = pyramidal_slide(folder / "good.svs", seed=1)
    corrupt = pyramidal_slide(folder / "corrupt.svs", seed=2)
    corrupt_level0_tiles(corrupt)
    truncated = pyramidal_slide(folder / "truncated.svs", seed=3)
    truncate_after_header(truncated)
    return {"good": good, "corrupt": corrupt, "truncated": truncated}


def _manifest_with(dataset: Path, extra: dict[str, Path], out: Path, val: tuple[str, ...] = ()) -> Path:
    """The synthetic manifest plus ``extra`` slides in the train split (those named in ``val``: the val split)."""
    rows = list(csv.DictReader(dataset.open()))
    for row in rows:
        row["path"] = str(dataset.parent / row["path"])
    labels = ["horizontal", "vertical"]
    rows += [
        {"slide_id": name, "path": str(path), "label": labels[n % 2], "split": "val" if name in val else "train"}
        for n, (name, path) in enumerate(extra.items())
    ]
    with out.open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=["slide_id", "path", "label", "split"])
        writer.writeheader()
        writer.writerows(rows)
    return out


def test_a_corrupt_tile_fails_the_read_of_that_slide_only(broken: dict[str, Path]) -> None:
    records = [SlideRecord(name, path, None, None, None, None) for name, path in broken.items() if name != "truncated"]
    catalog = SlideCatalog(records, parse_magnifications(["0.5"]), 32)
    reader = CellReader(catalog, threads=2)
    try:
        assert reader([0], torch.tensor([[0, 5, 9]])).shape == (1, 3, 3, 32, 32)  # good.svs reads
        assert catalog.thumbnail(1).shape[-1] == 3  # corrupt.svs opens and gives its thumbnail...
        with pytest.raises(SlideReadError) as err:  # ...but its level 0 does not read
            reader([0, 1], torch.tensor([[0, 1], [0, 1]]))
        assert err.value.index == 1 and "corrupt.svs" in str(err.value)
    finally:
        reader.close()
        catalog.close()


def test_a_corrupt_tile_fails_the_whole_image_read_of_that_slide_only(broken: dict[str, Path]) -> None:
    """What StreamingCLAM reads: the whole image, which training then skips like a failed patch read."""
    records = [SlideRecord(name, path, None, None, None, None) for name, path in broken.items() if name != "truncated"]
    catalog = SlideCatalog(records, parse_magnifications(["0.5"]), 32)
    pixels = SlidePixels(catalog, threads=2, crop_to_tissue=False)
    try:
        assert pixels.whole(0, None).image.shape[-1] > 0  # good.svs reads
        with pytest.raises(SlideReadError) as err:
            pixels.whole(1, None)
        assert err.value.index == 1 and "corrupt.svs" in str(err.value)
    finally:
        pixels.close()
        catalog.close()


def test_a_file_replaced_while_in_use_fails_that_slide(broken: dict[str, Path], tmp_path: Path) -> None:
    path = tmp_path / "replaced.svs"
    shutil.copy(broken["good"], path)
    catalog = SlideCatalog([SlideRecord("replaced", path, None, None, None, None)], parse_magnifications(["0.5"]), 32)
    reader = CellReader(catalog, threads=1)
    try:
        reader([0], torch.tensor([[0]]))
        with path.open("r+b") as handle:  # overwritten in place by a copy that is still arriving
            handle.truncate(700)
        catalog.close()  # the reader is reopened (as after eviction from the open-file cache)
        with pytest.raises(SlideReadError) as err:
            reader([0], torch.tensor([[3]]))
        assert err.value.index == 0 and "replaced.svs" in str(err.value)
    finally:
        reader.close()
        catalog.close()


def _batch(indices: list[int]) -> SlideBatch:
    n = len(indices)
    return SlideBatch(
        torch.zeros(n, 3, 8, 8, dtype=torch.uint8), torch.ones(n, 4, dtype=torch.bool), torch.zeros(n).long(),
        torch.tensor(indices), ((2, 2),),
    )  # fmt: skip


def test_a_failing_slide_is_dropped_from_its_batch_and_counted(tmp_path: Path) -> None:
    records = [SlideRecord(f"s{i}", tmp_path / f"s{i}.svs", "a", "train", None, None) for i in range(10)]
    failures = SlideFailures(records, 10, 0.25, tmp_path / SKIPPED_SLIDES_FILE)
    calls: list[list[int]] = []

    def run(batch: SlideBatch) -> int:
        calls.append(batch.slides)
        for i in batch.slides:
            if i in (3, 7):
                raise SlideReadError(f"slide s{i}: reading patches failed", i)
        return len(batch)

    ran = run_dropping_failed(_batch([1, 3, 5]), run, failures, "epoch 0, training")
    assert ran is not None and ran[0].slides == [1, 5] and ran[1] == 2
    assert calls == [[1, 3, 5], [1, 5]]
    assert run_dropping_failed(_batch([3]), run, failures, "epoch 1, training") is None  # known bad: not read
    assert run_dropping_failed(_batch([7]), run, failures, "epoch 1, training") is None
    saved = json.loads((tmp_path / SKIPPED_SLIDES_FILE).read_text())
    assert [s["slide_id"] for s in saved] == ["s3", "s7"] and saved[0]["when"] == "epoch 0, training"
    with pytest.raises(SlideError, match=r"3 of 10 slides cannot be read .*data.max_failed_fraction=0.25"):
        run_dropping_failed(_batch([0, 9]), lambda b: run(b) if 9 not in b.slides else _fail(9), failures, "e")


def _fail(i: int) -> int:
    raise SlideReadError("broken", i)


@pytest.mark.slow
def test_training_skips_broken_slides_and_lists_them(dataset: Path, broken: dict[str, Path], tmp_path: Path) -> None:
    extra = {"corrupt": broken["corrupt"], "truncated": broken["truncated"], "corrupt_val": broken["corrupt"]}
    manifest = _manifest_with(dataset, extra, tmp_path / "m.csv", val=("corrupt_val",))
    run = tmp_path / "run"
    done = run_loupe(train_args(manifest, run, 3, "--data.max_failed_fraction", "0.2"))
    assert done.returncode == 0, done.stderr[-3000:]
    skipped = {s["slide_id"]: s for s in json.loads((run / SKIPPED_SLIDES_FILE).read_text())}
    assert set(skipped) == {"corrupt", "truncated", "corrupt_val"}
    assert skipped["truncated"]["when"] == "before training"
    assert skipped["corrupt"]["when"].endswith("training") and "corrupt.svs" in skipped["corrupt"]["reason"]
    assert skipped["corrupt_val"]["when"] == "epoch 0, validation"
    assert "skipping slide corrupt" in done.stderr and "skipping slide truncated" in done.stderr
    state = torch.load(run / "checkpoints" / "last.ckpt", weights_only=True)
    assert state["epoch"] == 2  # trained to the end on the other slides


@pytest.mark.slow
def test_training_stops_when_too_many_slides_fail(dataset: Path, broken: dict[str, Path], tmp_path: Path) -> None:
    manifest = _manifest_with(dataset, {"truncated": broken["truncated"]}, tmp_path / "m.csv")
    failed = run_loupe(train_args(manifest, tmp_path / "run", 1, "--data.max_failed_fraction", "0.01"))
    no_traceback(failed)
    assert "1 of 17 slides cannot be read" in failed.stderr and "truncated.svs" in failed.stderr
    assert "data.max_failed_fraction" in failed.stderr
    assert not (tmp_path / "run" / "checkpoints").exists()


@pytest.mark.slow
def test_predict_fails_only_the_broken_slides(trained_run: Path, broken: dict[str, Path], tmp_path: Path) -> None:
    run = trained_run
    out = tmp_path / "out"
    proc = run_loupe(["predict", str(run), *map(str, broken.values()), "--out", str(out), "--workers", "0"])
    assert proc.returncode == 1 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    status = json.loads((out / "status.json").read_text())["slides"]
    assert status["good"]["status"] == "done"
    assert status["corrupt"]["status"] == "failed" and "Corrupt JPEG" in status["corrupt"]["reason"]
    assert status["truncated"]["status"] == "failed" and "truncated.svs" in status["truncated"]["reason"]
    assert sorted(p.name for p in (out / "slides").iterdir()) == ["good"]


class _Header:
    """A reader whose header says what a damaged or crafted file might say."""

    def __init__(self, dims: tuple[tuple[int, int], ...], mpp: float | None) -> None:
        self.path, self.level_dimensions, self.mpp = Path("crafted.svs"), dims, mpp


@pytest.mark.parametrize(
    ("dims", "mpp", "expected"),
    [
        (((10**7, 10**7),), 0.25, "10000000x10000000"),
        (((0, 5000),), 0.25, "0x5000"),
        (((-5, 5000),), 0.25, "-5x5000"),
        (((2_000_000, 2_000_000),), 0.25, "pixels"),
        (((5000, 5000), (10**9, 1)), 0.25, "level 1"),
        (((5000, 5000),), 0.0, "0.0 µm/px"),
        (((5000, 5000),), -0.5, "-0.5 µm/px"),
        (((5000, 5000),), math.nan, "nan µm/px"),
        (((5000, 5000),), 1e9, "1000000000.0 µm/px"),
    ],
)
def test_an_absurd_header_is_refused_before_anything_is_allocated(dims, mpp, expected: str) -> None:
    with pytest.raises(SlideError, match=r"crafted\.svs") as err:
        check_header(_Header(dims, mpp))  # type: ignore[arg-type]
    assert expected in str(err.value)


def test_an_absurd_tiff_header_is_refused_by_open_slide(tmp_path: Path) -> None:
    """A real file whose TIFF tags claim 10^7 × 10^7 pixels: refused when opened, with the file named."""
    import tifffile

    path = tmp_path / "huge.tif"
    tifffile.imwrite(path, np.zeros((16, 16, 3), np.uint8), photometric="rgb")
    with tifffile.TiffFile(path, mode="r+b") as tif:
        tags = tif.pages[0].tags
        width, length = tags["ImageWidth"], tags["ImageLength"]
        for tag in (width, length):
            tag.overwrite(10**7)
    with pytest.raises(SlideError, match=r"huge\.tif"):
        open_slide(path, mpp=0.5)


def test_a_batch_without_a_readable_slide_takes_a_zero_step_connected_to_every_parameter(tmp_path: Path) -> None:
    """Under DDP every rank must take each step (a rank skipping one hangs the others): a batch whose slides all
    failed returns a zero loss whose backward gives every trainable parameter a zero gradient."""
    from loupe.config import load_config
    from loupe.models import build_model
    from loupe.training.module import SlideClassifierModule

    from .conftest import DEMO

    cfg = load_config(DEMO)
    records = [SlideRecord(f"s{i}", tmp_path / f"s{i}.svs", "a", "train", None, None) for i in range(4)]
    failures = SlideFailures(records, 4, 0.5)
    for i in (1, 2):
        failures.add(i, "unreadable", "before training")
    module = SlideClassifierModule(build_model(cfg, 2), cfg.train, None, ["5x", "10x", "20x"], failures=failures)  # type: ignore[arg-type]
    loss = module.training_step(_batch([2, 1]), 0)
    assert loss is not None and float(loss.detach()) == 0.0
    loss.backward()
    trainable = [p for p in module.parameters() if p.requires_grad]
    assert trainable and all(p.grad is not None and not p.grad.any() for p in trainable)
