"""Frozen BatchNorm folded into the convolution before it: the same function, one layer fewer to run and store.

A frozen BatchNorm after a convolution is an affine map per channel, ``y = (conv(x) − μ)·s + β`` with
``s = γ/√(σ² + ε)``; it equals one convolution with weight ``W·s`` and bias ``(b − μ)·s + β``. :class:`FoldedConvBN`
computes that weight from the live convolution and BatchNorm at every call, so the convolution's own ``weight`` (and
``bias``) stay the trainable parameters and receive exactly their gradients (``∂L/∂W = ∂L/∂W′·s``), while a training
step runs and keeps one tensor per layer instead of two. :func:`fold_batchnorm` builds such a view of a network that
shares every parameter and buffer with it (nothing is copied and ``state_dict`` is untouched).
"""

from __future__ import annotations

import copy
import itertools

from torch import Tensor, nn

#: (convolution, BatchNorm) attribute pairs applied one after the other by ResNet blocks and stems (timm and
#: torchvision): ``conv1 → bn1``, ``conv2 → bn2``, ``conv3 → bn3``.
_RESNET_PAIRS = (("conv1", "bn1"), ("conv2", "bn2"), ("conv3", "bn3"))
#: Module classes (by module path and name) whose ``forward`` applies each pair of :data:`_RESNET_PAIRS` in a row.
_RESNET_CLASSES = {
    ("timm.models.resnet", "BasicBlock"),
    ("timm.models.resnet", "Bottleneck"),
    ("timm.models.resnet", "ResNet"),
    ("torchvision.models.resnet", "BasicBlock"),
    ("torchvision.models.resnet", "Bottleneck"),
    ("torchvision.models.resnet", "ResNet"),
}


class FoldedConvBN(nn.Module):
    """``bn(conv(x))`` for a frozen ``bn``, computed as one convolution (see the module docstring)."""

    def __init__(self, conv: nn.Conv2d, bn: nn.BatchNorm2d) -> None:
        super().__init__()
        self.conv = conv
        self.bn = bn

    def forward(self, x: Tensor) -> Tensor:
        conv, bn = self.conv, self.bn
        assert bn.running_mean is not None and bn.running_var is not None
        scale = (bn.running_var + bn.eps).rsqrt()
        if bn.weight is not None:
            scale = scale * bn.weight
        shift = -bn.running_mean * scale
        if bn.bias is not None:
            shift = shift + bn.bias
        bias = shift if conv.bias is None else conv.bias * scale + shift
        return conv._conv_forward(x, conv.weight * scale.reshape(-1, 1, 1, 1), bias)


def _foldable(conv: nn.Module, bn: nn.Module) -> bool:
    """A plain Conv2d followed by a plain frozen BatchNorm2d with running statistics, of matching width."""
    return (
        type(conv) is nn.Conv2d
        and type(bn) is nn.BatchNorm2d
        and not bn.training
        and bn.running_mean is not None
        and bn.running_var is not None
        and not any(p.requires_grad for p in bn.parameters(recurse=False))
        and bn.num_features == conv.out_channels
    )


def fold_batchnorm(module: nn.Module) -> nn.Module:
    """A view of ``module`` where every frozen BatchNorm that directly follows a convolution is folded into it.

    Folded are: adjacent (Conv2d, BatchNorm2d) children of an ``nn.Sequential`` and the ``convN``/``bnN`` pairs of
    timm and torchvision ResNet blocks and stems (whose ``forward`` applies them in a row). The BatchNorm becomes an
    ``nn.Identity`` in the view. Containers on the way are shallow copies; every leaf module, parameter and buffer is
    shared with ``module``, which is left unchanged. BatchNorms in training mode or with trainable parameters are
    left alone (folding them would not be exact).
    """
    children = dict(module._modules)
    changed = False
    if isinstance(module, nn.Sequential):
        names = list(children)
        for a, b in itertools.pairwise(names):
            conv, bn = children[a], children[b]
            if conv is not None and bn is not None and _foldable(conv, bn):
                assert isinstance(conv, nn.Conv2d) and isinstance(bn, nn.BatchNorm2d)
                children[a], children[b] = FoldedConvBN(conv, bn), nn.Identity()
                changed = True
    elif (type(module).__module__, type(module).__name__) in _RESNET_CLASSES:
        for a, b in _RESNET_PAIRS:
            conv, bn = children.get(a), children.get(b)
            if conv is not None and bn is not None and _foldable(conv, bn):
                assert isinstance(conv, nn.Conv2d) and isinstance(bn, nn.BatchNorm2d)
                children[a], children[b] = FoldedConvBN(conv, bn), nn.Identity()
                changed = True
    for name, child in children.items():
        if child is not None and not isinstance(child, FoldedConvBN):
            folded = fold_batchnorm(child)
            if folded is not child:
                children[name] = folded
                changed = True
    if not changed:
        return module
    view = copy.copy(module)
    view._modules = children
    return view
