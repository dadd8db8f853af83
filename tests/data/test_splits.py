"""Stratified, patient-aware split assignment and k-fold cross-validation."""

from __future__ import annotations

from collections import Counter, defaultdict
from pathlib import Path

import numpy as np
import pytest

from loupe.data.manifest import Manifest, SlideRecord
from loupe.data.splits import assign_splits, group_kfold
from loupe.errors import ConfigError, ManifestError


def make_manifest(
    labels: list[str], groups: list[str | None] | None = None, splits: list[str | None] | None = None
) -> Manifest:
    n = len(labels)
    groups = groups or [None] * n
    splits = splits or [None] * n
    records = [
        SlideRecord(f"s{i:03d}", Path(f"/slides/s{i:03d}.svs"), lab, spl, None, grp)
        for i, (lab, grp, spl) in enumerate(zip(labels, groups, splits, strict=True))
    ]
    return Manifest(tuple(records), tuple(sorted(set(labels))), Path("/data/manifest.csv"))


def imbalanced(n: int = 300, seed: int = 1) -> Manifest:
    """60% / 30% / 10% labels in random order, no groups."""
    rng = np.random.default_rng(seed)
    labels = ["a"] * int(n * 0.6) + ["b"] * int(n * 0.3) + ["c"] * (n - int(n * 0.6) - int(n * 0.3))
    return make_manifest([labels[i] for i in rng.permutation(n)])


def patients(n_patients: int = 80, seed: int = 2) -> Manifest:
    """1-5 slides per patient, one label per patient (two classes, 3:1)."""
    rng = np.random.default_rng(seed)
    labels, groups = [], []
    for p in range(n_patients):
        label = "tumor" if p % 4 == 0 else "normal"
        for _ in range(int(rng.integers(1, 6))):
            labels.append(label)
            groups.append(f"patient{p}")
    return make_manifest(labels, groups)


def split_of(m: Manifest) -> list[str | None]:
    return [r.split for r in m.records]


def test_deterministic_for_a_seed_and_different_across_seeds() -> None:
    m = imbalanced()
    a = assign_splits(m, seed=3)
    assert split_of(a) == split_of(assign_splits(m, seed=3))
    assert split_of(a) != split_of(assign_splits(m, seed=4))
    assert [r.slide_id for r in a.records] == [r.slide_id for r in m.records]  # order and records kept
    assert a.classes == m.classes and a.source == m.source


def test_stratified_proportions() -> None:
    m = imbalanced(300)
    out = assign_splits(m, val_fraction=0.2, test_fraction=0.1, seed=0)
    assert None not in split_of(out)
    sizes = Counter(split_of(out))
    assert abs(sizes["train"] - 210) <= 2 and abs(sizes["val"] - 60) <= 2 and abs(sizes["test"] - 30) <= 2
    overall = Counter(r.label for r in m.records)
    for split in ("train", "val", "test"):
        here = Counter(r.label for r in out.records if r.split == split)
        for label, count in overall.items():
            assert abs(here[label] / sizes[split] - count / len(m)) < 0.04, (split, label)


def test_groups_never_straddle_splits_and_labels_stay_balanced() -> None:
    m = patients()
    out = assign_splits(m, seed=5)
    by_group: dict[str, set[str | None]] = defaultdict(set)
    for r in out.records:
        by_group[r.group].add(r.split)
    assert all(len(s) == 1 for s in by_group.values())
    sizes = Counter(split_of(out))
    for split, frac in (("train", 0.6), ("val", 0.2), ("test", 0.2)):
        assert abs(sizes[split] / len(m) - frac) < 0.05, split
        tumor = sum(r.label == "tumor" for r in out.records if r.split == split)
        assert tumor > 0


def test_existing_splits_kept_and_counted() -> None:
    labels = ["a", "b"] * 50
    given: list[str | None] = ["test"] * 20 + [None] * 80  # a fixed 20% test set
    given[20] = "train"
    out = assign_splits(make_manifest(labels, splits=given), val_fraction=0.2, test_fraction=0.2)
    assert split_of(out)[:21] == given[:21]
    new = Counter(split_of(out)[21:])
    assert new["test"] <= 1  # the test share is already met by the given rows
    assert abs(new["val"] - 20) <= 2 and abs(new["train"] - 59) <= 2


def test_unassigned_slides_join_their_patients_split() -> None:
    labels = ["a", "b", "a", "b", "a", "b", "a", "b"]
    groups: list[str | None] = ["p1", "p1", "p2", "p2", "p3", "p3", "p4", "p4"]
    given: list[str | None] = ["test", None, None, "val", None, None, None, None]
    out = assign_splits(make_manifest(labels, groups, given), seed=0)
    s = split_of(out)
    assert s[0] == s[1] == "test"
    assert s[2] == s[3] == "val"
    assert s[4] == s[5] and s[6] == s[7]


def test_every_split_non_empty_when_possible() -> None:
    for n in (3, 4, 5):
        for seed in range(5):
            out = assign_splits(make_manifest(["a"] * n), seed=seed)
            assert set(split_of(out)) == {"train", "val", "test"}, (n, seed)
    # two patients cannot fill three splits: no error, train and one other
    two = assign_splits(make_manifest(["a", "b", "a"], ["p1", "p1", "p2"]))
    assert "train" in split_of(two) and len(set(split_of(two))) == 2
    # a zero fraction means no such split
    out = assign_splits(make_manifest(["a", "b"] * 10), val_fraction=0.0, test_fraction=0.3)
    assert set(split_of(out)) == {"train", "test"}


def test_fully_split_manifest_returned_unchanged() -> None:
    m = make_manifest(["a", "b"], splits=["train", "test"])
    assert assign_splits(m) is m


def test_bad_fractions() -> None:
    m = imbalanced(10)
    with pytest.raises(ConfigError, match="val_fraction"):
        assign_splits(m, val_fraction=-0.1)
    with pytest.raises(ConfigError, match="nothing for training"):
        assign_splits(m, val_fraction=0.5, test_fraction=0.5)


def test_group_kfold_covers_every_record_once() -> None:
    m = patients(60)
    folds = group_kfold(m, 5, seed=1)
    assert len(folds) == 5
    tests = np.concatenate([te for _, te in folds])
    np.testing.assert_array_equal(np.sort(tests), np.arange(len(m)))
    groups = np.array([r.group for r in m.records])
    tumor = np.array([r.label == "tumor" for r in m.records])
    for train, test in folds:
        assert train.dtype == np.int64 and test.dtype == np.int64
        np.testing.assert_array_equal(np.sort(np.concatenate([train, test])), np.arange(len(m)))
        assert not set(groups[train]) & set(groups[test])  # a patient never in both
        assert abs(tumor[test].mean() - tumor.mean()) < 0.12
    again = group_kfold(m, 5, seed=1)
    assert all(np.array_equal(a[1], b[1]) for a, b in zip(folds, again, strict=True))


def test_group_kfold_slides_without_group_are_their_own_group() -> None:
    m = make_manifest(["a", "b"] * 6)
    folds = group_kfold(m, 3)
    assert sorted(len(te) for _, te in folds) == [4, 4, 4]


def test_group_kfold_needs_enough_groups() -> None:
    m = make_manifest(["a", "b", "a", "b"], ["p1", "p1", "p2", "p2"])
    with pytest.raises(ManifestError) as e:
        group_kfold(m, 3)
    assert "/data/manifest.csv" in str(e.value) and "only 2 group" in str(e.value)
    with pytest.raises(ConfigError):
        group_kfold(m, 1)
