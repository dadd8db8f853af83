"""Evaluation tables, plots and attention heatmaps, written atomically."""

from __future__ import annotations

from loupe.reports.geojson import attention_geojson, write_attention_geojson
from loupe.reports.io import save_attention_npz, save_png, write_bytes, write_csv, write_json, write_text
from loupe.reports.metrics import (
    attention_share,
    calibration,
    classification_metrics,
    mean_entropy,
    predictive_entropy,
)
from loupe.reports.overlays import attention_overlay, heatmap_image, panel_titles
from loupe.reports.plots import plot_confusion, plot_pr, plot_reliability, plot_roc, save_figure

__all__ = [
    "attention_geojson",
    "attention_overlay",
    "attention_share",
    "calibration",
    "classification_metrics",
    "heatmap_image",
    "mean_entropy",
    "panel_titles",
    "plot_confusion",
    "plot_pr",
    "plot_reliability",
    "plot_roc",
    "predictive_entropy",
    "save_attention_npz",
    "save_figure",
    "save_png",
    "write_attention_geojson",
    "write_bytes",
    "write_csv",
    "write_json",
    "write_text",
]
