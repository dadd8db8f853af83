"""What the CLI commands do, as plain functions: train, evaluate, predict, demo."""

from loupe.workflows.demo import run_demo
from loupe.workflows.evaluation import evaluate
from loupe.workflows.prediction import predict
from loupe.workflows.training import train

__all__ = ["evaluate", "predict", "run_demo", "train"]
