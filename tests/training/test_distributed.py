"""Data-parallel training on this CPU with the gloo backend and 2 processes: the collectives, one optimiser step
equal to one process's, the launch recipes of docs/scale.md, and a demo that learns when trained by two processes."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from loupe.datasets.synthetic import SyntheticSpec, generate_dataset
from loupe.ranks import world
from loupe.training.distributed import average_gradients, gather_rows

HERE = Path(__file__).resolve().parent
PRESETS = HERE.parents[1] / "src" / "loupe" / "configs"
STEP = HERE / "ddp_step.py"
COLLECTIVES = HERE / "ddp_collectives.py"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _env(**extra: str) -> dict[str, str]:
    """The test's environment for a child process: one torch thread each (two share this 2-core machine), no
    inherited rank variables."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "TORCHELASTIC_")) and k not in (
        "RANK", "LOCAL_RANK", "NODE_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "GROUP_RANK", "MASTER_ADDR", "MASTER_PORT",
    )}  # fmt: skip
    return env | {"OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"} | extra


def _check(result: subprocess.CompletedProcess) -> None:
    assert result.returncode == 0, f"exit {result.returncode}\n{result.stdout[-4000:]}\n{result.stderr[-6000:]}"


# --- the collectives, in a real two-process gloo group -------------------------------------------------------


@pytest.mark.slow
def test_gather_rows_and_average_gradients_across_two_processes(tmp_path: Path):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2", str(COLLECTIVES)]
    _check(subprocess.run([*cmd, str(tmp_path)], env=_env(), capture_output=True, text=True, timeout=300))
    for rank in (0, 1):
        got = json.loads((tmp_path / f"rank{rank}.json").read_text())
        assert got["world"] == [2, rank]
        # Rank 0's one row then rank 1's two rows, in rank order, whatever each held (the padding is dropped).
        assert got["gathered"] == [[0.0, 1.0, 2.0], [100.0, 101.0, 102.0], [103.0, 104.0, 105.0]]
        assert got["weight_grad"] == [[1.5, 1.5]]
        assert got["bias_grad"] == [0.5]  # a gradient on one rank counts zero on the other
        assert got["unused_grad"] is None  # no rank had one: none (Adam leaves the parameter alone)


def test_one_process_is_its_own_world():
    rows = torch.ones(2, 3)
    assert world() == (1, 0)
    assert gather_rows(rows) is rows
    p = torch.nn.Parameter(torch.zeros(2))
    p.grad = torch.ones(2)
    average_gradients([p])
    assert p.grad.tolist() == [1.0, 1.0]


# --- one optimiser step: 2 ranks × B/2 == 1 process × B ------------------------------------------------------


@pytest.fixture(scope="module")
def four_slides(tmp_path_factory) -> Path:
    spec = SyntheticSpec(splits={"train": 4, "val": 2, "test": 0}, seed=5)
    return generate_dataset(tmp_path_factory.mktemp("ddp"), spec)


def _step(manifest: Path, out: Path, architecture: str, processes: int) -> None:
    out.mkdir()
    args = [str(STEP), str(manifest), str(out), architecture, str(4 // processes), str(processes)]
    if processes == 1:
        cmd = [sys.executable, *args]
    else:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={processes}", *args]
    _check(subprocess.run(cmd, env=_env(), capture_output=True, text=True, timeout=600))


@pytest.mark.slow
@pytest.mark.parametrize("architecture", ["joint", "gated_mil", "streamingclam"])
def test_one_step_on_two_ranks_equals_one_step_in_one_process(tmp_path: Path, four_slides: Path, architecture: str):
    """float64, the same slides and initial weights, the joint model's draws fixed: the gradient averaged over two
    ranks of 2 slides is the gradient of the batch of 4, and so are the parameters after the Adam step. DDP's
    reducer averages it for the joint model and gated MIL; loupe itself, once per step, for StreamingCLAM (slides
    back-propagated one at a time, streamed)."""
    _step(four_slides, tmp_path / "one", architecture, 1)
    _step(four_slides, tmp_path / "two", architecture, 2)
    one = torch.load(tmp_path / "one" / "grads_rank0.pt", weights_only=True)
    ranks = [torch.load(tmp_path / "two" / f"grads_rank{r}.pt", weights_only=True) for r in (0, 1)]
    assert set(one) == set(ranks[0]) == set(ranks[1]) and len(one) > 10
    assert all(g.dtype == torch.float64 for g in one.values())
    scale = max(float(g.abs().max()) for g in one.values())
    assert scale > 0
    for name, g in one.items():
        # Relative to the largest gradient: some parameters' exact gradient is 0 (an attention score's bias, under
        # a softmax), where rounding is all there is.
        assert float((ranks[0][name] - g).abs().max()) <= 1e-9 * scale, name
        assert torch.equal(ranks[0][name], ranks[1][name]), name  # every rank steps with the same gradient
    before = torch.load(tmp_path / "one" / "params_rank0.pt", weights_only=True)
    after = torch.load(tmp_path / "two" / "params_rank0.pt", weights_only=True)
    assert max(float((after[n] - p).abs().max()) for n, p in before.items()) <= 1e-9


# --- the launch recipes of docs/scale.md ---------------------------------------------------------------------------


def _train_cli(manifest: Path, out: Path, *extra: str) -> list[str]:
    return [
        str(PRESETS / "demo.yaml"),
        "--data.manifest", str(manifest), "--out", str(out), "--train.accelerator", "cpu",
        "--train.progress_bar", "false", *extra,
    ]  # fmt: skip


def _loupe() -> list[str]:
    return [sys.executable, "-m", "loupe", "train"]


def _two_node_args(manifest: Path, out: Path) -> list[str]:
    return _train_cli(manifest, out, "--train.epochs", "1", "--train.num_nodes", "2", "--data.batch_size", "2")


def _slurm_task(task: int, port: str) -> dict[str, str]:
    """The variables srun sets for task ``task`` of a 2-node job step with one task per node."""
    return _env(
        SLURM_NTASKS="2", SLURM_NTASKS_PER_NODE="1", SLURM_PROCID=str(task), SLURM_LOCALID="0",
        SLURM_NODEID=str(task), SLURM_JOB_ID="4242", SLURM_JOB_NAME="loupe", SLURM_NODELIST="localhost",
        MASTER_PORT=port,
    )  # fmt: skip


def _run_all(commands: list[tuple[list[str], dict[str, str]]]) -> list[str]:
    """Start every command at once (they rendezvous), wait for all; their stdouts."""
    procs = [subprocess.Popen(c, env=e, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for c, e in commands]
    outs = [p.communicate(timeout=600) for p in procs]
    assert [p.returncode for p in procs] == [0] * len(procs), outs
    return [o for o, _ in outs]


@pytest.mark.slow
def test_multi_node_recipes_run_on_one_machine(tmp_path: Path, four_slides: Path):
    """torchrun on each of two "nodes" (here two processes of this machine), and a SLURM job step of two tasks
    (SLURM's variables as srun sets them): one run folder, one set of checkpoints, both ranks trained."""
    port = str(_free_port())
    rendezvous = ["--nnodes=2", "--nproc-per-node=1", "--master-addr=127.0.0.1", f"--master-port={port}"]
    torchrun = [sys.executable, "-m", "torch.distributed.run", *rendezvous]
    args = _two_node_args(four_slides, tmp_path / "torchrun")
    outs = _run_all([([*torchrun, f"--node-rank={n}", "-m", "loupe", "train", *args], _env()) for n in (0, 1)])
    assert outs[0].count("run folder:") == 1 and "run folder:" not in outs[1]  # reported once

    port = str(_free_port())
    args = _two_node_args(four_slides, tmp_path / "slurm")
    _run_all([([*_loupe(), *args], _slurm_task(task, port)) for task in (0, 1)])
    for run in (tmp_path / "torchrun", tmp_path / "slurm"):
        assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["best.ckpt", "last.ckpt"]
        assert len(list((run / "logs").iterdir())) == 1  # one logger: rank 0's
        ckpt = torch.load(run / "checkpoints" / "last.ckpt", weights_only=False, map_location="cpu")
        assert ckpt["global_step"] == 1  # 4 slides, 2 per rank and step: one step each


@pytest.mark.slow
def test_demo_trained_by_two_processes_learns_and_resumes(tmp_path: Path):
    """The one-node recipe (`loupe train ... --train.devices 2`: Lightning starts the second process) on the demo:
    it learns the task at the planted magnification; run again, it resumes from its last checkpoint."""
    from loupe.workflows.evaluation import evaluate

    manifest = generate_dataset(tmp_path / "data", SyntheticSpec(labels=("5x", "10x", "20x"), seed=0))
    run = tmp_path / "run"
    cmd = [*_loupe(), *_train_cli(manifest, run, "--train.devices", "2", "--train.epochs", "8")]
    result = subprocess.run(cmd, env=_env(), capture_output=True, text=True, timeout=1200)
    _check(result)
    assert result.stdout.count("run folder:") == 1
    metrics = evaluate(run, split="test", out=tmp_path / "eval")
    assert metrics["accuracy"] >= 0.9, metrics
    assert metrics["attention_share"]["20x"] >= 0.6, metrics["attention_share"]

    again = subprocess.run([*cmd[:-1], "9"], env=_env(), capture_output=True, text=True, timeout=1200)
    _check(again)
    assert "resuming from" in again.stderr
    ckpt = torch.load(run / "checkpoints" / "last.ckpt", weights_only=False, map_location="cpu")
    assert ckpt["epoch"] == 8  # the ninth epoch (0-based), after the eight of the first run
