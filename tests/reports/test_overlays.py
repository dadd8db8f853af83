"""Attention heatmaps: the right pixels change, maps share one scale, the figure has one panel per map."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from loupe.errors import LoupeError
from loupe.reports.overlays import attention_overlay, heatmap_image, panel_titles

H, W = 60, 80


def _grey() -> np.ndarray:
    return np.full((H, W, 3), 128, dtype=np.uint8)


def _change(out: np.ndarray, base: np.ndarray) -> np.ndarray:
    return np.abs(out.astype(int) - base.astype(int)).sum(axis=2)


def test_hottest_cell_changes_most_and_zero_cells_are_untouched() -> None:
    att = np.zeros((3, 4))
    att[1, 2] = 0.6
    att[0, 0] = 0.3
    att[2, 3] = 0.1
    base = _grey()
    out = heatmap_image(base, att, (20, 20))
    assert out.shape == (H, W, 3) and out.dtype == np.uint8
    change = _change(out, base)
    cells = change.reshape(3, 20, 4, 20).transpose(0, 2, 1, 3)  # (row, col, y, x)
    per_cell = cells.mean(axis=(2, 3))
    assert np.unravel_index(per_cell.argmax(), per_cell.shape) == (1, 2)
    assert np.all(change[20:40, 40:60] > 0)  # the whole hottest cell is coloured
    np.testing.assert_array_equal(cells[att == 0], 0)  # no attention: unchanged
    assert per_cell[0, 0] > per_cell[2, 3] > 0


def test_cells_are_cropped_at_the_image_edge() -> None:
    att = np.array([[0.0, 0.0], [0.0, 1.0]])  # 2×2 cells of 50×40 px cover 100×80 > 80×60
    base = _grey()
    change = _change(heatmap_image(base, att, (50, 40)), base)
    assert np.all(change[40:, 50:] > 0)
    assert np.all(change[:40, :] == 0) and np.all(change[:, :50] == 0)


def test_shared_vmax_makes_weaker_map_fainter() -> None:
    att = np.array([[0.2, 0.0], [0.0, 0.0]])
    base = _grey()
    own_scale = _change(heatmap_image(base, att, (40, 30)), base)[:30, :40].mean()
    shared = _change(heatmap_image(base, att, (40, 30), vmax=0.8), base)[:30, :40].mean()
    assert 0 < shared < own_scale


def test_panel_titles_give_share_of_total_attention() -> None:
    maps = [np.full((2, 2), 0.015), np.full((4, 3), 0.065), np.full((7, 6), 0.16 / 42)]
    assert panel_titles(maps, ["50X", "100X", "200X"]) == ["50X · 6%", "100X · 78%", "200X · 16%"]


def _overlay_width(tmp_path: Path, n_maps: int) -> int:
    rng = np.random.default_rng(n_maps)
    thumb = rng.integers(0, 256, size=(H, W, 3), dtype=np.uint8)
    shapes = [(2, 2), (4, 3), (7, 6)][:n_maps]
    maps = [rng.random(s) for s in shapes]
    total = sum(m.sum() for m in maps)
    maps = [m / total for m in maps]
    extents = [(W / s[1], H / s[0]) for s in shapes]
    sampled = [[(0, 0)] for _ in shapes]
    labels = ["50X", "100X", "200X"][:n_maps]
    out = attention_overlay(thumb, maps, labels, extents, tmp_path / f"o{n_maps}.png", "slide 1", sampled)
    image = Image.open(out)
    image.load()
    assert image.format == "PNG" and out.stat().st_size > 0
    return image.width


def test_overlay_png_has_one_panel_per_magnification(tmp_path: Path) -> None:
    one, three = _overlay_width(tmp_path, 1), _overlay_width(tmp_path, 3)
    # thumbnail + 1 panel vs thumbnail + 3 panels (plus a colour bar of fixed width)
    assert 1.5 < three / one < 2.2


def test_overlay_rejects_mismatched_inputs(tmp_path: Path) -> None:
    thumb = _grey()
    maps = [np.full((2, 2), 0.25)]
    with pytest.raises(LoupeError, match="must match"):
        attention_overlay(thumb, maps, ["50X", "100X"], [(40, 30)], tmp_path / "x.png")
    with pytest.raises(LoupeError, match="outside"):
        attention_overlay(thumb, maps, ["50X"], [(40, 30)], tmp_path / "x.png", sampled=[[(2, 0)]])
    with pytest.raises(LoupeError, match="positive"):
        heatmap_image(thumb, maps[0], (0, 30))
    assert not (tmp_path / "x.png").exists()
