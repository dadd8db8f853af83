"""Every route of the viewer through Starlette's test client, over a predict output folder written by loupe."""

from __future__ import annotations

import io
import json
import os
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from loupe.slides import build_grid, open_slide

from .cohort_fixture import BANDS, CLASSES, HOT_10X, HOT_20X, LABELS, MPP, PATCH, H, W, band_colour


def _tree(root: Path) -> dict[str, tuple[int, int]]:
    out = {}
    for folder, dirs, files in os.walk(root):
        for name in dirs + files:
            st = os.lstat(os.path.join(folder, name))
            out[os.path.relpath(os.path.join(folder, name), root)] = (st.st_mtime_ns, st.st_size)
    return out


def _image(response) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(response.content)).convert("RGB"))


def test_cohort_lists_every_slide_with_status_label_and_reason(client):
    d = client.get("/api/cohort").json()
    rows = {r["slide_id"]: r for r in d["rows"]}
    assert [r["slide_id"] for r in d["rows"]] == ["alpha", "beta", "gone", "broken"]  # the inputs' order
    assert d["counts"] == {"done": 3, "failed": 1}
    assert rows["alpha"]["predicted"] == "tumour" and rows["alpha"]["probability"] == pytest.approx(0.9)
    assert rows["alpha"]["correct"] == "right" and rows["beta"]["correct"] == rows["gone"]["correct"] == "wrong"
    assert rows["broken"]["status"] == "failed" and "not a TIFF" in rows["broken"]["reason"]
    assert rows["alpha"]["time_s"] == pytest.approx(0.393)


@pytest.mark.parametrize(
    ("query", "expected"),
    [
        ("sort=probability&order=desc", ["alpha", "gone", "beta", "broken"]),
        ("sort=probability&order=asc", ["beta", "gone", "alpha", "broken"]),  # no value: last either way
        ("sort=slide_id&order=desc", ["gone", "broken", "beta", "alpha"]),
        ("f_probability=%3E0.75", ["alpha", "gone"]),
        ("f_correct=wrong", ["beta", "gone"]),
        ("f_status=fail", ["broken"]),
        ("f_predicted=TUM&sort=probability", ["beta", "alpha"]),
    ],
)
def test_cohort_sorts_and_filters_by_any_column(client, query, expected):
    d = client.get(f"/api/cohort?{query}").json()
    assert [r["slide_id"] for r in d["rows"]] == expected
    assert d["total"] == 4 and d["matched"] == len(expected)


def test_cohort_pages(client):
    d = client.get("/api/cohort?offset=1&limit=2").json()
    assert [r["slide_id"] for r in d["rows"]] == ["beta", "gone"] and d["offset"] == 1


@pytest.mark.parametrize(
    "query",
    ["sort=nope", "order=sideways", "f_nope=1", "f_probability=abc", "limit=0", "limit=x", "offset=-1", "limit=5000"],
)
def test_bad_cohort_parameters_are_400(client, query):
    response = client.get(f"/api/cohort?{query}")
    assert response.status_code == 400, response.text
    assert "error" in response.json()


def test_neighbours_follow_the_current_order(client):
    assert client.get("/api/cohort/neighbours/alpha").json() == {
        "previous": None,
        "next": "beta",
        "position": 1,
        "total": 4,
    }
    d = client.get("/api/cohort/neighbours/alpha?sort=probability&order=asc").json()
    assert d["previous"] == "gone" and d["next"] == "broken"
    assert client.get("/api/cohort/neighbours/nope").status_code == 404


def test_slide_description_has_layers_cells_and_geometry(client):
    d = client.get("/api/slides/alpha").json()
    assert d["slide_error"] is None and d["slide"]["dimensions"] == [W, H]
    o = d["outputs"]
    assert [lay["label"] for lay in o["layers"]] == LABELS
    grid = build_grid((W, H), MPP, LABELS, PATCH, "alpha")
    for lay, g in zip(o["layers"], grid.grids, strict=True):
        assert (lay["rows"], lay["cols"]) == g.shape and lay["cell_size0"] == g.cell_size0 and lay["exact"]
        assert lay["patch_px"] == PATCH and len(lay["values"]) == g.n_cells
    top = o["cells_read"][0]  # the hot cell, drawn twice
    hot = grid.flat_index(2, *HOT_20X)
    assert top["cell"] == hot and top["draws"] == 2 and top["magnification"] == "20x"
    assert top["rect0"] == list(grid.cell_rects(np.array([hot]))[0])
    assert top["rect_um"] == pytest.approx([v * MPP for v in top["rect0"]])
    assert o["vmax"] == pytest.approx(top["attention"])
    assert o["tissue"] is not None
    assert set(o["probabilities"]) == set(CLASSES)
    assert "attention.geojson" in d["files"]


def test_deep_zoom_descriptor_and_tiles_show_the_slide(client, predict_out):
    text = client.get("/dz/alpha.dzi").text
    assert f'Width="{W}" Height="{H}"' in text and 'TileSize="254"' in text and 'Overlap="1"' in text
    top = 10  # ceil(log2(1024))
    full = client.get(f"/dz/alpha_files/{top}/1_1.jpeg")
    assert full.status_code == 200 and full.headers["content-type"] == "image/jpeg"
    tile = _image(full)
    assert tile.shape == (256, 256, 3)  # 254 + one pixel of overlap each side
    x0 = 254 - 1  # level-0 x of the tile's first column
    for x in (10, 200):
        expected = band_colour(x0 + x)
        assert np.abs(tile[40, x].astype(int) - expected).max() < 12, (x, tile[40, x], expected)
    small = _image(client.get("/dz/alpha_files/7/0_0.jpeg"))  # the whole slide in one 128 x 96 tile
    assert small.shape == (96, 128, 3)
    for i, colour in enumerate(BANDS):
        assert np.abs(small[20, 16 + 32 * i].astype(int) - colour).max() < 12


@pytest.mark.parametrize(
    "path",
    [
        "/dz/alpha_files/11/0_0.jpeg",  # past the top level
        "/dz/alpha_files/10/5_0.jpeg",  # past the last column
        "/dz/alpha_files/10/0_4.jpeg",
        "/dz/alpha_files/-1/0_0.jpeg",
        "/dz/alpha_files/x/0_0.jpeg",
        "/dz/alpha_files/10/0_0.png",
        "/dz/alpha_files/10/0.jpeg",
        "/dz/alpha_files/99999999999999999999/0_0.jpeg",
        "/api/slides/alpha/layers/3.png",
        "/api/slides/alpha/layers/-1.png",
        "/api/slides/alpha/cells/999999.png",
        "/api/slides/alpha/cells/abc.png",
    ],
)
def test_bad_levels_tiles_and_cells_are_404(client, path):
    response = client.get(path)
    assert response.status_code == 404, (path, response.status_code, response.text)


def test_layers_and_tissue_are_images_of_the_grids(client):
    grid = build_grid((W, H), MPP, LABELS, PATCH, "alpha")
    for j, g in enumerate(grid.grids):
        response = client.get(f"/api/slides/alpha/layers/{j}.png")
        assert response.status_code == 200 and response.headers["content-type"] == "image/png"
        image = Image.open(io.BytesIO(response.content))
        assert image.mode == "RGBA"
        block = image.width // g.cols
        assert image.size == (g.cols * block, g.rows * block)
    layer = np.asarray(Image.open(io.BytesIO(client.get("/api/slides/alpha/layers/2.png").content)))
    block = layer.shape[1] // grid.grids[2].cols
    hot = layer[HOT_20X[0] * block, HOT_20X[1] * block]
    cold = layer[0, 0]
    assert hot[3] == 255 and cold[3] < 100  # opaque where attention is high
    assert tuple(hot[:3]) == (253, 231, 37)  # viridis' top colour
    tissue = np.asarray(Image.open(io.BytesIO(client.get("/api/slides/alpha/tissue.png").content)))
    block = tissue.shape[1] // 128
    assert tissue.shape[:2] == (96 * block, 128 * block)  # the overview's mask, background shaded
    assert tissue[50 * block, 2 * block, 3] > 0 and tissue[50 * block, 60 * block, 3] == 0


def test_patch_is_the_cell_as_the_model_read_it(client, predict_out):
    grid = build_grid((W, H), MPP, LABELS, PATCH, "beta")
    cell = grid.flat_index(1, *HOT_10X)
    response = client.get(f"/api/slides/beta/cells/{cell}.png")
    assert response.status_code == 200
    patch = _image(response)
    with open_slide(predict_out.parent / "data" / "beta.tif") as reader:
        expected = reader.read_regions(grid.cell_rects(np.array([cell])), (PATCH, PATCH))[0]
    np.testing.assert_array_equal(patch, expected)


def test_slide_files_are_served_by_name(client, predict_out):
    response = client.get("/files/alpha/attention.geojson")
    assert response.status_code == 200
    assert json.loads(response.content)["type"] == "FeatureCollection"
    assert client.get("/files/alpha/prediction.json").json()["slide_id"] == "alpha"


@pytest.mark.parametrize(
    "path",
    [
        "/slide/nope",
        "/slide/%2e%2e",
        "/slide/..%2Fstatus.json",
        "/slide/%2Fetc%2Fpasswd",
        "/api/slides/nope",
        "/api/slides/..%2F..%2Fetc",
        "/api/slides/%2e%2e%2fpredict",
        "/dz/nope.dzi",
        "/dz/..%2Fslides%2Falpha.dzi",
        "/dz/nope_files/0/0_0.jpeg",
        "/files/alpha/../../status.json",
        "/files/alpha/..%2F..%2Fstatus.json",
        "/files/alpha/%2e%2e%2fbeta%2fprediction.json",
        "/files/alpha//etc/passwd",
        "/files/alpha/%2Fetc%2Fpasswd",
        "/files/alpha/config.yaml",
        "/files/nope/attention.geojson",
        "/files/broken/attention.geojson",  # failed: no folder
        "/static/../cohort.py",
        "/static/%2e%2e/cohort.py",
        "/static/..%2Fapp.py",
    ],
)
def test_unknown_ids_and_traversal_are_404(client, path):
    response = client.get(path)
    assert response.status_code == 404, (path, response.status_code)


def test_symlinks_out_of_the_folder_are_404(client, predict_out, tmp_path):
    secret = tmp_path / "secret.png"
    secret.write_bytes(b"secret")
    link = predict_out / "slides" / "alpha" / "heatmap_secret.png"
    link.symlink_to(secret)
    try:
        assert client.get("/files/alpha/heatmap_secret.png").status_code == 404
    finally:
        link.unlink()


def test_a_missing_slide_file_is_an_error_on_its_page_only(client):
    d = client.get("/api/slides/gone").json()
    assert "not found" in d["slide_error"] and "gone.tif" in d["slide_error"]
    assert d["outputs"]["predicted"] == "benign"  # its outputs still show
    assert client.get("/dz/gone.dzi").status_code == 404
    assert client.get("/dz/gone_files/8/0_0.jpeg").status_code == 404
    broken = client.get("/api/slides/broken").json()
    assert "prediction failed" in broken["outputs_error"] and broken["slide_error"]
    assert client.get("/dz/alpha_files/8/0_0.jpeg").status_code == 200  # the others keep working


def test_pages_and_static_assets(client):
    for path in ("/", "/slide/alpha"):
        response = client.get(path)
        assert response.status_code == 200 and response.headers["content-type"].startswith("text/html")
        assert "default-src 'self'" in response.headers["content-security-policy"]
    assert "OpenSeadragon" in client.get("/static/vendor/openseadragon/openseadragon.min.js").text[:200].replace(
        "openseadragon", "OpenSeadragon"
    )
    assert client.get("/static/vendor/openseadragon/LICENSE.txt").status_code == 200
    assert client.get("/static/slide.js").status_code == 200 and client.get("/static/nope.js").status_code == 404


@pytest.mark.parametrize(
    "path",
    [
        "/api/slides/alpha/cells/1e9.png",
        "/api/cohort?offset=99999999999999999999999",
        "/api/cohort?f_time_s=%3E%3E",
        "/api/cohort?f_probability=nan",
        "/dz/alpha_files/10/1_1.jpeg?x=1",
        "/api/slides/%00",
        "/files/alpha/%00",
        "/slide/" + "a" * 5000,
    ],
)
def test_odd_requests_never_cost_a_500(client, path):
    assert client.get(path).status_code < 500


def test_the_viewer_writes_nothing_under_the_folder(client, predict_out):
    before = _tree(predict_out)
    for path in [
        "/",
        "/api/cohort?sort=probability",
        "/api/slides/alpha",
        "/api/slides/gone",
        "/dz/alpha.dzi",
        "/dz/alpha_files/9/0_0.jpeg",
        "/api/slides/alpha/layers/0.png",
        "/api/slides/alpha/tissue.png",
        "/api/slides/alpha/cells/5.png",
        "/files/alpha/attention.geojson",
    ]:
        client.get(path)
    assert _tree(predict_out) == before
