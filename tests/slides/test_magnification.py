"""Magnification parsing: every accepted form, labels, and the errors."""

from __future__ import annotations

import pytest

from loupe.errors import ConfigError, SlideError
from loupe.slides.magnification import Magnification, parse_magnification, parse_magnifications


@pytest.mark.parametrize(
    ("spec", "mpp", "label"),
    [
        (0.5, 0.5, "0.5mpp"),
        (1, 1.0, "1mpp"),
        ("0.5", 0.5, "0.5mpp"),
        ("0.5um", 0.5, "0.5mpp"),
        ("0.5mpp", 0.5, "0.5mpp"),
        ("0.42 µm/px", 0.42, "0.42mpp"),
        (".25", 0.25, "0.25mpp"),
        ("20x", 0.5, "20x"),
        ("20X", 0.5, "20x"),
        ("40x", 0.25, "40x"),
        ("2.5x", 4.0, "2.5x"),
    ],
)
def test_mpp_forms(spec: str | float, mpp: float, label: str) -> None:
    m = parse_magnification(spec)
    assert m.mpp == pytest.approx(mpp)
    assert m.downsample is None
    assert m.label == label


def test_downsample_form_and_explicit_label() -> None:
    m = parse_magnification("ds4")
    assert (m.mpp, m.downsample, m.label) == (None, 4.0, "ds4")
    assert parse_magnification("DS2.5").downsample == 2.5
    assert parse_magnification(0.42, label="200X").label == "200X"


@pytest.mark.parametrize("spec", ["", "abc", "20y", "x20", "-0.5", "0", "0x", "ds0", "ds-2", True, None, [0.5]])
def test_bad_specs_list_the_accepted_forms(spec: object) -> None:
    with pytest.raises(ConfigError, match="accepted forms"):
        parse_magnification(spec)  # type: ignore[arg-type]


def test_magnification_needs_exactly_one_of_mpp_and_downsample() -> None:
    with pytest.raises(ConfigError):
        Magnification("a", 0.5, 2.0)
    with pytest.raises(ConfigError):
        Magnification("a", None, None)
    with pytest.raises(ConfigError):
        Magnification("a", -1.0, None)


def test_downsample_for() -> None:
    assert parse_magnification(1.68).downsample_for(0.42, "s.tif") == pytest.approx(4.0)
    assert parse_magnification("ds3").downsample_for(None, "s.tif") == 3.0
    assert parse_magnification("ds3").downsample_for(0.25, "s.tif") == 3.0


def test_downsample_for_without_slide_mpp_names_slide_and_fix() -> None:
    with pytest.raises(SlideError) as err:
        parse_magnification("20x").downsample_for(None, "/data/case-7.svs")
    msg = str(err.value)
    assert "/data/case-7.svs" in msg
    assert "--slide-mpp" in msg and "data.slide_mpp" in msg and "mpp column" in msg


def test_parse_magnifications_with_labels() -> None:
    mags = parse_magnifications([1.68, 0.84, 0.42], labels=["50X", "100X", "200X"])
    assert [m.label for m in mags] == ["50X", "100X", "200X"]
    assert [m.mpp for m in mags] == [1.68, 0.84, 0.42]


def test_parse_magnifications_errors() -> None:
    with pytest.raises(ConfigError, match="one label per magnification"):
        parse_magnifications([1.0, 0.5], labels=["a"])
    with pytest.raises(ConfigError, match="unique"):
        parse_magnifications([1.0, 0.5], labels=["a", "a"])
    with pytest.raises(ConfigError, match="same resolution"):
        parse_magnifications(["20x", 0.5])  # 20x is 0.5 µm/px
    with pytest.raises(ConfigError, match="same resolution"):
        parse_magnifications(["ds2", "ds2.0"])
    with pytest.raises(ConfigError):
        parse_magnifications([])
    # same resolution expressed differently is fine when kinds differ (µm/px vs downsample)
    assert len(parse_magnifications(["ds2", 2.0])) == 2
