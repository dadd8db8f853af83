"""The pyramid reading shared by the OpenSlide and tiffslide backends: level choice, resampling, white outside."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from loupe.slides import open_slide
from loupe.slides.openslide_reader import OpenSlideReader
from loupe.slides.pyramid import PyramidReader
from loupe.slides.tiffslide_reader import TiffSlideReader


class ArrayPyramid(PyramidReader):
    """A pyramid of in-memory RGBA levels; records which level each read used."""

    def __init__(self, levels: list[np.ndarray]) -> None:
        super().__init__("in-memory")
        self._levels = levels
        self._level_dimensions = tuple((int(a.shape[1]), int(a.shape[0])) for a in levels)
        self._level_downsamples = tuple(levels[0].shape[1] / a.shape[1] for a in levels)
        self.reads: list[int] = []

    @property
    def file_mpp(self) -> float | None:
        return None

    @property
    def vendor(self) -> str:
        return "test"

    @property
    def objective_power(self) -> float | None:
        return None

    @property
    def properties(self) -> dict[str, str]:
        return {}

    def _read_level(self, level: int, lx0: int, ly0: int, width: int, height: int) -> np.ndarray:
        self.reads.append(level)
        out = np.zeros((height, width, 4), dtype=np.uint8)  # transparent outside the level
        src = self._levels[level]
        sx0, sy0 = max(lx0, 0), max(ly0, 0)
        sx1, sy1 = min(lx0 + width, src.shape[1]), min(ly0 + height, src.shape[0])
        if sx1 > sx0 and sy1 > sy0:
            out[sy0 - ly0 : sy1 - ly0, sx0 - lx0 : sx1 - lx0] = src[sy0:sy1, sx0:sx1]
        return out


def _solid(width: int, height: int, rgb: tuple[int, int, int], alpha: int = 255) -> np.ndarray:
    return np.broadcast_to(np.array([*rgb, alpha], dtype=np.uint8), (height, width, 4)).copy()


@pytest.fixture
def pyramid() -> ArrayPyramid:
    # each level a different colour, so that the pixels tell which level was read
    return ArrayPyramid([_solid(64, 48, (200, 0, 0)), _solid(32, 24, (0, 200, 0)), _solid(16, 12, (0, 0, 200))])


def test_reads_the_coarsest_level_fine_enough(pyramid: ArrayPyramid) -> None:
    assert pyramid.level_dimensions == ((64, 48), (32, 24), (16, 12))
    assert pyramid.level_downsamples == (1.0, 2.0, 4.0)
    for size0, out, level, colour in [
        (16, 16, 0, (200, 0, 0)),
        (32, 16, 1, (0, 200, 0)),
        (48, 16, 1, (0, 200, 0)),  # 3x: level 2 would upscale, so level 1 is read
        (48, 12, 2, (0, 0, 200)),
        (40, 4, 2, (0, 0, 200)),  # beyond the coarsest level
    ]:
        pyramid.reads.clear()
        patch = pyramid.read_region(0, 0, (size0, size0), (out, out))
        assert pyramid.reads == [level]
        assert patch.shape == (out, out, 3) and patch.dtype == np.uint8
        assert (patch == colour).all(), (size0, out)


def test_outside_and_transparent_pixels_are_white() -> None:
    half = _solid(20, 20, (10, 20, 30))
    half[:, 10:, 3] = 0  # right half fully transparent
    reader = ArrayPyramid([half])
    assert (reader.read_region(-100, -100, (50, 50), (10, 10)) == 255).all()
    patch = reader.read_region(-10, 0, (40, 20), (40, 20))  # 10 px outside, 10 opaque, 10 transparent, 10 outside
    assert (patch[:, :10] == 255).all() and (patch[:, 20:] == 255).all()
    assert (patch[:, 10:20] == (10, 20, 30)).all()
    semi = ArrayPyramid([_solid(4, 4, (0, 0, 0), alpha=128)])
    assert (semi.read_region(0, 0, (4, 4), (4, 4)) == 127).all()  # 50% black over white


def test_thumbnail_reads_the_smallest_level_at_least_its_size(pyramid: ArrayPyramid) -> None:
    for size, level in [((16, 12), 2), ((17, 12), 1), ((32, 24), 1), ((40, 10), 0), ((100, 100), 0)]:
        pyramid.reads.clear()
        thumb = pyramid.thumbnail(size)
        assert pyramid.reads == [level]
        assert thumb.shape == (size[1], size[0], 3)


# --- the two real backends: identical pixels where they decode the same tiles -------------------------------------
@pytest.mark.filterwarnings("ignore:hamamatsu-format metadata parsing:UserWarning")
@pytest.mark.parametrize("name", ["cmu-1-small-region.svs", "cmu-1-small-region-pyramid.svs"])
def test_backends_give_identical_level0_pixels(slides_dir: Path, name: str) -> None:
    pytest.importorskip("tiffslide", reason="tiffslide is not installed: pip install 'loupe[tiffslide]'")
    with open_slide(slides_dir / name) as o, open_slide(slides_dir / name, backend="tiffslide") as t:
        assert isinstance(o, OpenSlideReader) and isinstance(t, TiffSlideReader)
        w, h = o.dimensions
        rects = [
            (0, 0, 256, 256),  # exact
            (300.5, 700.25, 256, 256),  # sub-pixel origin
            (w - 100, h - 100, 300, 300),  # over the bottom-right edge
            (-50, 20, 400, 400),  # over the left edge
            (10.3, 20.7, 33.3, 77.7),  # upscaled
        ]
        for x, y, w0, h0 in rects:
            for out in ((256, 256), (96, 64)):
                if o.best_level(min(w0 / out[0], h0 / out[1])) != 0:
                    continue  # coarser levels: OpenSlide maps the origin differently (see test_tiffslide_reader)
                np.testing.assert_array_equal(t.read_region(x, y, (w0, h0), out), o.read_region(x, y, (w0, h0), out))
        if o.level_count == 1:
            np.testing.assert_array_equal(t.thumbnail((299, 224)), o.thumbnail((299, 224)))


def test_both_backends_share_one_implementation() -> None:
    assert issubclass(OpenSlideReader, PyramidReader) and issubclass(TiffSlideReader, PyramidReader)
    for cls in (OpenSlideReader, TiffSlideReader):
        assert "_read_region" not in vars(cls) and "thumbnail" not in vars(cls)  # one implementation, shared
