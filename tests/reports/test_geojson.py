"""Attention GeoJSON for QuPath: valid structure, exact clipped cell rectangles, selection rules, plain JSON types."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from loupe.errors import LoupeError
from loupe.reports.geojson import OBJECT_TYPES, attention_geojson, write_attention_geojson
from loupe.slides.grid import SlideGrid, build_grid

# Not multiples of any cell size (512, 256, 128 level-0 px at 2.0, 1.0, 0.5 µm/px on a 0.25 µm/px slide).
W, H = 1000, 700


@pytest.fixture()
def grid() -> SlideGrid:
    return build_grid((W, H), 0.25, ["2.0", "1.0", "0.5"], 64, "x")


def _labels(grid: SlideGrid) -> list[str]:
    return [g.magnification.label for g in grid.grids]


def _is_number(value: object) -> bool:
    return type(value) in (int, float) and math.isfinite(value)


def validate_geojson(obj: Any) -> None:
    """Small structural GeoJSON check (FeatureCollection of Polygon Features); raises AssertionError on a fault."""
    assert isinstance(obj, dict), "top level must be an object"
    assert obj.get("type") == "FeatureCollection", "type must be FeatureCollection"
    features = obj.get("features")
    assert isinstance(features, list), "features must be a list"
    for i, feature in enumerate(features):
        assert isinstance(feature, dict) and feature.get("type") == "Feature", f"feature {i}: type must be Feature"
        geometry = feature.get("geometry")
        assert isinstance(geometry, dict) and geometry.get("type") == "Polygon", f"feature {i}: not a Polygon"
        coordinates = geometry.get("coordinates")
        assert isinstance(coordinates, list) and len(coordinates) == 1, f"feature {i}: need exactly one linear ring"
        ring = coordinates[0]
        assert isinstance(ring, list) and len(ring) >= 4, f"feature {i}: a linear ring needs >= 4 positions"
        for position in ring:
            assert isinstance(position, list) and len(position) == 2, f"feature {i}: positions are [x, y]"
            assert all(_is_number(v) for v in position), f"feature {i}: non-finite or non-numeric coordinate"
        assert ring[0] == ring[-1], f"feature {i}: ring is not closed"
        assert isinstance(feature.get("properties"), dict), f"feature {i}: properties must be an object"


def _clipped_rect(grid: SlideGrid, cell: int) -> tuple[float, float, float, float]:
    x0, y0, w0, h0 = grid.cell_rects(np.asarray([cell]))[0]
    return max(x0, 0.0), max(y0, 0.0), min(x0 + w0, W), min(y0 + h0, H)


def _walk_types(obj: Any) -> set[type]:
    if isinstance(obj, dict):
        assert all(type(k) is str for k in obj)
        return {dict}.union(*(_walk_types(v) for v in obj.values()))
    if isinstance(obj, list):
        return {list}.union(*(_walk_types(v) for v in obj))
    return {type(obj)}


def _cells(fc: dict) -> list[int]:
    return [f["properties"]["cell"] for f in fc["features"]]


def test_validator_can_fail() -> None:
    good = {
        "type": "FeatureCollection",
        "features": [
            {
                "type": "Feature",
                "geometry": {"type": "Polygon", "coordinates": [[[0, 0], [1, 0], [1, 1], [0, 1], [0, 0]]]},
                "properties": {},
            }
        ],
    }
    validate_geojson(good)
    open_ring = json.loads(json.dumps(good))
    open_ring["features"][0]["geometry"]["coordinates"][0][-1] = [0, 1]
    short_ring = json.loads(json.dumps(good))
    short_ring["features"][0]["geometry"]["coordinates"][0] = [[0, 0], [1, 0], [0, 0]]
    nan = json.loads(json.dumps(good))
    nan["features"][0]["geometry"]["coordinates"][0][1] = [float("nan"), 0]
    no_props = json.loads(json.dumps(good))
    no_props["features"][0]["properties"] = None
    for bad in (open_ring, short_ring, nan, no_props, {"type": "Feature"}, {**good, "features": {}}):
        with pytest.raises(AssertionError):
            validate_geojson(bad)


def test_every_cell_is_its_clipped_rectangle(grid: SlideGrid) -> None:
    assert W % 128 and H % 128  # edge cells overhang the image at every magnification
    attention = np.random.default_rng(0).uniform(0.1, 1.0, grid.n_cells)
    attention /= attention.sum()
    fc = attention_geojson(grid, attention, _labels(grid), min_share=0.0)
    validate_geojson(fc)
    assert sorted(_cells(fc)) == list(range(grid.n_cells))
    clipped_edges = 0
    for feature in fc["features"]:
        cell = feature["properties"]["cell"]
        x0, y0, x1, y1 = _clipped_rect(grid, cell)
        assert feature["geometry"]["coordinates"] == [[[x0, y0], [x1, y0], [x1, y1], [x0, y1], [x0, y0]]]
        xs = [p[0] for p in feature["geometry"]["coordinates"][0]]
        ys = [p[1] for p in feature["geometry"]["coordinates"][0]]
        assert 0 <= min(xs) < max(xs) <= W and 0 <= min(ys) < max(ys) <= H
        raw = grid.cell_rects(np.asarray([cell]))[0]
        clipped_edges += (raw[0] + raw[2] > W) + (raw[1] + raw[3] > H)
    assert clipped_edges > 0


def test_coordinates_rounded_for_fractional_cells() -> None:
    grid = build_grid((W, H), 0.3, ["2.0", "1.0"], 64, "x")  # cell sides 426.67 and 213.33 level-0 px
    attention = np.full(grid.n_cells, 1.0 / grid.n_cells)
    fc = attention_geojson(grid, attention, _labels(grid), min_share=0.0)
    validate_geojson(fc)
    for feature in fc["features"]:
        x0, y0, x1, y1 = _clipped_rect(grid, feature["properties"]["cell"])
        ring = feature["geometry"]["coordinates"][0]
        assert ring == [[round(x0, 2), round(y0, 2)], [round(x1, 2), round(y0, 2)], [round(x1, 2), round(y1, 2)],
                        [round(x0, 2), round(y1, 2)], [round(x0, 2), round(y0, 2)]]  # fmt: skip
        assert all(p == [round(p[0], 2), round(p[1], 2)] for p in ring)


def test_properties_for_qupath(grid: SlideGrid) -> None:
    labels = ["low", "mid", "high"]
    attention = np.linspace(1.0, 2.0, grid.n_cells)
    sampled = np.asarray([0, 5, grid.n_cells - 1])
    fc = attention_geojson(grid, attention, labels, sampled, min_share=0.0, slide_id="slide-7")
    assert fc["metadata"]["slide_id"] == "slide-7"
    assert fc["metadata"]["dimensions"] == [W, H]
    colours: dict[str, list[int]] = {}
    for feature in fc["features"]:
        props = feature["properties"]
        cell = props["cell"]
        mag, row, col = grid.cell(cell)
        assert (props["row"], props["col"]) == (row, col)
        assert props["magnification"] == labels[mag]
        assert props["probability"] == pytest.approx(attention[cell])
        assert props["sampled"] is (cell in sampled)
        assert props["objectType"] == "tile" and props["objectType"] in OBJECT_TYPES
        classification = props["classification"]
        assert set(classification) == {"name", "color"} and classification["name"] == labels[mag]
        colour = classification["color"]
        assert len(colour) == 3 and all(type(c) is int and 0 <= c <= 255 for c in colour)
        assert colours.setdefault(labels[mag], colour) == colour
        measurements = props["measurements"]
        assert isinstance(measurements, dict) and all(_is_number(v) for v in measurements.values())
        assert measurements["probability"] == props["probability"]
        assert measurements["probability / max"] == pytest.approx(attention[cell] / attention.max())
        assert measurements["sampled"] == (1.0 if cell in sampled else 0.0)
    assert len({tuple(c) for c in colours.values()}) == 3


def test_object_type_option(grid: SlideGrid) -> None:
    attention = np.ones(grid.n_cells)
    fc = attention_geojson(grid, attention, _labels(grid), object_type="annotation", max_features=2)
    assert {f["properties"]["objectType"] for f in fc["features"]} == {"annotation"}
    with pytest.raises(LoupeError, match="object_type"):
        attention_geojson(grid, attention, _labels(grid), object_type="polygon")


def test_selection_sampled_min_share_and_zeros(grid: SlideGrid) -> None:
    attention = np.zeros(grid.n_cells)
    attention[[3, 10, 20, 30, 40]] = [0.5, 0.25, 0.125, 0.12, 0.01]
    zero_cell = 50
    sampled = np.asarray([40, zero_cell])  # 40 is below the share but read; 50 is read yet has zero probability
    fc = attention_geojson(grid, attention, _labels(grid), sampled, min_share=0.25)
    validate_geojson(fc)
    # threshold 0.25 * 0.5 = 0.125: cell 20 is exactly at it (kept), 30 just below (dropped); 40 kept as sampled
    assert _cells(fc) == [3, 10, 20, 40]
    assert [f["properties"]["sampled"] for f in fc["features"]] == [False, False, False, True]
    everything = attention_geojson(grid, attention, _labels(grid), sampled, min_share=0.0)
    assert _cells(everything) == [3, 10, 20, 30, 40]  # zero-probability cells never, sampled or not
    only_max = attention_geojson(grid, attention, _labels(grid), min_share=1.0)
    assert _cells(only_max) == [3]


def test_sampled_mask_equals_indices(grid: SlideGrid) -> None:
    attention = np.linspace(0.001, 1.0, grid.n_cells)
    indices = np.asarray([0, 1, 7], dtype=np.int32)
    mask = np.zeros(grid.n_cells, dtype=bool)
    mask[indices] = True
    by_index = attention_geojson(grid, attention, _labels(grid), indices, min_share=0.5)
    by_mask = attention_geojson(grid, attention, _labels(grid), mask, min_share=0.5)
    assert by_index == by_mask
    assert {0, 1, 7} <= set(_cells(by_index))


def test_max_features_keeps_highest_and_all_sampled(grid: SlideGrid) -> None:
    rng = np.random.default_rng(1)
    attention = rng.permutation(np.arange(1, grid.n_cells + 1, dtype=np.float64))
    by_value = list(np.argsort(-attention, kind="stable"))
    top3 = attention_geojson(grid, attention, _labels(grid), min_share=0.0, max_features=3)
    assert _cells(top3) == by_value[:3]
    low = by_value[-2:]  # the two weakest cells, read by the sampler
    mixed = attention_geojson(grid, attention, _labels(grid), np.asarray(low), min_share=0.0, max_features=3)
    assert _cells(mixed) == [by_value[0], *low]  # sorted highest first, sampled cells use up the budget
    many = by_value[-4:]
    over = attention_geojson(grid, attention, _labels(grid), np.asarray(many), min_share=0.0, max_features=3)
    assert _cells(over) == many  # sampled cells always kept, even past the cap
    none_extra = attention_geojson(grid, attention, _labels(grid), np.asarray(low), min_share=0.0, max_features=0)
    assert _cells(none_extra) == low
    probs = [f["properties"]["probability"] for f in top3["features"]]
    assert probs == sorted(probs, reverse=True)


def test_ties_break_by_cell_index(grid: SlideGrid) -> None:
    attention = np.ones(grid.n_cells)
    fc = attention_geojson(grid, attention, _labels(grid), max_features=5)
    assert _cells(fc) == [0, 1, 2, 3, 4]


def test_all_zero_attention_gives_empty_collection(grid: SlideGrid) -> None:
    fc = attention_geojson(grid, np.zeros(grid.n_cells), _labels(grid), np.asarray([1, 2]))
    validate_geojson(fc)
    assert fc["features"] == []


def test_json_round_trip_and_no_numpy_types(grid: SlideGrid) -> None:
    attention = np.random.default_rng(2).uniform(0, 1, grid.n_cells).astype(np.float32)
    sampled = np.asarray([4, 9], dtype=np.int32)
    fc = attention_geojson(grid, attention, _labels(grid), sampled, min_share=np.float64(0.2), max_features=20)
    assert _walk_types(fc) <= {dict, list, str, int, float, bool}
    text = json.dumps(fc, allow_nan=False)
    assert json.loads(text) == fc
    validate_geojson(json.loads(text))


def test_write_attention_geojson_loads_back(grid: SlideGrid, tmp_path: Path) -> None:
    attention = np.linspace(0.0, 1.0, grid.n_cells)
    target = tmp_path / "out" / "slide.geojson"
    written = write_attention_geojson(target, grid, attention, _labels(grid), np.asarray([1]), slide_id="s1")
    assert written == target
    with target.open(encoding="utf-8") as handle:
        loaded = json.load(handle)
    validate_geojson(loaded)
    assert loaded == attention_geojson(grid, attention, _labels(grid), np.asarray([1]), slide_id="s1")
    assert [p.name for p in target.parent.iterdir()] == ["slide.geojson"]  # no temp file left behind


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"attention": np.ones(3)}, "shape"),
        ({"attention": "neg"}, "negative or non-finite"),
        ({"attention": "nan"}, "negative or non-finite"),
        ({"labels": ["a", "b"]}, "labels"),
        ({"sampled": np.asarray([10_000])}, "sampled"),
        ({"sampled": np.asarray([0.5])}, "sampled"),
        ({"sampled": np.zeros(3, dtype=bool)}, "sampled"),
        ({"min_share": 1.5}, "min_share"),
        ({"min_share": float("nan")}, "min_share"),
        ({"max_features": -1}, "max_features"),
        ({"max_features": 2.5}, "max_features"),
    ],
)
def test_bad_inputs_are_refused(grid: SlideGrid, kwargs: dict, match: str) -> None:
    args: dict[str, Any] = {"attention": np.ones(grid.n_cells), "labels": _labels(grid)}
    args.update(kwargs)
    if isinstance(args["attention"], str):
        bad = np.ones(grid.n_cells)
        bad[2] = -1.0 if args["attention"] == "neg" else np.nan
        args["attention"] = bad
    with pytest.raises(LoupeError, match=match):
        attention_geojson(grid, **args)
