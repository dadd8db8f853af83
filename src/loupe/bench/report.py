"""bench.md: the measured speed table in the layout of the paper's Tables 5-6, the ratios and the profile."""

from __future__ import annotations

import os


def _cell(table: dict, row: str, col: str, fmt: str) -> str:
    value = table.get(row, {}).get(col)
    return fmt.format(value) if value is not None else "\\"


def speed_markdown(result: dict) -> str:
    """The speed table (s per epoch, ms per image), ratios, settings and the profile as Markdown."""
    train, infer = result["train_s_per_epoch"], result["infer_ms_per_image"]
    s = result["settings"]
    singles = [name for name in train if name not in ("combined", "joint")]
    lines = [
        f"# loupe bench: {s['dataset']}",
        "",
        f"Device {s['device']} ({s['torch_threads']} CPU threads), backbones h = {s['thumbnail_backbone']}, "
        f"f = {s['patch_backbone']}, k = {s['k']}, patch {s['patch_size']}, thumbnail "
        f"{s['thumbnail_size'][0]}×{s['thumbnail_size'][1]}, {s['cells']} cells ({s['grids']}). Training: "
        f"{s['n_train']} images per epoch, batch {s['batch_size']}; inference: {s['n_test']} images, one draw of k "
        f"(mode sample) or every cell (exhaustive). Median of {s['repeats']} repeats after {s['warmup']} warm-up.",
        "",
        "| model | train, k (s/epoch) | train, all (s/epoch) | inference, k (ms/image) | inference, all (ms/image) |",
        "|---|---|---|---|---|",
    ]
    for name in [*singles, "combined", "joint"]:
        label = "joint (ours)" if name == "joint" else name
        lines.append(
            f"| {label} | {_cell(train, name, 'k', '{:.2f}')} | {_cell(train, name, 'all', '{:.2f}')} | "
            f"{_cell(infer, name, 'k', '{:.1f}')} | {_cell(infer, name, 'all', '{:.1f}')} |"
        )
    r = result["ratios"]
    lines += [
        "",
        "| ratio | measured | paper (BACH, RTX 8000) |",
        "|---|---|---|",
        f"| training: combined ÷ joint | {r['train_combined_over_joint']:.2f}× | 2.5× (63.7 / 25.2 s) |",
        f"| training: combined all patches ÷ joint | {r['train_combined_all_over_joint']:.2f}× "
        "| 8.9× (225.0 / 25.2 s) |",
        f"| inference: all patches ÷ joint | {r['infer_all_over_joint']:.2f}× | 10.3× (316.1 / 30.6 ms) |",
    ]
    for key, title in (("train_step", "one training step"), ("inference", "one inference (per image)")):
        prof = result.get("profile", {}).get(key)
        if not prof:
            continue
        lines += ["", f"Profile of {title} of the joint model ({prof['total_ms']:.1f} ms, device synced per part):", ""]
        lines += ["| part | ms | share |", "|---|---|---|"]
        lines += [f"| {k} | {v:.1f} | {100 * prof['shares'][k]:.1f}% |" for k, v in prof["parts_ms"].items()]
    lines += ["", f"Wall time of the whole bench: {s['wall_s']:.0f} s."]
    load = s.get("load_average")
    if load and s.get("cpu_count") and load[0] > s["cpu_count"] / 2:  # the end value includes the bench itself
        lines += [
            "",
            f"Warning: the machine was busy (1-minute load {load[0]:.1f} at the start, {load[1]:.1f} at the end, "
            f"{s['cpu_count']} CPUs): other processes share the cores, so these timings are disturbed. PyTorch's CPU "
            "threads spin while they wait, which hurts the small batches of the k-patch models most; "
            f"OMP_WAIT_POLICY={os.environ.get('OMP_WAIT_POLICY', 'unset')} (PASSIVE avoids the spinning).",
        ]
    return "\n".join(lines) + "\n"


def accuracy_markdown(result: dict) -> str:
    """The side-by-side accuracy table (the paper's Tables 1-2) with the joint model's margins."""
    lines = [
        f"# loupe bench --accuracy: {result['dataset']}",
        "",
        f"Same splits for every model ({result['n_test']} test images); inference as each run's config says.",
        "",
        "| model | accuracy | balanced acc. | AUC-ROC (macro) | AP (macro) | AUC-ROC (micro) | AP (micro) | "
        "attention share | train (s) |",
        "|---|---|---|---|---|---|---|---|---|",
    ]

    def num(v: float | None, fmt: str = "{:.3f}") -> str:
        return fmt.format(v) if v is not None else "–"

    for row in result["models"]:
        m = row["metrics"]
        share = ", ".join(f"{k} {100 * v:.0f}%" for k, v in m["attention_share"].items())
        lines.append(
            f"| {row['name']} | {num(m['accuracy'])} | {num(m['balanced_accuracy'])} | {num(m['auc_roc_macro'])} | "
            f"{num(m['ap_macro'])} | {num(m['auc_roc_micro'])} | {num(m['ap_micro'])} | {share} | "
            f"{row['train_s']:.0f} |"
        )
    c = result["comparison"]
    lines += [
        "",
        f"Joint − best single magnification ({c['best_single']}): {100 * c['joint_minus_best_single']:+.1f} points; "
        f"joint − all patches: {100 * c['joint_minus_all_patches']:+.1f} points (accuracy).",
    ]
    return "\n".join(lines) + "\n"
