"""The viewer's parts: Deep Zoom over every reader backend, the tile cache's bound, a cohort read while workers
fill it, a run folder, and the command line."""

from __future__ import annotations

import builtins
import json
import shutil
import time

import numpy as np
import pytest

from loupe.cli import main
from loupe.errors import ConfigError
from loupe.slides import open_slide
from loupe.viewer import cohort as cohort_module
from loupe.viewer.cohort import open_cohort
from loupe.viewer.deepzoom import DeepZoom, TileCache, TileError
from loupe.viewer.server import host_warning, require_viewer, url_of

from .cohort_fixture import build_predict_output

BACKEND_SLIDES = [
    ("cmu-1-small-region.svs", "openslide"),
    ("cmu-1-small-region-pyramid.svs", "tiffslide"),
    ("cmu-1-small-region-pyramid-generic.tif", "image"),
    ("fluorescence-dapi-40x.ndpi", "openslide"),
]


def test_deep_zoom_levels_follow_the_protocol():
    dz = DeepZoom((40000, 30000))
    assert dz.max_level == 16 and dz.level_dimensions(16) == (40000, 30000)
    assert dz.level_dimensions(15) == (20000, 15000) and dz.level_dimensions(0) == (1, 1)
    assert dz.level_dimensions(8) == (157, 118)  # each side rounded up
    assert dz.level_tiles(16) == (158, 119)
    assert dz.tile_box(16, 0, 0) == (0, 0, 255, 255)
    assert dz.tile_box(16, 1, 1) == (253, 253, 256, 256)
    assert dz.tile_box(16, 157, 118) == (157 * 254 - 1, 118 * 254 - 1, 40000 - 157 * 254 + 1, 30000 - 118 * 254 + 1)
    for bad in [(17, 0, 0), (-1, 0, 0), (16, 158, 0), (16, 0, 119), (16, -1, 0)]:
        with pytest.raises(TileError):
            dz.tile_box(*bad)


@pytest.mark.parametrize(("name", "backend"), BACKEND_SLIDES)
def test_deep_zoom_tiles_are_the_readers_pixels_for_every_backend(slides_dir, name, backend):
    with open_slide(slides_dir / name, backend=backend) as reader:
        dz = DeepZoom(reader.dimensions)
        level = dz.max_level - 2  # a quarter of level 0: the reader resamples
        (x, y, w, h), size = dz.level0_rect(level, 0, 0)
        expected = reader.read_region(x, y, (w, h), size).astype(int)
        from io import BytesIO

        from PIL import Image

        tile = np.asarray(Image.open(BytesIO(dz.tile(reader, level, 0, 0))).convert("RGB")).astype(int)
        assert tile.shape == expected.shape
        assert np.abs(tile - expected).mean() < 4  # JPEG


def test_tile_cache_keeps_to_its_byte_bound():
    cache = TileCache(1000)
    for i in range(10):
        cache.put(i, bytes(300))
    assert cache.bytes <= 1000 and len(cache) == 3
    assert cache.get(9) is not None and cache.get(0) is None
    cache.get(7)
    cache.put("new", bytes(300))
    assert cache.get(7) is not None and cache.get(8) is None  # least recently used goes first
    cache.put("huge", bytes(5000))
    assert cache.get("huge") is None and cache.bytes <= 1000


def test_slides_finished_while_workers_fill_the_folder_appear(tmp_path, monkeypatch):
    out = build_predict_output(tmp_path)
    monkeypatch.setattr(cohort_module, "REFRESH_S", 0.0)
    for name in ("status.json", "predictions.csv", "timings.csv"):  # no worker has merged yet
        (out / name).unlink()
    moved = tmp_path / "later"
    moved.mkdir()
    shutil.move(out / "state" / "beta.json", moved / "beta.json")
    cohort = open_cohort(out)
    assert [r.slide_id for r in cohort.rows()] == ["alpha", "gone", "broken"]  # in the order they finished
    alpha = cohort.get("alpha")
    assert alpha is not None and alpha.predicted == "tumour" and alpha.probability == pytest.approx(0.9)
    time.sleep(0.01)
    shutil.move(moved / "beta.json", out / "state" / "beta.json")  # a worker records beta
    assert [r.slide_id for r in cohort.rows()] == ["alpha", "beta", "gone", "broken"]  # by when they finished
    assert cohort.get("beta").predicted == "tumour"


def test_a_state_newer_than_the_summary_wins(tmp_path, monkeypatch):
    out = build_predict_output(tmp_path)
    monkeypatch.setattr(cohort_module, "REFRESH_S", 0.0)
    cohort = open_cohort(out)
    assert cohort.get("broken").status == "failed"
    state = json.loads((out / "state" / "broken.json").read_text())
    time.sleep(0.01)
    (out / "state" / "broken.json").write_text(json.dumps(state | {"reason": "retried: still broken"}))
    assert cohort.get("broken").reason == "retried: still broken"


def test_a_run_folder_shows_its_evaluated_split_or_names_the_command(tmp_path):
    out = build_predict_output(tmp_path)
    run = tmp_path / "run"
    with pytest.raises(ConfigError, match=r"loupe evaluate .* --split test"):
        open_cohort(run)
    (run / "manifest.csv").write_text(f"slide_id,path,label\nalpha,{tmp_path}/data/alpha.tif,tumour\n")
    (run / "eval-test").mkdir()
    (run / "eval-test" / "predictions.csv").write_text(
        "slide_id,label,predicted,prob_benign,prob_tumour,attention_5x\nalpha,tumour,tumour,0.2,0.8,1.0\n"
    )
    cohort = open_cohort(run)
    (row,) = cohort.rows()
    assert row.correct == "right" and row.probability == pytest.approx(0.8)
    assert cohort.slide_path(row) == tmp_path / "data" / "alpha.tif"
    assert cohort.prediction("alpha") is None and "loupe predict" in (cohort.notice or "")
    shutil.copytree(out, run / "predict")  # per-slide outputs inside the run
    cohort = open_cohort(run)
    assert cohort.prediction("alpha") is not None and cohort.notice is None
    with pytest.raises(ConfigError, match="split 'val' was not evaluated"):
        open_cohort(run, split="val")


def test_a_folder_that_is_neither_is_one_message(tmp_path):
    with pytest.raises(ConfigError, match="neither a `loupe predict` output folder"):
        open_cohort(tmp_path)
    with pytest.raises(ConfigError, match="no such folder"):
        open_cohort(tmp_path / "missing")
    assert main(["view", str(tmp_path / "missing")]) == 2


def test_without_the_extra_the_message_names_it(monkeypatch, capsys, tmp_path):
    real_import = builtins.__import__

    def no_uvicorn(name, *args, **kwargs):
        if name == "uvicorn":
            raise ImportError("No module named 'uvicorn'")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_uvicorn)
    with pytest.raises(ConfigError, match=r"pip install 'loupe\[viewer\]'"):
        require_viewer()
    assert main(["view", str(tmp_path)]) == 2
    assert "loupe[viewer]" in capsys.readouterr().err


def test_only_loopback_hosts_go_without_a_warning():
    assert host_warning("127.0.0.1") is None and host_warning("localhost") is None
    assert "anyone who can reach this machine" in (host_warning("0.0.0.0") or "")
    assert url_of("0.0.0.0", 8000) == "http://127.0.0.1:8000/" and url_of("::1", 80) == "http://[::1]:80/"


def test_view_help_lists_its_options(capsys):
    with pytest.raises(SystemExit):
        main(["view", "--help"])
    text = capsys.readouterr().out
    assert "--port" in text and "--host" in text and "--open" in text


@pytest.mark.parametrize("folder_kind", ["predict"])
def test_loupe_view_serves_until_interrupted(tmp_path, folder_kind):
    """The command itself: prints the URL, answers, and stops cleanly on Ctrl-C (SIGINT)."""
    pytest.importorskip("uvicorn", reason="the viewer's web parts are not installed: pip install 'loupe[viewer]'")
    import signal
    import subprocess
    import sys
    import urllib.request

    out = build_predict_output(tmp_path)
    proc = subprocess.Popen(
        [sys.executable, "-m", "loupe", "view", str(out)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    try:
        line = proc.stdout.readline() if proc.stdout else ""
        assert "4 slides" in line and "http://127.0.0.1:" in line, line
        url = line.split(" at ")[1].split()[0]
        with urllib.request.urlopen(url + "api/cohort", timeout=10) as response:
            assert json.loads(response.read())["total"] == 4
    finally:
        proc.send_signal(signal.SIGINT)
        proc.wait(timeout=15)
    assert proc.returncode in (0, -signal.SIGINT, 130), proc.stderr.read() if proc.stderr else ""


def test_a_port_in_use_is_one_message(tmp_path):
    import socket

    from loupe.viewer.server import view

    pytest.importorskip("uvicorn", reason="the viewer's web parts are not installed: pip install 'loupe[viewer]'")
    out = build_predict_output(tmp_path)
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen(1)
        with pytest.raises(ConfigError, match="pass another --port"):
            view(out, port=taken.getsockname()[1])


def test_streamingclam_attention_is_shown_as_instance_attention_with_the_geojsons_geometry(tmp_path):
    """A run whose config names no patch size (StreamingCLAM's cell is its trunk's stride): the cells' level-0 size
    comes from the GeoJSON's rectangles, and the layers are called instance attention."""
    import yaml

    from loupe.viewer.slide_data import load_slide_data

    from .cohort_fixture import LABELS, MPP, PATCH

    out = build_predict_output(tmp_path)
    config = {"model": {"architecture": "streamingclam", "magnifications": LABELS}, "streamingclam": {}}
    (tmp_path / "run" / "config.yaml").write_text(yaml.safe_dump(config))
    cohort = open_cohort(out)
    assert cohort.run_info.architecture == "streamingclam" and cohort.run_info.patch_size is None
    folder = cohort.slide_folder("alpha")
    assert folder is not None
    data = load_slide_data("alpha", folder, cohort.run_info)
    described = data.describe()
    assert [lay["title"] for lay in described["layers"]] == [f"instance attention (StreamingCLAM, {m})" for m in LABELS]
    for lay, mpp in zip(data.layers, (2.0, 1.0, 0.5), strict=True):
        assert lay.exact and lay.patch_px == PATCH and lay.cell_size0 == pytest.approx(PATCH * mpp / MPP)


def test_a_damaged_slide_folder_is_one_message(tmp_path):
    from loupe.viewer.cohort import RunInfo
    from loupe.viewer.slide_data import SlideDataError, load_slide_data

    out = build_predict_output(tmp_path)
    folder = out / "slides" / "alpha"
    (folder / "attention.npz").write_bytes(b"not an npz")
    with pytest.raises(SlideDataError, match=r"attention\.npz: cannot be read"):
        load_slide_data("alpha", folder, RunInfo())
    (folder / "prediction.json").write_text("{")
    with pytest.raises(SlideDataError, match=r"prediction\.json: cannot be read"):
        load_slide_data("alpha", folder, RunInfo())
