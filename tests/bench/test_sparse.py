"""`loupe bench sparse`: what counts as learned and as leaving chance, the table, reuse of finished seeds, the CLI.
Learning itself is measured by the suite (and checked by tests/workflows/test_sparse_learning.py)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from loupe.bench import sparse
from loupe.bench.sparse import epoch_history, left_chance, run_sparse, sparse_markdown, summarise
from loupe.cli import main


def test_left_chance_is_halfway_from_chance_to_one():
    history = [{"epoch": e, "val_acc": a} for e, a in enumerate([0.5, 0.6, 0.74, 0.75, 1.0])]
    assert left_chance(history, 2) == 4  # 1-based: the fourth epoch reached 0.75
    assert left_chance(history[:3], 2) is None
    assert left_chance([{"epoch": 0, "val_acc": 0.55}], 10) == 1  # 0.1 + 0.45


def test_epoch_history_reads_every_log_version(tmp_path: Path):
    for version, rows in (("version_0", [(0, 0.5)]), ("version_1", [(1, 0.8)])):  # a resumed run: two versions
        folder = tmp_path / "logs" / version
        folder.mkdir(parents=True)
        lines = ["epoch,step,train_loss,val_acc,val_attention_5x,val_attention_20x"]
        lines += [f"{e},{e},0.7,,," for e, _ in rows] + [f"{e},{e},,{a},0.25,0.75" for e, a in rows]
        (folder / "metrics.csv").write_text("\n".join(lines) + "\n")
    history = epoch_history(tmp_path, ["5x", "20x"])
    assert history == [
        {"val_acc": 0.5, "5x": 0.25, "20x": 0.75, "epoch": 0},
        {"val_acc": 0.8, "5x": 0.25, "20x": 0.75, "epoch": 1},
    ]


def _row(seed: int, acc: float, share: float, left: int | None, lever: str = "defaults") -> dict:
    return {
        "task": "evidence-1%", "lever": lever, "seed": seed, "epochs": 30, "evidence_fraction": 0.01,
        "informative": "20x", "test_accuracy": acc, "informative_share": share, "attention_share": {},
        "left_chance_epoch": left, "learned": acc >= 0.9 and share >= 0.6, "train_s": 60.0, "history": [],
    }  # fmt: skip


def test_summary_counts_seeds_that_learned_and_the_table_shows_each_seed():
    rows = [_row(0, 0.95, 0.9, 8), _row(1, 0.99, 0.5, 9), _row(2, 0.5, 0.3, None), _row(0, 0.5, 0.3, None, "other")]
    summary = {s["lever"]: s for s in summarise(rows)}
    d = summary["defaults"]
    assert (d["seeds"], d["learned"], d["left_chance"]) == (3, 1, 2)  # seed 1: accurate but looking elsewhere
    assert d["median_epochs_to_leave_chance"] == 8.5 and d["epochs_to_leave_chance"] == [8, 9, None]
    assert summary["other"]["median_epochs_to_leave_chance"] is None
    table = sparse_markdown({"summary": list(summary.values()), "tasks": {"evidence-1%": "x"}, "levers": {}})
    assert "| evidence-1% | 1.00% | defaults | 1/3 | 8, 9, – | 0.95, 0.99, 0.50 |" in table


def test_the_suite_reuses_finished_seeds_and_writes_the_table(tmp_path: Path, monkeypatch):
    calls = []

    def fake_run_seed(task, lever, seed, folder, epochs):
        calls.append((task.name, lever, seed, epochs))
        return _row(seed, 1.0, 0.9, 5, lever)

    monkeypatch.setattr(sparse, "run_seed", fake_run_seed)
    run_sparse(out=tmp_path, tasks=["evidence-1%"], levers=["defaults"], seeds=2, log=lambda *_: None)
    assert calls == [("evidence-1%", "defaults", 0, 30), ("evidence-1%", "defaults", 1, 30)]
    result = run_sparse(out=tmp_path, tasks=["evidence-1%"], levers=["defaults"], seeds=3, log=lambda *_: None)
    assert len(calls) == 3  # seeds 0 and 1 were read back from their row.json
    assert result["summary"][0]["learned"] == 3
    assert json.loads((tmp_path / "sparse.json").read_text())["summary"][0]["seeds"] == 3
    assert "3/3" in (tmp_path / "sparse.md").read_text()
    table = run_sparse(out=tmp_path, tasks=["evidence-1%"], levers=["defaults"], seeds=9, table_only=True)
    assert len(calls) == 3 and table["summary"][0]["seeds"] == 3  # nothing trained, the finished seeds tabulated


@pytest.mark.parametrize("args", [["--tasks", "nope"], ["--levers", "nope"], ["--seeds", "0"]])
def test_cli_refuses_unknown_tasks_and_levers_with_one_message(tmp_path: Path, capsys, args):
    code = main(["bench", "sparse", "--out", str(tmp_path), *args])
    err = capsys.readouterr().err
    assert code == 2 and "Traceback" not in err and len(err.strip().splitlines()) == 1, err
