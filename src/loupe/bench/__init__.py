"""Timing harness behind `loupe bench`: the paper's speed tables, a profile of the joint model, and the
accuracy comparison with the baselines, all measured through the real training and inference code."""

from loupe.bench.command import bench_command, run_accuracy, run_bench

__all__ = ["bench_command", "run_accuracy", "run_bench"]
