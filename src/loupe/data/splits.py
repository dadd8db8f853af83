"""Patient-aware train/val/test splits and cross-validation folds over a manifest.

All slides of one group (patient / case, the manifest's ``group`` column) land in the same split or fold,
so a patient never straddles train and test; a slide without a group is a group of its own. Label
proportions are kept close to those of the whole manifest (stratified).
"""

from __future__ import annotations

from collections import Counter, defaultdict
from dataclasses import replace

import numpy as np
from sklearn.model_selection import StratifiedGroupKFold

from loupe.data.manifest import SPLITS, Manifest, SlideRecord
from loupe.errors import ConfigError, ManifestError


def _group_key(record: SlideRecord) -> tuple[str, str]:
    return ("group", record.group) if record.group is not None else ("slide", record.slide_id)


def _where(manifest: Manifest) -> str:
    return f"manifest {manifest.source}" if manifest.source is not None else "the manifest (built in memory)"


def assign_splits(manifest: Manifest, val_fraction: float = 0.2, test_fraction: float = 0.2, seed: int = 0) -> Manifest:
    """Give a split to every record whose split is empty; records that have one keep it.

    Fractions are of the whole manifest, counting the splits already given (a manifest with a fixed test
    set of the right size gets only train/val for the rest). Stratified by label and group-aware: unassigned
    slides of a group that already has a split join it (its most common one). Deterministic for a seed;
    every split with a positive fraction gets at least one group when there are enough groups.
    """
    for name, value in (("val_fraction", val_fraction), ("test_fraction", test_fraction)):
        if not 0.0 <= value < 1.0:
            raise ConfigError(f"{name}={value} must be in [0, 1).")
    if val_fraction + test_fraction >= 1.0:
        raise ConfigError(
            f"val_fraction + test_fraction = {val_fraction + test_fraction} leaves nothing for training; "
            f"their sum must be below 1."
        )
    records = manifest.records
    if all(r.split is not None for r in records):
        return manifest
    fractions = {"train": 1.0 - val_fraction - test_fraction, "val": val_fraction, "test": test_fraction}
    targets = [s for s in SPLITS if fractions[s] > 0]

    label_names = sorted({r.label or "" for r in records})
    label_of = {name: i for i, name in enumerate(label_names)}
    n_labels = len(label_names)
    split_of = {s: i for i, s in enumerate(SPLITS)}

    total = np.zeros(n_labels)
    assigned = np.zeros((len(SPLITS), n_labels))  # slides per split and label
    given: dict[tuple[str, str], Counter[str]] = defaultdict(Counter)
    free: dict[tuple[str, str], list[int]] = defaultdict(list)  # unassigned record indices per group
    for i, r in enumerate(records):
        total[label_of[r.label or ""]] += 1
        key = _group_key(r)
        if r.split is None:
            free[key].append(i)
        else:
            given[key][r.split] += 1
            assigned[split_of[r.split], label_of[r.label or ""]] += 1
    desired = np.array([fractions[s] for s in SPLITS])[:, None] * total[None, :]

    def label_counts(indices: list[int]) -> np.ndarray:
        counts = np.zeros(n_labels)
        for i in indices:
            counts[label_of[records[i].label or ""]] += 1
        return counts

    choice: dict[tuple[str, str], str] = {}
    open_groups = []
    for key, indices in free.items():
        if key in given:  # join the split the group already has, so the patient does not straddle splits
            split = max(given[key].items(), key=lambda kv: (kv[1], -split_of[kv[0]]))[0]
            choice[key] = split
            assigned[split_of[split]] += label_counts(indices)
        else:
            open_groups.append(key)

    # Largest groups first (hardest to place); a seeded shuffle orders groups of equal size.
    rng = np.random.default_rng(seed)
    order = [open_groups[i] for i in rng.permutation(len(open_groups))]
    order.sort(key=lambda k: -len(free[k]))
    target_rows = [split_of[s] for s in targets]
    for key in order:
        g = label_counts(free[key])
        on = g > 0
        # Increase of sum((assigned - desired)^2 / desired) if the group joins each split; pick the smallest.
        costs = [
            float(np.sum(g[on] * (2 * (assigned[s, on] - desired[s, on]) + g[on]) / desired[s, on]))
            for s in target_rows
        ]
        best = target_rows[int(np.argmin(costs))]
        choice[key] = SPLITS[best]
        assigned[best] += g

    _fill_empty_splits(targets, choice, free, assigned.sum(axis=1), split_of, order)
    return manifest.with_records(r if r.split is not None else replace(r, split=choice[_group_key(r)]) for r in records)


def _fill_empty_splits(
    targets: list[str],
    choice: dict[tuple[str, str], str],
    free: dict[tuple[str, str], list[int]],
    sizes: np.ndarray,
    split_of: dict[str, int],
    order: list[tuple[str, str]],
) -> None:
    """Move the smallest movable group into each empty target split, from the fullest that can spare it."""
    sizes = sizes.copy()
    for split in targets:
        if sizes[split_of[split]] > 0:
            continue
        candidates = [k for k in order if choice[k] != split and sizes[split_of[choice[k]]] - len(free[k]) >= 1]
        if not candidates:
            continue
        # smallest group, from the fullest split; later groups in the order first (deterministic)
        key = min(reversed(candidates), key=lambda k: (len(free[k]), -sizes[split_of[choice[k]]]))
        sizes[split_of[choice[key]]] -= len(free[key])
        sizes[split_of[split]] += len(free[key])
        choice[key] = split


def group_kfold(manifest: Manifest, n_folds: int, seed: int = 0) -> list[tuple[np.ndarray, np.ndarray]]:
    """Stratified group k-fold: ``(train_idx, test_idx)`` per fold, indices into ``manifest.records``.

    Groups never straddle folds, every record is in exactly one test fold, and label proportions per fold are
    kept close to the whole manifest's. Deterministic for a seed.
    """
    if n_folds < 2:
        raise ConfigError(f"n_folds={n_folds}: cross-validation needs at least 2 folds.")
    records = manifest.records
    keys = [_group_key(r) for r in records]
    group_ids = {k: i for i, k in enumerate(dict.fromkeys(keys))}
    if len(group_ids) < n_folds:
        raise ManifestError(
            f"Cannot make {n_folds} folds from {_where(manifest)}: it has only {len(group_ids)} group(s) "
            f"(patients, or slides without a group). Use at most {len(group_ids)} folds, or add slides."
        )
    label_ids = {name: i for i, name in enumerate(sorted({r.label or "" for r in records}))}
    y = np.array([label_ids[r.label or ""] for r in records])
    groups = np.array([group_ids[k] for k in keys])
    cv = StratifiedGroupKFold(n_splits=n_folds, shuffle=True, random_state=seed)
    folds = [(np.sort(tr).astype(np.int64), np.sort(te).astype(np.int64)) for tr, te in cv.split(y, y, groups)]
    if any(len(te) == 0 for _, te in folds):
        raise ManifestError(
            f"Cannot make {n_folds} non-empty folds from {_where(manifest)} ({len(group_ids)} groups of very "
            f"different sizes); use fewer folds."
        )
    return folds
