"""`inference.widen`: a wider network that predicts what the trained one predicts."""

from __future__ import annotations

import pytest
import torch

from livestain.inference.model import UNet3D, UNetConfig
from livestain.inference.widen import widen


def _trained_like(cfg: UNetConfig) -> UNet3D:
    """A network with non-trivial BatchNorm statistics, as a trained one has."""
    torch.manual_seed(0)
    net = UNet3D(cfg)
    for module in net.modules():
        if isinstance(module, (torch.nn.BatchNorm3d, torch.nn.BatchNorm2d)):
            module.running_mean.uniform_(-0.5, 0.5)
            module.running_var.uniform_(0.5, 2.0)
            module.weight.data.uniform_(0.5, 1.5)
            module.bias.data.uniform_(-0.2, 0.2)
    return net


@pytest.mark.parametrize("cfg, shape", [
    (UNetConfig(depth=2, base_channels=4), (2, 1, 8, 16, 16)),
    (UNetConfig(depth=1, base_channels=3, structures=("dna",)), (2, 1, 4, 8, 8)),
    (UNetConfig(depth=2, base_channels=4, mode="2.5d", z_window=5), (2, 5, 16, 16)),
])
def test_widening_without_noise_keeps_the_prediction_in_eval_and_training(cfg, shape) -> None:
    net = _trained_like(cfg)
    x = torch.randn(shape)
    for training in (False, True):
        net.train(training)
        wide = widen(net, cfg.base_channels * 2 - 1, noise=0.0)
        assert wide.training == training
        assert wide.config.base_channels == cfg.base_channels * 2 - 1
        assert sum(p.numel() for p in wide.parameters()) > sum(p.numel() for p in net.parameters())
        with torch.no_grad():
            assert torch.allclose(wide(x), net(x), atol=1e-4)


def test_noise_makes_the_copies_differ_slightly() -> None:
    net = _trained_like(UNetConfig(depth=2, base_channels=4)).eval()
    wide = widen(net, 8, noise=0.01).eval()
    w = wide.enc[0][0].weight
    assert not torch.equal(w[4:], w[:4])  # the copies of channels 0-3 are not identical
    assert torch.equal(w[:4], net.enc[0][0].weight)  # the originals are untouched
    x = torch.randn(1, 1, 8, 16, 16)
    with torch.no_grad():
        a, b = net(x), wide(x)
    assert 0 < float((a - b).abs().max()) < 0.1 * float(a.abs().max())


def test_widening_refuses_to_shrink() -> None:
    with pytest.raises(ValueError, match="at least 4 base channels"):
        widen(UNet3D(UNetConfig(depth=1, base_channels=4)), 3)
