"""open_slide: backend choice and clear errors for missing, corrupt and unsupported files."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import tifffile

from loupe.errors import ConfigError, SlideError
from loupe.slides import ImageReader, OpenSlideReader, choose_backend, open_slide


def test_auto_backend_choice(slides_dir: Path, tmp_path: Path) -> None:
    strip = tmp_path / "bach.tif"
    tifffile.imwrite(strip, np.zeros((20, 30, 3), dtype=np.uint8), photometric="rgb")
    assert choose_backend(strip) == "image"
    assert choose_backend(slides_dir / "cmu-1-small-region-pyramid-generic.tif") == "openslide"
    assert choose_backend(Path("x.PNG")) == "image"
    assert choose_backend(Path("x.jpeg")) == "image"
    assert choose_backend(Path("x.svs")) == "openslide"
    assert choose_backend(Path("x.mrxs")) == "openslide"
    assert isinstance(open_slide(strip), ImageReader)
    with open_slide(slides_dir / "cmu-1-small-region-pyramid-generic.tif") as s:
        assert isinstance(s, OpenSlideReader) and s.level_count == 4


def test_forced_image_backend_on_tiled_tiff_reads_level_0(slides_dir: Path) -> None:
    path = slides_dir / "cmu-1-small-region-pyramid-generic.tif"
    with open_slide(path, backend="image") as img, open_slide(path, backend="openslide") as osr:
        assert img.dimensions == osr.dimensions
        assert img.mpp == pytest.approx(0.499, abs=1e-3)
        # JPEG tiles need imagecodecs in tifffile; without it the Pillow fallback decodes them
        a = img.read_region(1000, 1000, (64, 64), (64, 64)).astype(int)
        b = osr.read_region(1000, 1000, (64, 64), (64, 64)).astype(int)
        assert np.abs(a - b).mean() < 2.0


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(SlideError, match="slide not found") as err:
        open_slide(tmp_path / "nope.svs")
    assert "nope.svs" in str(err.value)


@pytest.mark.parametrize("name", ["broken.svs", "broken.tif", "broken.png", "broken.ndpi"])
def test_corrupt_file_names_the_file(tmp_path: Path, name: str) -> None:
    path = tmp_path / name
    path.write_bytes(np.random.default_rng(0).integers(0, 256, 4096, dtype=np.uint8).tobytes())
    with pytest.raises(SlideError) as err:
        open_slide(path)
    assert str(path) in str(err.value)
    assert err.value.__cause__ is None  # no raw OpenSlide/PIL traceback chained


def test_truncated_tiff_names_the_file(tmp_path: Path) -> None:
    path = tmp_path / "cut.tif"
    tifffile.imwrite(path, np.zeros((200, 200, 3), dtype=np.uint8), photometric="rgb")
    path.write_bytes(path.read_bytes()[:20000])
    with pytest.raises(SlideError) as err, open_slide(path) as s:
        s.read_region(0, 0, (100, 100), (10, 10))
    assert str(path) in str(err.value)


def test_unknown_backend_and_empty_folder(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="openslide"):
        open_slide(tmp_path, backend="bioformats")
    with pytest.raises(SlideError, match="DICOM"):
        open_slide(tmp_path)


def test_bad_mpp_override(slides_dir: Path) -> None:
    with pytest.raises(SlideError, match="positive"):
        open_slide(slides_dir / "cmu-1-small-region.svs", mpp=-1.0)
