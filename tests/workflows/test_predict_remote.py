"""`loupe predict` on slides named by URL, served by a real nginx on 127.0.0.1: the same predictions as the local
files, no credential in any output, a missing object failing only its slide."""

from __future__ import annotations

import csv
import json
import shutil

import numpy as np
import pytest

from loupe.slides.remote import forget_identities
from loupe.workflows.prediction import predict

from ..helpers.nginx import Nginx, nginx_available

pytestmark = [
    pytest.mark.skipif(not nginx_available(), reason="nginx is not installed (.ci/run installs it)"),
    pytest.mark.slow,
]
pytest.importorskip("aiohttp")

SLIDES = ("cmu-1-small-region-pyramid.svs", "cmu-1-small-region-pyramid-generic.tif")
SECRET = "hunter2"


@pytest.fixture(scope="module")
def tiffslide_run(trained_run, tmp_path_factory):
    """The trained run, reading slides with tiffslide: the reader the URL path uses, so pixels are the same."""
    run = tmp_path_factory.mktemp("run") / "run"
    shutil.copytree(trained_run, run)
    config = run / "config.yaml"
    text = config.read_text()
    assert "backend: auto" in text
    config.write_text(text.replace("backend: auto", "backend: tiffslide"))
    return run


def _probabilities(out):
    with open(out / "predictions.csv", newline="") as f:
        rows = {r["slide_id"]: r for r in csv.DictReader(f)}
    return {
        sid: (r["predicted"], np.array([float(v) for k, v in r.items() if k.startswith("prob_")], np.float32))
        for sid, r in rows.items()
    }


def test_predictions_from_urls_equal_the_local_files(tiffslide_run, slides_dir, tmp_path):
    root = tmp_path / "www"
    root.mkdir()
    for name in SLIDES:
        shutil.copy(slides_dir / name, root / name)
    with Nginx(root, tmp_path / "nginx") as server:
        base = f"http://reader:{SECRET}@127.0.0.1:{server.port}"
        urls = [f"{base}/{name}" for name in SLIDES] + [f"{base}/missing.svs"]
        remote = predict(tiffslide_run, urls, out=tmp_path / "remote", workers=0, tissue=True)
        predict(tiffslide_run, [slides_dir / n for n in SLIDES], out=tmp_path / "local", workers=0, tissue=True)
        again = predict(tiffslide_run, urls, out=tmp_path / "remote", workers=0, tissue=True)  # resumes: nothing to do
    statuses = {sid: e["status"] for sid, e in remote.status.slides.items()}
    assert statuses == {
        "cmu-1-small-region-pyramid": "done",
        "cmu-1-small-region-pyramid-generic": "done",
        "missing": "failed",
    }
    reason = remote.status.slides["missing"]["reason"]
    assert "404" in reason and "/missing.svs" in reason
    got, want = _probabilities(tmp_path / "remote"), _probabilities(tmp_path / "local")
    for sid, (cls, probs) in want.items():
        assert got[sid][0] == cls
        np.testing.assert_allclose(got[sid][1], probs, atol=1e-6, rtol=0)
    assert again.processed == []
    for path in (tmp_path / "remote").rglob("*"):  # status, summaries, per-slide JSON and GeoJSON, logs
        if path.is_file():
            assert SECRET.encode() not in path.read_bytes(), path
    shown = json.loads((tmp_path / "remote" / "slides" / SLIDES[0][:-4] / "prediction.json").read_text())["path"]
    assert shown == f"http://***@127.0.0.1:{server.port}/{SLIDES[0]}"


def test_a_server_down_fails_its_slides_alone_and_the_run_resumes_when_it_is_back(
    tiffslide_run, slides_dir, tmp_path, monkeypatch
):
    monkeypatch.setenv("LOUPE_REMOTE_RETRIES", "1")
    monkeypatch.setattr("loupe.slides.remote.BACKOFF_S", 0.05)
    root = tmp_path / "www"
    root.mkdir()
    shutil.copy(slides_dir / SLIDES[0], root / SLIDES[0])
    server = Nginx(root, tmp_path / "nginx")
    inputs = [f"{server.url}/{SLIDES[0]}", slides_dir / SLIDES[1]]
    first = predict(tiffslide_run, inputs, out=tmp_path / "out", workers=0)  # the server is not running
    statuses = {sid: e["status"] for sid, e in first.status.slides.items()}
    assert statuses == {"cmu-1-small-region-pyramid": "failed", "cmu-1-small-region-pyramid-generic": "done"}
    assert f"127.0.0.1:{server.port}/{SLIDES[0]}" in first.status.slides["cmu-1-small-region-pyramid"]["reason"]
    forget_identities()
    server.start()  # back: the failed slide's object now has an identity, so the re-run retries it
    try:
        second = predict(tiffslide_run, inputs, out=tmp_path / "out", workers=0)
    finally:
        server.stop()
    assert second.processed == ["cmu-1-small-region-pyramid"]
    assert {e["status"] for e in second.status.slides.values()} == {"done"}


def test_predictions_from_dicomweb_equal_the_local_dicom_folders(trained_run, slides_dir, tmp_path):
    """The fixture DICOM WSI series in a real Orthanc (DICOMweb plugin) on 127.0.0.1, read by wsidicom; the local
    folder read by OpenSlide. Two readers: OpenSlide sees 12 levels where wsidicom sees the series' 3, and its
    level-1 pixels differ by up to 5 grey levels, so probabilities agree to 1e-4 here (measured 3e-6), not 1e-6;
    over DICOMweb wsidicom's pixels equal its local reading exactly (tests/slides/test_dicomweb.py)."""
    wsidicom = pytest.importorskip("wsidicom")
    pytest.importorskip("dicomweb_client")
    from ..helpers.orthanc import Orthanc, orthanc_available

    if not orthanc_available():
        pytest.skip("Orthanc + DICOMweb plugin not installed (.ci/run installs them)")
    folder = slides_dir / "dicom-cmu-1-small-region"
    with wsidicom.WsiDicom.open(folder) as local:
        study, series = str(local.uids.study_instance), str(local.uids.series_instance)
    with Orthanc(tmp_path / "orthanc") as server:
        for path in sorted(folder.glob("*.dcm")):
            server.upload(path)
        url = f"dicomweb+http://127.0.0.1:{server.port}/dicom-web/studies/{study}/series/{series}"
        remote = predict(trained_run, [url], out=tmp_path / "remote", workers=0, tissue=True)
    predict(trained_run, [folder], out=tmp_path / "local", workers=0, tissue=True)
    assert remote.status.slides[series]["status"] == "done", remote.status.slides[series].get("reason")
    got, want = _probabilities(tmp_path / "remote")[series], _probabilities(tmp_path / "local")[folder.name]
    assert got[0] == want[0]
    np.testing.assert_allclose(got[1], want[1], atol=1e-4, rtol=0)
