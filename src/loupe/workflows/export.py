"""`loupe export-encoder`: a trained run's patch network as a weights file, to be loaded elsewhere as an encoder
(``--model.patch_backbone NAME --model.patch_pretrained FILE``, e.g. frozen with ``--model.freeze_patch_backbone``)."""

from __future__ import annotations

from pathlib import Path

from loupe.atomic import atomic_write
from loupe.errors import ConfigError
from loupe.models.backbones import Backbone
from loupe.models.factory import architecture
from loupe.workflows.common import load_run


def export_patch_encoder(run: str | Path, *, out: str | Path, checkpoint: str = "best") -> Path:
    """Write the patch network of run folder ``run`` to ``out``: the state dict of the backbone's network, in the
    form ``create_backbone(model.patch_backbone, out)`` loads (a PyTorch state dict, loaded weights-only)."""
    import torch

    cfg, model, _ = load_run(run, checkpoint)
    patch_net = model.patch_network()
    if patch_net is None:
        raise ConfigError(
            f"{run}: model.architecture {cfg.model.architecture} has no separate patch network to export"
            + (" (its trunk is streamed over the whole image)" if architecture(cfg).whole_image is not None else "")
        )
    net = patch_net.net if isinstance(patch_net, Backbone) else patch_net
    state = {k: v.detach().to("cpu", memory_format=torch.contiguous_format) for k, v in net.state_dict().items()}
    return atomic_write(out, lambda handle: torch.save(state, handle))
