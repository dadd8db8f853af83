"""Frozen BatchNorm folded into the convolution before it: same outputs and gradients, the original untouched."""

from __future__ import annotations

import timm
import torch
from torch import nn

from loupe.models.batchnorm_folding import FoldedConvBN, fold_batchnorm
from loupe.models.streaming import freeze_normalisation, resnet_sequential


def _randomise(model: nn.Module) -> nn.Module:
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.weight.uniform_(0.5, 1.5)
                m.bias.normal_(0.0, 0.3)
                m.running_mean.normal_(0.0, 0.3)
                m.running_var.uniform_(0.5, 2.0)
    return freeze_normalisation(model)


def _resnet(arch: str) -> nn.Module:
    torch.manual_seed(0)
    model = timm.create_model(arch, pretrained=False, num_classes=0, global_pool="", channels=(4, 6, 6, 8))
    return _randomise(model.double())


def _grads(module: nn.Module, net: nn.Module, image: torch.Tensor, weight: torch.Tensor):
    module.zero_grad(set_to_none=True)
    out = net(image)
    (out * weight).sum().backward()
    grads = {n: p.grad.clone() for n, p in module.named_parameters() if p.grad is not None}
    module.zero_grad(set_to_none=True)
    return out.detach(), grads


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max() / b.abs().max())


def test_folded_resnets_give_the_same_outputs_and_parameter_gradients():
    torch.manual_seed(1)
    image = torch.randn(1, 3, 70, 90, dtype=torch.float64)
    for arch in ("resnet18", "resnet50"):  # BasicBlock and Bottleneck, stem and downsample Sequential
        model = _resnet(arch)
        for module in (model, resnet_sequential(model)):
            net = module.forward_features if hasattr(module, "forward_features") else module
            folded = fold_batchnorm(module)
            folded_net = folded.forward_features if hasattr(folded, "forward_features") else folded
            n_bn = sum(isinstance(m, nn.BatchNorm2d) for m in module.modules())
            assert sum(isinstance(m, FoldedConvBN) for m in folded.modules()) == n_bn > 0
            with torch.no_grad():
                weight = torch.randn_like(net(image))
            out, ref = _grads(module, net, image, weight)
            out_f, got = _grads(module, folded_net, image, weight)
            assert _rel(out_f, out) < 1e-12
            assert got.keys() == ref.keys() and len(ref) > 0
            assert max(_rel(got[n], ref[n]) for n in ref) < 1e-12
            # The original is unchanged and shares every parameter: nothing to save or load differently.
            assert not any(isinstance(m, FoldedConvBN) for m in module.modules())
            assert {id(p) for p in folded.parameters()} == {id(p) for p in module.parameters()}


def test_conv_bias_and_unfreezable_norms():
    torch.manual_seed(2)
    net = nn.Sequential(
        nn.Conv2d(3, 4, 3, padding=1, bias=True),
        nn.BatchNorm2d(4),
        nn.ReLU(),
        nn.Conv2d(4, 4, 3, padding=1),
        nn.BatchNorm2d(4),  # in training mode: batch statistics, folding would not be exact
        nn.Conv2d(4, 4, 1),
        nn.BatchNorm2d(4),  # trainable affine: left alone too
    ).double()
    _randomise(net)
    net[4].train()
    net[6].weight.requires_grad_(True)
    folded = fold_batchnorm(net)
    assert isinstance(folded[0], FoldedConvBN) and isinstance(folded[1], nn.Identity)
    assert folded[4] is net[4] and folded[6] is net[6] and folded[3] is net[3]
    net[4].eval()  # compare in eval mode (net[4] unfolded either way)
    x = torch.randn(2, 3, 9, 11, dtype=torch.float64)
    with torch.no_grad():
        assert _rel(folded(x), net(x)) < 1e-12


def test_nothing_to_fold_returns_the_module_itself():
    net = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.Sequential(nn.Conv2d(4, 4, 1)))
    assert fold_batchnorm(net) is net
