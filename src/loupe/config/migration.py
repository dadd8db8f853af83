"""Reading configs written by loupe 0.1: its joint settings lived under ``model`` and ``train`` and StreamingCLAM's
under ``streaming``; now each architecture's live in its own section (which declares its 0.1 settings)."""

from __future__ import annotations

from typing import Any

from loupe.config.architectures import LEGACY_MODEL_KEYS, LEGACY_TRAIN_KEYS, SECTIONS


def is_legacy_layout(raw: dict[str, Any]) -> bool:
    """A config dict in loupe 0.1's layout (a 0.1 section, or architecture settings under model/train)."""
    model, train = raw.get("model") or {}, raw.get("train") or {}
    old_sections = {s.legacy_section for s in SECTIONS.values() if s.legacy_section}
    return (
        any(name in raw for name in old_sections)
        or any(k in model for k in LEGACY_MODEL_KEYS)
        or any(k in train for k in LEGACY_TRAIN_KEYS)
    )


def migrate_legacy_layout(raw: dict[str, Any]) -> dict[str, Any]:
    """loupe 0.1's layout → the current one. Settings that 0.1 ignored for an architecture (e.g. ``model.k`` of
    gated MIL, ``model.patch_size`` of StreamingCLAM, which is now derived) are dropped, as they had no effect."""
    out = {k: dict(v) if isinstance(v, dict) else v for k, v in raw.items()}
    model: dict[str, Any] = out.setdefault("model", {}) or {}
    train: dict[str, Any] = out.setdefault("train", {}) or {}
    moved = {k: model.pop(k) for k in LEGACY_MODEL_KEYS if k in model}
    moved |= {k: train.pop(k) for k in LEGACY_TRAIN_KEYS if k in train}
    old_sections = {
        s.legacy_section: out.pop(s.legacy_section, None) or {} for s in SECTIONS.values() if s.legacy_section
    }
    section = SECTIONS.get(model.get("architecture", "joint"))
    if section is not None:
        own = {k: moved[k] for k in section.legacy_keys if k in moved}
        merged = old_sections.get(section.legacy_section, {}) if section.legacy_section else {}
        out[section.name] = {**merged, **own, **(out.get(section.name) or {})}
    return out
