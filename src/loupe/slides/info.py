"""What the reader sees in a slide (for `loupe info`): levels, µm/px, and where each magnification is read."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from loupe.errors import SlideError
from loupe.slides.grid import build_grid
from loupe.slides.magnification import Magnification, parse_magnifications
from loupe.slides.open import open_slide
from loupe.slides.urls import SlideURL


def describe_slide(
    path: str | Path | SlideURL,
    backend: str = "auto",
    mpp: float | None = None,
    magnifications: Sequence[Magnification | str | float] | None = None,
    patch_size: int | None = None,
) -> dict[str, Any]:
    """A plain dict describing the slide; with magnifications, which level each is read from and its grid.

    A magnification that cannot be placed (no µm/px, image smaller than a patch) is reported under
    ``magnification_error`` instead of raising, so the rest of the description is still shown.
    """
    with open_slide(path, backend=backend, mpp=mpp) as reader:
        desc: dict[str, Any] = {
            "path": str(reader.path),
            "backend": type(reader).__name__,
            "vendor": reader.vendor,
            "dimensions": reader.dimensions,
            "levels": [
                {"level": i, "dimensions": dims, "downsample": ds}
                for i, (dims, ds) in enumerate(zip(reader.level_dimensions, reader.level_downsamples, strict=True))
            ],
            "mpp": reader.mpp,
            "mpp_source": "override" if mpp is not None else ("file" if reader.mpp is not None else None),
            "objective_power": reader.objective_power,
        }
        if magnifications is None:
            return desc
        mags = tuple(m if isinstance(m, Magnification) else parse_magnifications([m])[0] for m in magnifications)
        entries: list[dict[str, Any]] = []
        try:
            for mag in mags:
                ds = mag.downsample_for(reader.mpp, str(reader.path))
                level = reader.best_level(ds)
                entries.append(
                    {
                        "label": mag.label,
                        "mpp": mag.mpp if mag.mpp is not None else (reader.mpp * ds if reader.mpp else None),
                        "downsample": ds,
                        "level": level,
                        "level_downsample": reader.level_downsamples[level],
                    }
                )
            if patch_size is not None:
                grid = build_grid(reader.dimensions, reader.mpp, mags, patch_size, str(reader.path))
                for entry, g in zip(entries, grid.grids, strict=True):
                    entry["grid"] = (g.rows, g.cols)
                    entry["cells"] = g.n_cells
                desc["patch_size"] = patch_size
                desc["n_cells"] = grid.n_cells
        except SlideError as err:
            desc["magnification_error"] = str(err)
        desc["magnifications"] = entries
        return desc


def _fmt_mpp(value: float | None) -> str:
    return "unknown" if value is None else f"{value:.4g} µm/px"


def format_description(d: dict[str, Any]) -> str:
    """A readable text block for a :func:`describe_slide` dict."""
    w, h = d["dimensions"]
    lines = [
        f"slide:      {d['path']}",
        f"reader:     {d['backend']} (vendor: {d['vendor']})",
        f"size:       {w} x {h} px (level 0)",
        f"resolution: {_fmt_mpp(d['mpp'])}" + (f" ({d['mpp_source']})" if d.get("mpp_source") else ""),
        "objective:  " + ("unknown" if d.get("objective_power") is None else f"{d['objective_power']:g}x"),
        f"levels:     {len(d['levels'])}",
    ]
    for lv in d["levels"]:
        lw, lh = lv["dimensions"]
        lines.append(f"  {lv['level']:>2}: {lw} x {lh}  downsample {lv['downsample']:.4g}")
    if "magnifications" in d:
        header = "magnifications"
        if "patch_size" in d:
            header += f" (patch {d['patch_size']} px, {d['n_cells']} cells in all)"
        lines.append(header + ":")
        for m in d["magnifications"]:
            text = (
                f"  {m['label']}: {_fmt_mpp(m['mpp'])}, downsample {m['downsample']:.4g}, "
                f"read from level {m['level']} (downsample {m['level_downsample']:.4g})"
            )
            if "grid" in m:
                text += f", grid {m['grid'][0]} rows x {m['grid'][1]} cols"
            lines.append(text)
        if "magnification_error" in d:
            lines.append(f"  error: {d['magnification_error']}")
    return "\n".join(lines)
