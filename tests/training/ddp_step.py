"""One optimiser step of `loupe train`, recording the gradients it applied: the worker of the DDP equality test.

Run alone (one process, batch B) or under ``torchrun --nproc-per-node 2`` (two ranks, batch B/2 each); both train
in float64 on the same slides with the same initial weights, and the joint model's draws are fixed (the k most
attended cells, a deterministic function of each slide's own attention), so the two gradients must agree to
rounding. Written by every rank to ``OUT/grads_rank{r}.pt`` (the gradients each rank stepped with, after DDP's
averaging) and ``OUT/params_rank{r}.pt`` (the parameters after the step).

Usage: python ddp_step.py MANIFEST OUT ARCHITECTURE BATCH_SIZE DEVICES
"""

from __future__ import annotations

import dataclasses
import sys
from pathlib import Path
from typing import Any

import lightning as L
import torch

import loupe.models.joint as joint
from loupe.config import Config, JointConfig, StreamingCLAMConfig, load_config
from loupe.workflows.training import train

PRESETS = Path(__file__).resolve().parents[2] / "src" / "loupe" / "configs"

#: A timm test network normalised by GroupNorm: per-sample statistics, so a rank's half batch normalises each
#: slide as the whole batch would (BatchNorm's batch statistics differ by construction, and PyTorch's SyncBatchNorm,
#: which loupe turns on for GPUs, does not run on CPU).
BACKBONE = "test_efficientnet_gn"


def fixed_draws(probs: torch.Tensor, k: int, replace: bool, generator: Any = None) -> torch.Tensor:
    """The k most probable cells of each row: the same cells for a slide in any batch, on any rank."""
    return torch.topk(probs.detach(), k, dim=-1).indices


class RecordStep(L.Callback):
    """Save the gradients the optimiser is about to apply, and the parameters after the step."""

    def __init__(self, out: Path) -> None:
        self.out = out

    def on_before_optimizer_step(self, trainer: L.Trainer, pl_module: L.LightningModule, optimizer: Any) -> None:
        grads = {n: p.grad.detach().clone() for n, p in pl_module.named_parameters() if p.grad is not None}
        torch.save(grads, self.out / f"grads_rank{trainer.global_rank}.pt")

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        params = {n: p.detach().clone() for n, p in pl_module.named_parameters()}
        torch.save(params, self.out / f"params_rank{trainer.global_rank}.pt")


def config(manifest: str, architecture: str, batch_size: int, devices: int) -> Config:
    base = load_config(PRESETS / "demo.yaml")
    sections: dict[str, Any] = {"joint": JointConfig()}
    if architecture == "joint":
        # loupe's defaults for discovery (half-uniform proposal, novelty prior, per-magnification maps): every
        # term of the joint model's loss takes part.
        sections["joint"] = dataclasses.replace(
            base.joint, thumbnail_backbone=BACKBONE, uniform_mix=0.5, novelty=1.0, magnification_aware=True
        )
    if architecture == "streamingclam":
        # Frozen BatchNorm (the streaming engine's requirement) is exact per rank; no calibration, which would
        # take each rank's own images; the accumulated gradients are averaged across ranks by loupe itself.
        sections["streamingclam"] = StreamingCLAMConfig(
            tile_size=96, attention_dropout=0.0, instance_loss=True, calibrate_normalisation=False
        )
    return dataclasses.replace(
        base,
        data=dataclasses.replace(base.data, manifest=manifest, batch_size=batch_size, num_workers=0),
        model=dataclasses.replace(
            base.model,
            architecture=architecture,
            patch_backbone="tiny" if architecture == "streamingclam" else BACKBONE,
            classifier_dropout=0.0,
            magnifications=base.model.magnifications if architecture == "joint" else ["20x"],
        ),
        train=dataclasses.replace(
            base.train,
            epochs=1,
            precision="64-true",
            accelerator="cpu",
            devices=devices,
            progress_bar=False,
            channels_last=False,
        ),
        **sections,
    )


def main(argv: list[str]) -> None:
    manifest, out, architecture, batch, devices = argv
    out_dir = Path(out)
    joint.sample_cells = fixed_draws  # type: ignore[assignment]
    torch.set_num_threads(1)
    cfg = config(manifest, architecture, int(batch), int(devices))
    train(cfg, out=out_dir / "run", callbacks=[RecordStep(out_dir)])


if __name__ == "__main__":
    main(sys.argv[1:])
