"""Turn a trained 3D U-Net into a 2.5D one, so a model trained on stacks can start the
training of one whose truth is a single plane.

Why: real paired data often have one fluorescence plane per brightfield stack (a DAPI
image beside a defocus series, a time-lapse of single planes), and a 3D network cannot
learn a plane from a stack, while a 2.5D one (`UNetConfig.mode` ``"2.5d"``: the planes
are its input channels, one plane out) can. Without this, ``livestain train --init
bundled`` on such data could only refuse.

How: on an input that is constant along z, a 3D convolution's interior output is a 2D
convolution with its kernel summed over z, so every 3x3x3 (and 2x2x2 down-sampling)
kernel becomes its z-sum; a transposed 2x2x2 convolution writes its two z-slices to
alternate output planes, so its 2D version takes their mean; BatchNorm and the 1x1
head carry over as they are. The first layer reads the window's planes as channels:
each gets the z-summed kernel divided by the window, so a window of identical planes
gives what the 3D network gives a stack of them. The result is a starting point for
features that read brightfield, not a model: the 3D network never saw its planes as
channels, so it is fine-tuned at the from-scratch rate (measured in bench/transfer.py).
"""

from __future__ import annotations

from dataclasses import replace

import torch

from .model import UNet3D

#: Module-name prefix of the transposed (up-sampling) convolutions in `UNet3D`.
UP = "up."
FIRST_CONV = "enc.0.0.weight"


def flatten_to_2_5d(net: UNet3D, z_window: int, target_2d: str = "plane") -> UNet3D:
    """A 2.5D `UNet3D` (same depth, width and structures, a ``z_window``-plane window)
    whose weights are ``net``'s 3D weights collapsed along z (see the module docstring)."""
    cfg = net.config
    if cfg.mode != "3d":
        raise ValueError(f"flattening takes a 3D network; this one is already {cfg.mode}")
    if cfg.in_channels != 1:
        raise ValueError(f"flattening takes a network of one input channel per plane, not {cfg.in_channels}")
    flat = UNet3D(replace(cfg, mode="2.5d", z_window=int(z_window), target_2d=target_2d))
    src, dst = net.state_dict(), flat.state_dict()
    with torch.no_grad():
        for name, out in dst.items():
            w = src[name]
            if w.ndim == 5:  # a 3D kernel: (out, in, kz, ky, kx), transposed (in, out, kz, ky, kx)
                w = w.mean(dim=2) if name.startswith(UP) else w.sum(dim=2)
                if name == FIRST_CONV:
                    w = w.repeat(1, out.shape[1], 1, 1) / out.shape[1]
            out.copy_(w.reshape(out.shape))
    return flat
