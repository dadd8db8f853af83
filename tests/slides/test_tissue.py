"""Tissue detection on synthetic and real overviews; per-cell tissue fractions against brute force; overview size."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest

from loupe.slides import open_slide
from loupe.slides.grid import SlideGrid, build_grid
from loupe.slides.tissue import (
    TissueSettings,
    _otsu_index,
    cell_tissue_fraction,
    cell_validity,
    detect_tissue,
    overview_size,
)

H, W = 768, 1024
PINK = (232, 150, 195)
PURPLE = (150, 85, 170)
GLASS = (243, 242, 240)


def _noisy(shape: tuple[int, int], colour: tuple[int, int, int], amp: int, rng: np.random.Generator) -> np.ndarray:
    noise = rng.integers(-amp, amp + 1, size=(*shape, 3))
    return np.clip(np.asarray(colour) + noise, 0, 255).astype(np.uint8)


def _disc(cy: float, cx: float, r: float) -> np.ndarray:
    yy, xx = np.mgrid[0:H, 0:W]
    return (yy - cy) ** 2 + (xx - cx) ** 2 <= r * r


def _synthetic_overview() -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """White glass with a pink and a purple blob, a small hole, a big enclosed glass region and specks."""
    rng = np.random.default_rng(0)
    img = _noisy((H, W), GLASS, 4, rng)
    pink = _disc(250, 280, 150)
    hole = _disc(250, 280, 15)  # ~700 px, under 1% of the image: filled
    ring = _disc(500, 750, 200) & ~_disc(500, 750, 110)  # encloses ~38,000 px of glass (~5%): kept as glass
    inside_ring = _disc(500, 750, 100)
    img[pink] = _noisy((H, W), PINK, 20, rng)[pink]
    img[ring] = _noisy((H, W), PURPLE, 20, rng)[ring]
    img[hole] = _noisy((H, W), GLASS, 4, rng)[hole]
    specks = np.zeros((H, W), dtype=bool)
    for y, x in [(60, 900), (700, 80), (720, 400), (40, 40)]:
        specks[y : y + 3, x : x + 3] = True  # 9 px, under the 79 px minimum object size
    img[specks] = PURPLE
    return img, {"pink": pink, "hole": hole, "ring": ring, "inside_ring": inside_ring, "specks": specks}


def _stained_everywhere(seed: int = 1) -> np.ndarray:
    """A BACH-like patch: tissue over the whole image, saturation spread 0.15..0.7 (unimodal, no glass)."""
    rng = np.random.default_rng(seed)
    base = np.asarray([[225.0, 190.0, 215.0], [235.0, 120.0, 180.0], [120.0, 60.0, 150.0]])
    # smooth random mixing weights of pale, pink and purple
    coarse = rng.random((H // 32 + 2, W // 32 + 2, 3))
    weights = np.kron(coarse, np.ones((32, 32, 1)))[:H, :W] ** 3
    weights /= weights.sum(axis=-1, keepdims=True)
    img = weights @ base + rng.normal(0, 6, size=(H, W, 3))
    return np.clip(img, 0, 255).astype(np.uint8)


# --- detect_tissue -------------------------------------------------------------------------------------------------


def test_blobs_found_hole_filled_specks_removed() -> None:
    img, parts = _synthetic_overview()
    mask = detect_tissue(img)
    assert mask.shape == (H, W) and mask.dtype == bool
    # blobs found (interior fully, boundaries allowed a pixel of smoothing)
    assert mask[parts["pink"]].mean() > 0.99
    assert mask[parts["ring"]].mean() > 0.99
    # small hole filled, large enclosed glass kept as glass
    assert mask[parts["hole"]].all()
    assert not mask[parts["inside_ring"]].any()
    # specks removed, glass empty
    assert not mask[parts["specks"]].any()
    truth = parts["pink"] | parts["ring"]
    assert (mask & ~truth).sum() < 0.002 * H * W


def test_settings_switch_hole_filling_and_speck_removal() -> None:
    img, parts = _synthetic_overview()
    mask = detect_tissue(img, TissueSettings(fill_holes=False, min_object_fraction=0.0))
    assert not mask[parts["hole"]].any()
    assert mask[parts["specks"]].mean() > 0.5
    filled_big = detect_tissue(img, TissueSettings(max_hole_fraction=0.1))
    assert filled_big[parts["inside_ring"]].all()


@pytest.mark.parametrize("amp", [0, 3])
def test_blank_glass_has_no_tissue(amp: int) -> None:
    rng = np.random.default_rng(2)
    assert not detect_tissue(_noisy((H, W), GLASS, amp, rng)).any()
    # grey glass (a dim scan): not near-white, so only the saturation floor keeps its noise out
    assert not detect_tissue(_noisy((H, W), (200, 199, 196), amp, rng)).any()
    # bright pinkish glass, saturation ~0.055 (above the floor): the white level keeps it out
    assert not detect_tissue(_noisy((H, W), (254, 240, 249), amp, rng)).any()
    assert not detect_tissue(np.full((H, W, 3), 255, dtype=np.uint8)).any()
    assert not detect_tissue(np.zeros((H, W, 3), dtype=np.uint8)).any()


def test_stained_everywhere_is_all_tissue() -> None:
    img = _stained_everywhere()
    mask = detect_tissue(img)
    assert mask.mean() > 0.995
    # without the no-glass-mode rule, Otsu cuts the unimodal tissue in two: the rule is what keeps it whole
    naive = detect_tissue(img, TissueSettings(max_background_saturation=1.0))
    assert naive.mean() < 0.9


def test_stained_with_glass_margin() -> None:
    img = _stained_everywhere(seed=3)
    img[:, :120] = _noisy((H, 120), GLASS, 4, np.random.default_rng(4))  # glass along the left edge
    img[:30, 500:540] = GLASS  # a small notch of glass at the top edge: open to the border, so not a hole
    mask = detect_tissue(img)
    assert not mask[:, :118].any()
    assert not mask[:28, 502:538].any()
    assert mask[:, 122:].mean() > 0.99


def test_tinted_background_and_black_border() -> None:
    rng = np.random.default_rng(5)
    img = _noisy((H, W), (222, 230, 245), 3, rng)  # bluish glass, saturation ~0.09 (above the floor)
    blob = _disc(384, 512, 200)
    img[blob] = _noisy((H, W), PINK, 20, rng)[blob]
    img[:40] = 0  # black scanner border
    img[-40:] = (8, 12, 5)
    mask = detect_tissue(img)
    assert mask[blob].mean() > 0.99
    assert (mask & ~blob).sum() < 0.002 * H * W
    assert not mask[:40].any() and not mask[-40:].any()


def test_otsu_matches_brute_force() -> None:
    rng = np.random.default_rng(6)
    for _ in range(20):
        values = np.concatenate([rng.normal(rng.uniform(10, 100), 10, 500), rng.normal(rng.uniform(120, 240), 15, 300)])
        hist = np.bincount(np.clip(values, 0, 255).astype(int), minlength=256)
        levels = np.repeat(np.arange(256), hist)
        best, best_k = -1.0, -1
        for k in range(255):
            lo, hi = levels[levels <= k], levels[levels > k]
            if lo.size == 0 or hi.size == 0:
                continue
            between = lo.size * hi.size * (lo.mean() - hi.mean()) ** 2
            if between > best + 1e-9:
                best, best_k = between, k
        assert _otsu_index(hist) == best_k


def test_detect_tissue_rejects_bad_input_and_settings() -> None:
    with pytest.raises(ValueError, match="uint8"):
        detect_tissue(np.zeros((10, 10, 3), dtype=np.float32))
    with pytest.raises(ValueError, match="RGB"):
        detect_tissue(np.zeros((10, 10), dtype=np.uint8))
    with pytest.raises(ValueError, match="min_saturation"):
        TissueSettings(min_saturation=1.5)
    with pytest.raises(ValueError, match="smooth_px"):
        TissueSettings(smooth_px=-1)


def test_real_slide_tissue_fraction(slides_dir: Path) -> None:
    with open_slide(slides_dir / "cmu-1-small-region.svs") as reader:
        size = overview_size(reader.dimensions, None)
        assert size == (766, 1024)  # 2220 x 2967 level 0: long side min_side
        overview = reader.thumbnail(size)
    mask = detect_tissue(overview)
    # a skin section covering about a third of the field, the rest glass (measured 0.35)
    assert 0.25 < mask.mean() < 0.45
    # glass in the top-left corner and right margin, tissue in the bottom centre
    assert not mask[100:300, 20:200].any()
    assert not mask[400:600, 700:].any()
    assert mask[900:1000, 250:500].mean() > 0.8


def test_real_slide_inside_tissue_is_all_tissue(slides_dir: Path) -> None:
    # a crop inside a TCGA section: no glass mode, so the whole crop (bar a few lumens) is tissue (measured 0.97)
    with open_slide(slides_dir / "tcga-cr-7395-01a-01-ts1.svs") as reader:
        overview = reader.thumbnail(overview_size(reader.dimensions, None))
    assert overview.shape == (822, 1024, 3)
    whole = detect_tissue(overview)
    assert 0.5 < whole.mean() < 0.75  # measured 0.63
    crop = detect_tissue(np.ascontiguousarray(overview[300:600, 250:750]))
    assert crop.mean() > 0.93


# --- cell fractions ------------------------------------------------------------------------------------------------


def _brute_force_fractions(mask: np.ndarray, grid: SlideGrid) -> np.ndarray:
    """Loop over cells; exact overlap of each cell (clipped to the image) with each mask pixel."""
    mh, mw = mask.shape
    width, height = grid.dimensions
    px_x, px_y = width / mw, height / mh
    out = []
    for g in grid.grids:
        s = g.cell_size0
        for row in range(g.rows):
            for col in range(g.cols):
                x0, x1 = col * s, min((col + 1) * s, width)
                y0, y1 = row * s, min((row + 1) * s, height)
                cx = np.arange(mw) * px_x
                cy = np.arange(mh) * px_y
                ox = np.clip(np.minimum(x1, cx + px_x) - np.maximum(x0, cx), 0, None)
                oy = np.clip(np.minimum(y1, cy + px_y) - np.maximum(y0, cy), 0, None)
                out.append(float(oy @ mask.astype(float) @ ox) / ((x1 - x0) * (y1 - y0)))
    return np.asarray(out)


def _rect_grid() -> tuple[SlideGrid, np.ndarray]:
    """1160 x 900 slide at 0.5 µm/px, cells of 200/100/50 level-0 px, a 290 x 225 mask (4 level-0 px per pixel).

    Tissue: x in [180, 620) x y in [400, 900) (to the bottom edge) and x in [1120, 1160) x y in [0, 100) (right edge).
    """
    grid = build_grid((1160, 900), 0.5, ["2.0", "1.0", "0.5"], 50, "x")
    mask = np.zeros((225, 290), dtype=bool)
    mask[100:225, 45:155] = True
    mask[0:25, 280:290] = True
    return grid, mask


def _split(values: np.ndarray, grid: SlideGrid) -> list[np.ndarray]:
    return [values[o : o + g.n_cells].reshape(g.rows, g.cols) for o, g in zip(grid.offsets, grid.grids, strict=True)]


def test_cell_fractions_of_a_known_rectangle() -> None:
    grid, mask = _rect_grid()
    assert grid.shapes == ((5, 6), (9, 12), (18, 24))
    f0, f1, f2 = _split(cell_tissue_fraction(mask, grid), grid)
    # 2.0 µm/px, cells of 200: column 0 holds [180, 200) = 0.1, column 3 [600, 620) = 0.1; row 4 is half outside the
    # image but its in-image part is all tissue
    expected0 = np.zeros((5, 6))
    expected0[2:5, [0, 3]] = 0.1
    expected0[2:5, 1:3] = 1.0
    expected0[0, 5] = 40 * 100 / (160 * 200)  # right-edge cell: 160 px wide in the image
    np.testing.assert_allclose(f0, expected0, atol=1e-9)
    # 1.0 µm/px, cells of 100
    expected1 = np.zeros((9, 12))
    expected1[4:9, [1, 6]] = 0.2
    expected1[4:9, 2:6] = 1.0
    expected1[0, 11] = 40 / 60  # in-image part [1100, 1160)
    np.testing.assert_allclose(f1, expected1, atol=1e-9)
    # 0.5 µm/px, cells of 50: the last column is only 10 px wide in the image and all tissue there
    expected2 = np.zeros((18, 24))
    expected2[8:18, [3, 12]] = 0.4
    expected2[8:18, 4:12] = 1.0
    expected2[0:2, 22] = 0.6
    expected2[0:2, 23] = 1.0
    np.testing.assert_allclose(f2, expected2, atol=1e-9)


def test_cell_validity_of_a_known_rectangle() -> None:
    grid, mask = _rect_grid()
    v0, v1, v2 = _split(cell_validity(mask, grid, 0.05), grid)
    assert set(zip(*np.nonzero(v0), strict=True)) == {(r, c) for r in range(2, 5) for c in range(4)} | {(0, 5)}
    assert set(zip(*np.nonzero(v1), strict=True)) == {(r, c) for r in range(4, 9) for c in range(1, 7)} | {(0, 11)}
    expected2 = {(r, c) for r in range(8, 18) for c in range(3, 13)} | {(r, c) for r in (0, 1) for c in (22, 23)}
    assert set(zip(*np.nonzero(v2), strict=True)) == expected2
    # a stricter threshold drops the 10% and 12.5% border cells at the coarsest magnification
    s0 = _split(cell_validity(mask, grid, 0.2), grid)[0]
    assert set(zip(*np.nonzero(s0), strict=True)) == {(r, c) for r in range(2, 5) for c in (1, 2)}
    assert cell_validity(mask, grid, 0.0).all()
    assert not cell_validity(np.zeros_like(mask), grid, 0.01).any()
    with pytest.raises(ValueError, match="min_fraction"):
        cell_validity(mask, grid, 1.5)


def test_cell_fractions_match_rasterised_mask() -> None:
    # aligned geometry: rasterise the mask at level 0 (4 x 4 px per mask pixel) and count tissue pixels per cell
    rng = np.random.default_rng(7)
    grid = build_grid((1160, 900), 0.5, ["2.0", "1.0", "0.5"], 50, "x")
    mask = rng.random((225, 290)) < 0.3
    raster = mask.repeat(4, axis=0).repeat(4, axis=1)
    expected = []
    for g in grid.grids:
        s = int(g.cell_size0)
        for row in range(g.rows):
            for col in range(g.cols):
                block = raster[row * s : (row + 1) * s, col * s : (col + 1) * s]
                expected.append(block.mean())
    np.testing.assert_allclose(cell_tissue_fraction(mask, grid), expected, atol=1e-9)


@pytest.mark.parametrize(
    ("dims", "mpp", "mags", "patch", "mask_shape"),
    [
        ((1000, 733), 0.42, ["2.0", "1.0", "0.5"], 37, (41, 57)),  # cells of ~176/88/44 px, mask px ~17.5 x 17.9
        ((1000, 733), 0.5, ["2.0", "1.0", "0.5"], 8, (12, 16)),  # cells of 32/16/8 px, far smaller than mask px ~62
        ((2048, 1536), 0.42, ["1.68", "0.84", "0.42"], 299, (768, 1024)),  # BACH geometry, mask px of 2 level-0 px
        ((3001, 517), 0.25, ["2.0", "1.0", "0.5"], 20, (450, 600)),  # cells of 160/80/40 px, more mask px than level 0
    ],
)
def test_cell_fractions_match_brute_force(
    dims: tuple[int, int], mpp: float, mags: list[str], patch: int, mask_shape: tuple[int, int]
) -> None:
    rng = np.random.default_rng(8)
    grid = build_grid(dims, mpp, mags, patch, "x")
    for density in (0.05, 0.5):
        mask = rng.random(mask_shape) < density
        got = cell_tissue_fraction(mask, grid)
        assert got.shape == (grid.n_cells,)
        np.testing.assert_allclose(got, _brute_force_fractions(mask, grid), atol=1e-6)


def test_cell_smaller_than_a_mask_pixel_takes_that_pixel() -> None:
    grid = build_grid((1000, 750), 0.5, ["0.5"], 10, "x")  # 100 x 75 cells of 10 px
    mask = np.zeros((3, 4), dtype=bool)  # mask pixels of 250 x 250 level-0 px
    mask[1, 2] = True  # level-0 x in [500, 750), y in [250, 500)
    frac = cell_tissue_fraction(mask, grid).reshape(75, 100)
    expected = np.zeros((75, 100))
    expected[25:50, 50:75] = 1.0
    np.testing.assert_allclose(frac, expected, atol=1e-12)


def test_cell_fraction_rejects_bad_mask() -> None:
    grid = build_grid((1000, 750), 0.5, ["0.5"], 10, "x")
    with pytest.raises(ValueError, match="2-D"):
        cell_tissue_fraction(np.zeros((3, 4, 3), dtype=bool), grid)


# --- overview size -------------------------------------------------------------------------------------------------


def test_overview_size() -> None:
    dims = (100_000, 50_000)
    assert overview_size(dims, None) == (1024, 512)
    # finest cells of 224 level-0 px: 4 px per cell needs 100000 * 4 / 224 = 1786 px on the long side
    grid = build_grid(dims, 0.25, ["2.0", "1.0", "0.5"], 112, "x")
    assert overview_size(dims, grid) == (1786, 893)
    assert overview_size(dims, grid, px_per_cell=1) == (1024, 512)
    # finest cells of 56 px would need 7143 px: capped
    fine = build_grid(dims, 0.25, ["0.5"], 28, "x")
    assert overview_size(dims, fine) == (4096, 2048)
    assert overview_size(dims, fine, max_side=2000) == (2000, 1000)
    # portrait, aspect preserved
    w, h = overview_size((30_000, 80_000), None)
    assert h == 1024 and w == round(30_000 * 1024 / 80_000)
    # never upsampled past level 0
    assert overview_size((800, 600), None) == (800, 600)
    bach = build_grid((2048, 1536), 0.42, ["1.68", "0.84", "0.42"], 299, "bach")
    assert overview_size((2048, 1536), bach) == (1024, 768)
    with pytest.raises(ValueError, match="positive"):
        overview_size((0, 10), None)
    with pytest.raises(ValueError, match="min_side"):
        overview_size((10, 10), None, min_side=5000, max_side=4096)


def test_overview_size_gives_px_per_cell() -> None:
    dims = (60_000, 45_000)
    grid = build_grid(dims, 0.25, ["2.0", "1.0", "0.5"], 64, "x")  # finest cell 128 level-0 px
    w, h = overview_size(dims, grid)
    assert w / dims[0] * 128 == pytest.approx(4, rel=1e-3)
    assert math.isclose(w / h, dims[0] / dims[1], rel_tol=1e-3)
