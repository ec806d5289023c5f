"""The fast inference path computes what the plain network computes."""

from __future__ import annotations

import torch

from livestain.inference.fast import FastNet, OneDnnConv3d, fold_batchnorm, max_abs_difference
from livestain.inference.model import UNet3D, UNetConfig


def _trained_looking_net() -> UNet3D:
    torch.manual_seed(0)
    net = UNet3D(UNetConfig(depth=2, base_channels=4))
    net.train()
    with torch.no_grad():
        net(torch.randn(2, 1, 8, 32, 32) * 3 + 1)  # BatchNorm statistics far from 0/1
    return net.eval()


def test_folding_batchnorm_removes_it_and_keeps_the_output() -> None:
    net = _trained_looking_net()
    folded = fold_batchnorm(net)
    assert not any(isinstance(m, torch.nn.BatchNorm3d) for m in folded.modules())
    assert any(isinstance(m, torch.nn.BatchNorm3d) for m in net.modules())  # original untouched
    x = torch.randn(1, 1, 8, 40, 24)
    with torch.inference_mode():
        ref, out = net(x), folded(x)
    assert torch.allclose(ref, out, atol=1e-4, rtol=1e-4)
    assert ref.abs().max() > 0.1  # a non-trivial output


def test_fast_net_fp32_matches_and_bf16_stays_close() -> None:
    net = _trained_looking_net()
    x = torch.randn(1, 1, 8, 32, 32)
    fast = FastNet(net, "cpu", bf16=False)
    # every 3D convolution on oneDNN (PyTorch would take its slow kernel for this input)
    assert any(isinstance(m, OneDnnConv3d) for m in fast.modules())
    assert not any(type(m) is torch.nn.Conv3d for m in fast.modules())
    assert max_abs_difference(net, fast, x) < 1e-4
    with torch.inference_mode():
        scale = float(net(x).abs().max())
    assert max_abs_difference(net, FastNet(net, "cpu", bf16=True), x) < 0.05 * scale


def test_compiled_fast_path_matches_eager_and_caches_where_told(tmp_path, monkeypatch) -> None:
    """`livestain worker --compile`: same numbers as eager; kernels land in the cache folder."""
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path / "cache"))
    torch.manual_seed(0)
    net = UNet3D(UNetConfig(depth=1, base_channels=4)).eval()
    x = torch.randn(1, 1, 8, 16, 16)
    eager = FastNet(net, "cpu", bf16=False)(x)
    compiled = FastNet(net, "cpu", bf16=False, compile=True)(x)
    torch.testing.assert_close(compiled, eager, rtol=1e-4, atol=1e-5)
    assert any((tmp_path / "cache").iterdir())
