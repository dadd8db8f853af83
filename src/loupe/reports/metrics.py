"""Evaluation numbers as the paper reports them: accuracy, AUC-ROC and AP (micro and macro), attention share.

Every function returns plain Python values ready for JSON. A metric that is undefined on the given data (e.g.
the AUC of a class that never occurs) is ``None`` rather than NaN or an exception, so one odd split never
breaks a report.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
from sklearn.metrics import average_precision_score, roc_auc_score

from loupe.errors import LoupeError

__all__ = [
    "CALIBRATION_BINS",
    "attention_share",
    "calibration",
    "classification_metrics",
    "mean_entropy",
    "predictive_entropy",
    "reliability_bins",
]

#: Equal-width bins of the top-class confidence over [0, 1] in the expected calibration error.
CALIBRATION_BINS = 10


def _check_inputs(y_true: np.ndarray, probs: np.ndarray, class_names: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
    """Validate labels and probabilities against the class list; returns (int labels, float probabilities)."""
    names = list(class_names)
    n_classes = len(names)
    if n_classes < 2:
        raise LoupeError(f"need at least 2 class names, got {names}")
    y = np.asarray(y_true)
    p = np.asarray(probs, dtype=np.float64)
    if y.ndim != 1:
        raise LoupeError(f"y_true must be a 1-D array of class indices, got shape {y.shape}")
    if p.ndim != 2 or p.shape != (y.shape[0], n_classes):
        raise LoupeError(f"probs must have shape (n_samples, n_classes) = ({y.shape[0]}, {n_classes}), got {p.shape}")
    if y.size and not np.issubdtype(y.dtype, np.integer) and not np.all(np.equal(np.mod(y, 1), 0)):
        raise LoupeError("y_true must hold integer class indices")
    y = y.astype(np.int64)
    if y.size and (y.min() < 0 or y.max() >= n_classes):
        raise LoupeError(f"y_true holds class indices outside 0..{n_classes - 1} (classes: {names})")
    if not np.all(np.isfinite(p)):
        raise LoupeError("probs contains NaN or infinite values")
    if p.size and not np.allclose(p.sum(axis=1), 1.0, atol=1e-3):
        raise LoupeError("each row of probs must sum to 1 (pass softmax probabilities, not logits)")
    return y, p


def _safe_float(value: float) -> float | None:
    """A finite float, or None for NaN/inf."""
    value = float(value)
    return value if math.isfinite(value) else None


def _binary_auc(positive: np.ndarray, scores: np.ndarray) -> float | None:
    """ROC AUC of ``scores`` for a 0/1 target; None unless both outcomes occur."""
    if positive.size == 0 or positive.all() or not positive.any():
        return None
    return _safe_float(roc_auc_score(positive, scores))


def _binary_ap(positive: np.ndarray, scores: np.ndarray) -> float | None:
    """Average precision of ``scores`` for a 0/1 target; None when there is no positive."""
    if not positive.any():
        return None
    return _safe_float(average_precision_score(positive, scores))


def _mean_or_none(values: Sequence[float | None]) -> float | None:
    """Mean of the defined values, None if none is defined."""
    defined = [v for v in values if v is not None]
    return float(np.mean(defined)) if defined else None


def classification_metrics(y_true: np.ndarray, probs: np.ndarray, class_names: Sequence[str]) -> dict:
    """Accuracy, balanced accuracy, one-vs-rest AUC-ROC and AP (micro, macro), confusion matrix, per class.

    Micro averages pool every (sample, class) pair of the one-hot target and the probability matrix, as in the
    paper's Figures 2–3; macro averages are the mean over the classes that occur in ``y_true``. Balanced
    accuracy is the mean recall over the classes that occur. Prediction = argmax of ``probs``.
    """
    names = [str(name) for name in class_names]
    y, p = _check_inputs(y_true, probs, names)
    n, n_classes = p.shape
    onehot = np.zeros((n, n_classes), dtype=bool)
    onehot[np.arange(n), y] = True
    pred = p.argmax(axis=1) if n else np.zeros(0, dtype=np.int64)

    cm = np.zeros((n_classes, n_classes), dtype=np.int64)
    np.add.at(cm, (y, pred), 1)
    support = cm.sum(axis=1)
    predicted = cm.sum(axis=0)
    true_pos = np.diag(cm)

    per_class: dict[str, dict[str, float | int | None]] = {}
    recalls: list[float | None] = []
    aucs: list[float | None] = []
    aps: list[float | None] = []
    for c, name in enumerate(names):
        recall = float(true_pos[c] / support[c]) if support[c] else None
        precision = float(true_pos[c] / predicted[c]) if predicted[c] else None
        auc = _binary_auc(onehot[:, c], p[:, c])
        ap = _binary_ap(onehot[:, c], p[:, c])
        per_class[name] = {
            "precision": precision,
            "recall": recall,
            "support": int(support[c]),
            "auc_roc": auc,
            "ap": ap,
        }
        if support[c]:
            recalls.append(recall)
            aucs.append(auc)
            aps.append(ap)

    return {
        "n": int(n),
        "class_names": names,
        "accuracy": float(np.mean(pred == y)) if n else None,
        "balanced_accuracy": _mean_or_none(recalls),
        "auc_roc_micro": _binary_auc(onehot.ravel(), p.ravel()),
        "auc_roc_macro": _mean_or_none(aucs),
        "ap_micro": _binary_ap(onehot.ravel(), p.ravel()),
        "ap_macro": _mean_or_none(aps),
        "confusion_matrix": cm.tolist(),
        "per_class": per_class,
    }


def attention_share(mag_totals: np.ndarray, labels: Sequence[str]) -> dict[str, float]:
    """Mean over images of the attention each magnification receives (the paper's Tables 3–4).

    ``mag_totals`` is (n_images, m): each image's total attention per magnification, rows summing to 1.
    """
    totals = np.asarray(mag_totals, dtype=np.float64)
    labels = [str(label) for label in labels]
    if totals.ndim != 2 or totals.shape[1] != len(labels):
        raise LoupeError(
            f"mag_totals must have shape (n_images, {len(labels)}) for labels {labels}, got {totals.shape}"
        )
    if totals.shape[0] == 0:
        raise LoupeError("attention_share needs at least one image")
    if not np.all(np.isfinite(totals)):
        raise LoupeError("mag_totals contains NaN or infinite values")
    means = totals.mean(axis=0)
    return {label: float(value) for label, value in zip(labels, means, strict=True)}


def mean_entropy(probs_per_image: Sequence[np.ndarray]) -> float:
    """Mean over images of the entropy −Σ P log P (nats) of each image's attention over all its cells.

    Each entry is one image's attention: an array of any shape (flattened), or a list of per-magnification
    maps (concatenated). 0·log 0 counts as 0.
    """
    entropies = []
    for index, probs in enumerate(probs_per_image):
        if isinstance(probs, (list, tuple)):
            flat = np.concatenate([np.asarray(part, dtype=np.float64).ravel() for part in probs])
        else:
            flat = np.asarray(probs, dtype=np.float64).ravel()
        if not np.all(np.isfinite(flat)) or np.any(flat < 0):
            raise LoupeError(f"attention of image {index} has negative or non-finite values")
        nonzero = flat[flat > 0]
        entropies.append(float(-np.sum(nonzero * np.log(nonzero))))
    if not entropies:
        raise LoupeError("mean_entropy needs at least one image")
    return float(np.mean(entropies))


def predictive_entropy(probs: np.ndarray) -> float:
    """−Σ p log p in nats of one class distribution (0·log 0 counts as 0)."""
    p = np.asarray(probs, dtype=np.float64).ravel()
    p = p[p > 0]
    return float(-(p * np.log(p)).sum()) + 0.0  # never -0.0


def reliability_bins(
    y_true: np.ndarray, probs: np.ndarray, class_names: Sequence[str], bins: int = CALIBRATION_BINS
) -> list[dict[str, float | int | None]]:
    """The top-class confidence (max probability) of each image in ``bins`` equal-width bins over [0, 1] (bin b is
    [b/bins, (b+1)/bins), the last one closed): per bin its edges, count, mean confidence and accuracy (the
    fraction whose top class is the true one; None in an empty bin)."""
    if bins < 1:
        raise LoupeError(f"calibration needs at least 1 bin, got {bins}")
    y, p = _check_inputs(y_true, probs, [str(c) for c in class_names])
    confidence = p.max(axis=1) if p.size else np.zeros(0)
    correct = (p.argmax(axis=1) == y) if p.size else np.zeros(0, dtype=bool)
    which = np.minimum((confidence * bins).astype(np.int64), bins - 1)
    out: list[dict[str, float | int | None]] = []
    for b in range(bins):
        member = which == b
        n = int(member.sum())
        out.append(
            {
                "low": b / bins,
                "high": (b + 1) / bins,
                "count": n,
                "confidence": float(confidence[member].mean()) if n else None,
                "accuracy": float(correct[member].mean()) if n else None,
            }
        )
    return out


def calibration(
    y_true: np.ndarray, probs: np.ndarray, class_names: Sequence[str], bins: int = CALIBRATION_BINS
) -> dict[str, object]:
    """The expected calibration error of the top-class confidence, with its bins (:func:`reliability_bins`).

    ECE = Σ_b (n_b / n) · |accuracy_b − confidence_b| over ``bins`` equal-width bins of the top-class confidence
    (10 by default, as Guo et al. 2017); None for an empty split.
    """
    table = reliability_bins(y_true, probs, class_names, bins)
    n = sum(int(b["count"] or 0) for b in table)
    ece = None
    if n:
        ece = float(
            sum(
                int(b["count"] or 0) / n * abs(float(b["accuracy"] or 0.0) - float(b["confidence"] or 0.0))
                for b in table
                if b["count"]
            )
        )
    return {"ece": ece, "bins": bins, "binning": "equal-width bins of the top-class confidence", "table": table}
