"""`loupe bench --accuracy`: the joint model beside its baselines, trained and evaluated on the same splits.

Every model is trained by `loupe train` and scored by `loupe evaluate` (the paper's Table 1/2 metrics through
``loupe.reports.metrics``): the joint model as configured, each single magnification (the same model with one
magnification), the exhaustive all-patches model (every cell of every magnification, exact sum) and gated-attention
MIL over every patch of the highest magnification.
"""

from __future__ import annotations

import dataclasses
import time
from pathlib import Path
from typing import Any

from loupe.bench.speed import Log, Variant
from loupe.config import Config, GatedMILConfig, JointConfig
from loupe.slides import Magnification
from loupe.workflows.common import magnifications_of
from loupe.workflows.evaluation import evaluate
from loupe.workflows.training import train


def baseline_configs(cfg: Config) -> dict[str, Config]:
    """Name → config of every model compared: joint, each single magnification, all patches, gated MIL."""
    mags = magnifications_of(cfg)
    everything = tuple(range(len(mags)))
    out = {"joint": cfg}
    for j, m in enumerate(mags):
        out[f"single {m.label}"] = Variant(m.label, (j,), False).config(cfg)
    exhaustive = Variant("all", everything, True).config(cfg)
    out["all patches"] = dataclasses.replace(
        exhaustive, joint=dataclasses.replace(exhaustive.joint, inference="exhaustive")
    )
    highest = min(everything, key=lambda j: _resolution(mags[j]))
    mil = Variant(mags[highest].label, (highest,), True).config(cfg)
    out[f"gated MIL {mags[highest].label}"] = dataclasses.replace(
        mil,
        model=dataclasses.replace(mil.model, architecture="gated_mil"),
        joint=JointConfig(),  # another architecture's section stays at its defaults
        gated_mil=GatedMILConfig(patch_size=cfg.joint.patch_size),
    )
    return out


def _resolution(m: Magnification) -> float:
    """µm/px, or the downsample where the magnification is given as one (smaller: higher magnification)."""
    value = m.mpp if m.mpp is not None else m.downsample
    assert value is not None  # a Magnification has exactly one of them
    return value


def compare_accuracy(cfg: Config, out: str | Path, dataset: str, log: Log = print) -> dict[str, Any]:
    """Train and evaluate every model of :func:`baseline_configs` into ``out/<name>``; return the table."""
    out = Path(out)
    rows: list[dict[str, Any]] = []
    for name, model_cfg in baseline_configs(cfg).items():
        folder = out / name.replace(" ", "_")
        start = time.perf_counter()
        run = train(model_cfg, out=folder / "run")
        trained = time.perf_counter() - start
        metrics = evaluate(run, split="test", out=folder / "eval")
        rows.append({"name": name, "train_s": trained, "metrics": metrics})
        log(f"{name}: test accuracy {metrics['accuracy']:.3f} (trained in {trained:.0f} s)")
    acc: dict[str, float] = {r["name"]: r["metrics"]["accuracy"] for r in rows}
    singles = {k: v for k, v in acc.items() if k.startswith("single ")}
    best = max(singles, key=lambda k: singles[k])
    comparison = {
        "best_single": best,
        "joint_minus_best_single": acc["joint"] - singles[best],
        "joint_minus_all_patches": acc["joint"] - acc["all patches"],
    }
    n_test = rows[0]["metrics"]["n"]
    return {"dataset": dataset, "n_test": n_test, "models": rows, "comparison": comparison}
