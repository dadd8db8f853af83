"""ROC, precision–recall, reliability and confusion-matrix PNGs for ``loupe evaluate``.

Figures are built on ``matplotlib.figure.Figure`` directly (Agg rendering, no pyplot state, nothing left open)
and written atomically through :mod:`loupe.reports.io`.
"""

from __future__ import annotations

import io
import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from matplotlib.figure import Figure
from sklearn.metrics import precision_recall_curve, roc_curve

from loupe.errors import LoupeError
from loupe.reports.io import write_bytes
from loupe.reports.metrics import CALIBRATION_BINS, _binary_ap, _binary_auc, _check_inputs, calibration

__all__ = ["plot_confusion", "plot_pr", "plot_reliability", "plot_roc", "save_figure"]


def save_figure(fig: Figure, path: str | os.PathLike[str], dpi: int = 120) -> Path:
    """Render ``fig`` to PNG and write it atomically; the figure is then cleared so its memory is released."""
    buffer = io.BytesIO()
    try:
        fig.savefig(buffer, format="png", dpi=dpi, bbox_inches="tight")
    finally:
        fig.clear()
    return write_bytes(path, buffer.getvalue())


def _one_vs_rest(
    y_true: np.ndarray, probs: np.ndarray, class_names: Sequence[str]
) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """Validated (one-hot target, probabilities, names)."""
    names = [str(name) for name in class_names]
    y, p = _check_inputs(y_true, probs, names)
    onehot = np.zeros(p.shape, dtype=bool)
    onehot[np.arange(p.shape[0]), y] = True
    return onehot, p, names


def _fmt(value: float | None) -> str:
    return "undefined" if value is None else f"{value:.3f}"


def plot_roc(y_true: np.ndarray, probs: np.ndarray, class_names: Sequence[str], path: str | os.PathLike[str]) -> Path:
    """One-vs-rest ROC curves: the micro average plus one curve per class, with AUCs in the legend."""
    onehot, p, names = _one_vs_rest(y_true, probs, class_names)
    fig = Figure(figsize=(5.5, 5))
    ax = fig.add_subplot()
    ax.plot([0, 1], [0, 1], linestyle=":", color="grey", linewidth=1)
    micro_auc = _binary_auc(onehot.ravel(), p.ravel())
    if micro_auc is not None:
        fpr, tpr, _ = roc_curve(onehot.ravel(), p.ravel())
        ax.plot(fpr, tpr, color="black", linewidth=2.2, label=f"micro-average (AUC = {_fmt(micro_auc)})")
    for c, name in enumerate(names):
        auc = _binary_auc(onehot[:, c], p[:, c])
        if auc is None:
            ax.plot([], [], linestyle="none", label=f"{name} (AUC undefined)")
            continue
        fpr, tpr, _ = roc_curve(onehot[:, c], p[:, c])
        ax.plot(fpr, tpr, linewidth=1.3, label=f"{name} (AUC = {_fmt(auc)})")
    ax.set(xlim=(0, 1), ylim=(0, 1.01), xlabel="False positive rate", ylabel="True positive rate")
    ax.set_title("ROC (one-vs-rest)")
    ax.legend(loc="lower right", fontsize="small")
    return save_figure(fig, path)


def plot_pr(y_true: np.ndarray, probs: np.ndarray, class_names: Sequence[str], path: str | os.PathLike[str]) -> Path:
    """One-vs-rest precision–recall curves: micro average plus one curve per class, APs in the legend."""
    onehot, p, names = _one_vs_rest(y_true, probs, class_names)
    fig = Figure(figsize=(5.5, 5))
    ax = fig.add_subplot()
    micro_ap = _binary_ap(onehot.ravel(), p.ravel())
    if micro_ap is not None:
        precision, recall, _ = precision_recall_curve(onehot.ravel(), p.ravel())
        ax.step(
            recall,
            precision,
            where="post",
            color="black",
            linewidth=2.2,
            label=f"micro-average (AP = {_fmt(micro_ap)})",
        )
    for c, name in enumerate(names):
        ap = _binary_ap(onehot[:, c], p[:, c])
        if ap is None:
            ax.plot([], [], linestyle="none", label=f"{name} (AP undefined)")
            continue
        precision, recall, _ = precision_recall_curve(onehot[:, c], p[:, c])
        ax.step(recall, precision, where="post", linewidth=1.3, label=f"{name} (AP = {_fmt(ap)})")
    ax.set(xlim=(0, 1), ylim=(0, 1.01), xlabel="Recall", ylabel="Precision")
    ax.set_title("Precision–recall (one-vs-rest)")
    ax.legend(loc="lower left", fontsize="small")
    return save_figure(fig, path)


def plot_reliability(
    y_true: np.ndarray,
    probs: np.ndarray,
    class_names: Sequence[str],
    path: str | os.PathLike[str],
    bins: int = CALIBRATION_BINS,
) -> Path:
    """Reliability diagram: accuracy against top-class confidence in equal-width bins (bars; the diagonal is a
    calibrated model), each bin's count above its bar, the gap to its mean confidence hatched (above the bar:
    over-confident, inside it: under-confident), the ECE in the title."""
    result = calibration(y_true, probs, class_names, bins)
    table = result["table"]
    assert isinstance(table, list)
    fig = Figure(figsize=(5.5, 5))
    ax = fig.add_subplot()
    ax.plot([0, 1], [0, 1], linestyle=":", color="black", linewidth=1, label="calibrated", zorder=4)
    width = 1.0 / bins
    first = True
    for b in table:
        if not b["count"]:
            continue
        low, accuracy, confidence = float(b["low"]), float(b["accuracy"]), float(b["confidence"])
        ax.bar(low, accuracy, width=width, align="edge", color="tab:blue", edgecolor="black", linewidth=0.6,
               label="accuracy" if first else None)  # fmt: skip
        ax.bar(low, confidence - accuracy, bottom=accuracy, width=width, align="edge", fill=False, hatch="///",
               edgecolor="tab:red", linewidth=1.0, zorder=3,
               label="gap to mean confidence" if first else None)  # fmt: skip
        ax.text(low + width / 2, max(accuracy, confidence) + 0.01, str(b["count"]), ha="center", va="bottom",
                fontsize="x-small")  # fmt: skip
        first = False
    ax.set(xlim=(0, 1), ylim=(0, 1.08), xlabel="Confidence (top-class probability)", ylabel="Accuracy")
    ax.set_title(f"Reliability ({bins} equal-width bins): ECE = {_fmt(result['ece'])}")  # type: ignore[arg-type]
    ax.legend(loc="upper left", fontsize="small")
    return save_figure(fig, path)


def plot_confusion(
    cm: np.ndarray | Sequence[Sequence[int]], class_names: Sequence[str], path: str | os.PathLike[str]
) -> Path:
    """Confusion matrix (rows = true, columns = predicted), each cell showing its count and row percentage.

    Colour follows the row-normalised fraction so that small classes are as readable as large ones.
    """
    counts = np.asarray(cm)
    names = [str(name) for name in class_names]
    if counts.ndim != 2 or counts.shape != (len(names), len(names)):
        raise LoupeError(f"confusion matrix must be {len(names)}×{len(names)} for classes {names}, got {counts.shape}")
    row_sums = counts.sum(axis=1, keepdims=True)
    fractions = np.divide(counts, row_sums, out=np.zeros(counts.shape, dtype=np.float64), where=row_sums > 0)
    size = max(3.5, 1.0 + 0.8 * len(names))
    fig = Figure(figsize=(size + 1.0, size))
    ax = fig.add_subplot()
    image = ax.imshow(fractions, cmap="Blues", vmin=0.0, vmax=1.0)
    fig.colorbar(image, ax=ax, fraction=0.046, pad=0.04, label="fraction of true class")
    for i in range(counts.shape[0]):
        for j in range(counts.shape[1]):
            colour = "white" if fractions[i, j] > 0.5 else "black"
            text = f"{counts[i, j]:g}\n{100 * fractions[i, j]:.0f}%" if row_sums[i, 0] else f"{counts[i, j]:g}"
            ax.text(j, i, text, ha="center", va="center", color=colour, fontsize="small")
    ax.set_xticks(range(len(names)), names, rotation=45, ha="right")
    ax.set_yticks(range(len(names)), names)
    ax.set(xlabel="Predicted", ylabel="True")
    ax.set_title("Confusion matrix")
    return save_figure(fig, path)
