"""A 3D model starts a 2.5D one (`inference.flatten`): the collapse along z is exact
where it should be, and ``livestain train --init`` uses it for single-plane truth."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from livestain.inference.checkpoint import ModelMeta, load_checkpoint, save_checkpoint
from livestain.inference.dataset import write_pairs
from livestain.inference.flatten import flatten_to_2_5d
from livestain.inference.model import UNet3D, UNetConfig
from livestain.inference.normalize import PercentileNorm

from _helpers import NoiseField, run_cli_in_process


def _random_3d_net(seed: int = 0) -> UNet3D:
    """A 3D network with random weights and BatchNorm statistics, its up-sampling
    kernels equal in their two z-slices: for those, flattening must be exact."""
    torch.manual_seed(seed)
    net = UNet3D(UNetConfig(depth=2, base_channels=4)).eval()
    with torch.no_grad():
        for name, p in net.named_parameters():
            if name.startswith("up.") and p.ndim == 5:
                p[:, :, 1] = p[:, :, 0]
        for m in net.modules():
            if isinstance(m, torch.nn.BatchNorm3d):
                m.running_mean.uniform_(-0.2, 0.2)
                m.running_var.uniform_(0.5, 2.0)
    return net


def test_a_flattened_network_on_a_window_of_one_plane_is_the_3d_network_on_a_stack_of_it() -> None:
    net = _random_3d_net()
    plane = torch.randn(1, 1, 32, 32)
    stack = plane[:, :, None].repeat(1, 1, 32, 1, 1)  # constant along z
    with torch.no_grad():
        expected = net(stack)[:, :, 16]  # an interior plane: no z padding reaches it
        for window in (1, 3, 6):
            flat = flatten_to_2_5d(net, window).eval()
            assert (flat.config.mode, flat.config.z_window) == ("2.5d", window)
            assert flat.config.structures == net.config.structures and flat.config.depth == 2
            got = flat(plane.repeat(1, window, 1, 1))
            np.testing.assert_allclose(got.numpy(), expected.numpy(), atol=1e-5)
        # the mean of the up-sampling kernels' z-slices is what makes the rest approximate:
        # a stack that varies along z is read differently, and it must be (not a copy of a plane)
        varied = torch.randn(1, 1, 32, 32, 32)
        assert not torch.allclose(net(varied)[:, :, 16], flatten_to_2_5d(net, 3).eval()(varied[0, :, 15:18]))


def test_flattening_refuses_a_network_that_is_not_3d() -> None:
    flat = flatten_to_2_5d(_random_3d_net(), 3)
    with pytest.raises(ValueError, match="takes a 3D network; this one is already 2.5d"):
        flatten_to_2_5d(flat, 3)


def test_train_init_3d_on_single_plane_truth_trains_a_2_5d_model_from_its_flattened_weights(tmp_path) -> None:
    data = tmp_path / "data"
    write_pairs([NoiseField(s) for s in range(3)], data)
    model3d = tmp_path / "m3d.safetensors"
    save_checkpoint(model3d, _random_3d_net(1), ModelMeta(UNetConfig(depth=2, base_channels=4), PercentileNorm(),
                                                          (1.0, 0.5, 0.5)))
    out = tmp_path / "flat"
    printed = run_cli_in_process(["train", str(data), "--structures", "dapi", "--out", str(out), "--init", str(model3d),
                    "--steps", "2", "--batch", "2", "--patch", "6,32,32", "--precision", "fp32",
                    "--val-fraction", "0.34"])
    assert "is a 3D model and this truth is single planes" in printed and "6-plane window" in printed
    model = load_checkpoint(out.with_suffix(".safetensors"))
    c = model.meta.config
    assert (c.mode, c.z_window, c.depth, c.base_channels, c.structures) == ("2.5d", 6, 2, 4, ("dapi",))
    init = model.meta.extra["init"]
    assert init["flattened_from_3d"] is True and init["head_rows"] == {"dapi": "dna"}
    assert model.meta.extra["settings"]["lr"] == pytest.approx(2e-3)  # the from-scratch rate, not a quarter
    assert model.meta.extra["patience"] == 0
