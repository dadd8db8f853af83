"""Metrics against hand-computed answers and against scikit-learn's own micro/macro definitions."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
from sklearn.metrics import average_precision_score, roc_auc_score

from loupe.errors import LoupeError
from loupe.reports.metrics import attention_share, classification_metrics, mean_entropy

NAMES3 = ["a", "b", "c"]
# Worked example: per-class AUCs 1, 1, 0.875 (class c: positives .7/.3, negatives .1/.3, one tie), so
# macro = 2.875/3; micro pools 4 positives against 8 negatives: 30 of 32 pairs won (the .3 positive ties
# two .3 negatives, half a pair each).
Y_EX = np.array([0, 1, 2, 2])
P_EX = np.array([[0.8, 0.1, 0.1], [0.2, 0.5, 0.3], [0.1, 0.2, 0.7], [0.3, 0.4, 0.3]])


def test_perfect_predictions() -> None:
    y = np.array([0, 1, 2, 0, 2])
    probs = np.eye(3)[y] * 0.9 + 0.1 / 3
    m = classification_metrics(y, probs, NAMES3)
    assert m["n"] == 5
    for key in ("accuracy", "balanced_accuracy", "auc_roc_micro", "auc_roc_macro", "ap_micro", "ap_macro"):
        assert m[key] == pytest.approx(1.0), key
    assert m["confusion_matrix"] == [[2, 0, 0], [0, 1, 0], [0, 0, 2]]
    assert all(m["per_class"][c]["auc_roc"] == pytest.approx(1.0) for c in NAMES3)


def test_known_confusion_matrix_precision_recall() -> None:
    y = np.array([0, 0, 0, 1, 1, 2])
    pred = np.array([0, 1, 0, 1, 2, 2])
    probs = np.full((6, 3), 0.1)
    probs[np.arange(6), pred] = 0.8
    m = classification_metrics(y, probs, NAMES3)
    assert m["confusion_matrix"] == [[2, 1, 0], [0, 1, 1], [0, 0, 1]]
    assert m["accuracy"] == pytest.approx(4 / 6)
    assert m["balanced_accuracy"] == pytest.approx((2 / 3 + 1 / 2 + 1) / 3)
    pc = m["per_class"]
    assert [pc[c]["precision"] for c in NAMES3] == pytest.approx([1.0, 0.5, 0.5])
    assert [pc[c]["recall"] for c in NAMES3] == pytest.approx([2 / 3, 0.5, 1.0])
    assert [pc[c]["support"] for c in NAMES3] == [3, 2, 1]


def test_balanced_accuracy_on_imbalanced_data() -> None:
    y = np.array([0] * 9 + [1])
    probs = np.tile([0.7, 0.3], (10, 1))  # always predicts the majority class
    m = classification_metrics(y, probs, ["neg", "pos"])
    assert m["accuracy"] == pytest.approx(0.9)
    assert m["balanced_accuracy"] == pytest.approx(0.5)
    assert m["per_class"]["pos"]["precision"] is None  # never predicted: undefined, not 0 or NaN
    assert m["per_class"]["pos"]["recall"] == 0.0


def test_micro_and_macro_hand_values_and_sklearn_definitions() -> None:
    m = classification_metrics(Y_EX, P_EX, NAMES3)
    assert m["auc_roc_macro"] == pytest.approx((1 + 1 + 0.875) / 3)
    assert m["auc_roc_micro"] == pytest.approx(30 / 32)
    # AP of class c: thresholds .7 (P=1, R=.5) and .3 (P=2/3, R=1) -> .5 + .5*2/3.
    assert m["per_class"]["c"]["ap"] == pytest.approx(0.5 + 0.5 * 2 / 3)
    assert m["ap_micro"] == pytest.approx(0.75 + 0.25 * 4 / 7)
    assert m["auc_roc_micro"] != pytest.approx(m["auc_roc_macro"])
    onehot = np.eye(3)[Y_EX]
    assert m["auc_roc_micro"] == pytest.approx(roc_auc_score(onehot, P_EX, average="micro"))
    assert m["auc_roc_macro"] == pytest.approx(roc_auc_score(onehot, P_EX, average="macro"))
    assert m["ap_micro"] == pytest.approx(average_precision_score(onehot, P_EX, average="micro"))
    assert m["ap_macro"] == pytest.approx(average_precision_score(onehot, P_EX, average="macro"))


def test_binary_case() -> None:
    y = np.array([0, 0, 1, 1])
    p1 = np.array([0.1, 0.4, 0.35, 0.8])
    probs = np.stack([1 - p1, p1], axis=1)
    m = classification_metrics(y, probs, ["benign", "tumour"])
    assert m["per_class"]["tumour"]["auc_roc"] == pytest.approx(0.75)
    assert m["per_class"]["benign"]["auc_roc"] == pytest.approx(0.75)  # OvR of either class is the same curve
    assert m["auc_roc_macro"] == pytest.approx(0.75)
    assert m["per_class"]["tumour"]["ap"] == pytest.approx(0.5 * 1 + 0.5 * 2 / 3)
    # Micro pools positives .9 .6 .35 .8 against negatives .1 .4 .65 .2: 4 + 3 + 2 + 4 = 13 of 16 pairs.
    assert m["auc_roc_micro"] == pytest.approx(13 / 16)
    assert m["accuracy"] == pytest.approx(0.75)
    assert m["confusion_matrix"] == [[2, 0], [1, 1]]


def test_missing_class_gives_none_not_nan() -> None:
    y = np.array([0, 1, 0, 1])
    probs = np.array([[0.6, 0.3, 0.1], [0.2, 0.7, 0.1], [0.5, 0.2, 0.3], [0.4, 0.5, 0.1]])
    m = classification_metrics(y, probs, NAMES3)
    c = m["per_class"]["c"]
    assert c["auc_roc"] is None and c["ap"] is None and c["recall"] is None and c["support"] == 0
    # Macro means over the present classes only (both perfectly ranked here).
    assert m["auc_roc_macro"] == pytest.approx(1.0)
    assert m["balanced_accuracy"] == pytest.approx(1.0)
    json.dumps(m, allow_nan=False)  # JSON-ready: no NaN anywhere


def test_single_class_present_leaves_per_class_auc_undefined() -> None:
    y = np.array([0, 0, 0])
    probs = np.array([[0.9, 0.1], [0.6, 0.4], [0.3, 0.7]])
    m = classification_metrics(y, probs, ["x", "y"])
    assert m["per_class"]["x"]["auc_roc"] is None
    assert m["auc_roc_macro"] is None
    assert m["accuracy"] == pytest.approx(2 / 3)
    assert m["auc_roc_micro"] is not None  # the pooled one-hot matrix still has both outcomes
    json.dumps(m, allow_nan=False)


def test_bad_inputs_raise_loupe_error() -> None:
    with pytest.raises(LoupeError, match="shape"):
        classification_metrics(Y_EX, P_EX[:, :2], NAMES3)
    with pytest.raises(LoupeError, match="logits"):
        classification_metrics(Y_EX, P_EX * 3, NAMES3)
    with pytest.raises(LoupeError, match="outside"):
        classification_metrics(np.array([0, 1, 3, 2]), P_EX, NAMES3)


def test_attention_share_matches_paper_style_table() -> None:
    totals = np.array([[0.10, 0.80, 0.10], [0.02, 0.76, 0.22]])
    share = attention_share(totals, ["50X", "100X", "200X"])
    assert list(share) == ["50X", "100X", "200X"]
    assert share == pytest.approx({"50X": 0.06, "100X": 0.78, "200X": 0.16})
    with pytest.raises(LoupeError):
        attention_share(totals, ["50X", "100X"])


def test_mean_entropy() -> None:
    assert mean_entropy([np.full(8, 1 / 8)]) == pytest.approx(math.log(8))
    one_hot = np.array([0.0, 1.0, 0.0, 0.0])  # 0·log 0 = 0, so entropy 0
    assert mean_entropy([np.full((2, 2), 0.25), one_hot]) == pytest.approx(math.log(4) / 2)
    # An image given as per-magnification maps: 4 + 12 cells, uniform over all 16.
    maps = [np.full((2, 2), 1 / 16), np.full((4, 3), 1 / 16)]
    assert mean_entropy([maps]) == pytest.approx(math.log(16))
