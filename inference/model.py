"""The U-Net that maps brightfield to one output channel per structure: 3D or 2.5D.

Design follows the Allen Institute's label-free model (fnet, Ounkomol et al. 2018):
per level two 3x3(x3) conv + BatchNorm + ReLU, stride-2 convolution down, transposed
convolution up, skip connections by concatenation. Unlike fnet, all structures are
output channels of one network (one pass predicts all), depth and width are
configurable, and any input size is accepted: the input is padded to a multiple of
``2**depth`` and the output cropped back.

Two modes (`UNetConfig.mode`):

``"3d"``
    ``(N, 1, Z, Y, X) -> (N, S, Z, Y, X)``: a stack in, a stack out (fnet).
``"2.5d"``
    ``(N, z_window, Y, X) -> (N, S, Y, X)``: a window of ``z_window`` planes in, as the
    input channels of a 2D U-Net, one plane per structure out. For targets that are a
    single plane or a projection (Christiansen et al. 2018's in-silico labelling and
    most 2D datasets). `UNetConfig.target_2d` says which the output means: ``"plane"``
    (the target plane at the window's centre) or ``"max"`` (the maximum projection of a
    3D target over the whole stack). `window_indices` picks the planes; the
    `~livestain.inference.predict.Predictor` predicts the window centred in the stack
    (or, with ``slide=True``, every plane from the window centred on it).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

MODES = ("3d", "2.5d")
TARGETS_2D = ("plane", "max")


@dataclass(frozen=True)
class UNetConfig:
    """Architecture of a `UNet3D`; stored in every checkpoint.

    Attributes
    ----------
    in_channels : int
        Input channels per plane (1: brightfield).
    structures : tuple[str, ...]
        Names of the output channels, one per predicted structure.
    depth : int
        Number of down-sampling levels (fnet: 4).
    base_channels : int
        Channels of the first level, doubled per level (fnet: 32).
    mode : str
        ``"3d"`` (stack in, stack out) or ``"2.5d"`` (``z_window`` planes in, one plane out).
    z_window : int
        2.5D: planes the network sees (its input channels). Must be 1 in 3D.
    target_2d : str
        2.5D: what the output plane is: ``"plane"`` (the target at the window's centre
        plane) or ``"max"`` (the target's maximum projection over z).
    """

    in_channels: int = 1
    structures: tuple[str, ...] = ("dna", "membrane", "mitochondria")
    depth: int = 2
    base_channels: int = 8
    mode: str = "3d"
    z_window: int = 1
    target_2d: str = "plane"

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise ValueError(f"mode {self.mode!r} is not one of {MODES}")
        if self.target_2d not in TARGETS_2D:
            raise ValueError(f"target_2d {self.target_2d!r} is not one of {TARGETS_2D}")
        if self.z_window < 1 or (self.mode == "3d" and self.z_window != 1):
            raise ValueError(
                f"z_window {self.z_window}: a 2.5d model needs at least 1 plane; a 3d model takes "
                "the whole stack (z_window 1)"
            )
        if self.depth < 1 or self.base_channels < 1 or self.in_channels < 1 or not self.structures:
            raise ValueError("depth, base_channels and in_channels must be at least 1, with one structure or more")

    @property
    def spatial_dims(self) -> int:
        """3 for a 3D network, 2 for a 2.5D one."""
        return 3 if self.mode == "3d" else 2

    @property
    def net_in_channels(self) -> int:
        """Channels of the network's input tensor (2.5D: planes x channels per plane)."""
        return self.in_channels * (self.z_window if self.mode == "2.5d" else 1)

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> UNetConfig:
        """Inverse of `to_dict`; checkpoints written before 2.5D (no ``mode``) are 3D."""
        keys = ("in_channels", "depth", "base_channels", "mode", "z_window", "target_2d")
        known = {k: d[k] for k in keys if k in d}
        return cls(structures=tuple(d["structures"]), **known)


_OPS = {
    3: (nn.Conv3d, nn.BatchNorm3d, nn.ConvTranspose3d),
    2: (nn.Conv2d, nn.BatchNorm2d, nn.ConvTranspose2d),
}


def _double_conv(c_in: int, c_out: int, dims: int = 3) -> nn.Sequential:
    conv, bn, _ = _OPS[dims]
    return nn.Sequential(
        conv(c_in, c_out, 3, padding=1, bias=False),
        bn(c_out),
        nn.ReLU(inplace=True),
        conv(c_out, c_out, 3, padding=1, bias=False),
        bn(c_out),
        nn.ReLU(inplace=True),
    )


def pad_to_multiple(x: torch.Tensor, m: int) -> torch.Tensor:
    """Pad the spatial axes of ``(N, C, *spatial)`` at their high ends to multiples of ``m``.

    Reflection keeps edges natural but needs pad < size, so tiny inputs are replicated.
    """
    size = x.shape[2:]
    pad = [(-s) % m for s in size]
    if not any(pad):
        return x
    spec: list[int] = []
    for p in reversed(pad):  # F.pad: last axis first, (lo, hi) each
        spec += [0, p]
    mode = "reflect" if all(p < s for p, s in zip(pad, size)) else "replicate"
    return F.pad(x, tuple(spec), mode=mode)


def window_indices(n_planes: int, z_window: int, centre: int | None = None) -> np.ndarray:
    """Plane indices of a ``z_window``-plane window centred on ``centre`` (default: middle).

    The window is ``centre - z_window // 2 ... centre + (z_window - 1) // 2``; planes
    beyond the stack repeat its edge plane, so every window has ``z_window`` planes
    (a thin stack, or a window at the stack's edge, still gives a prediction).
    """
    if n_planes < 1:
        raise ValueError("a stack needs at least one plane")
    c = n_planes // 2 if centre is None else int(centre)
    return np.clip(np.arange(z_window) + c - z_window // 2, 0, n_planes - 1)


class UNet3D(nn.Module):
    """U-Net for any spatial size: 3D ``(N, 1, Z, Y, X) -> (N, S, Z, Y, X)`` or, in 2.5D
    mode, ``(N, z_window, Y, X) -> (N, S, Y, X)`` (see `UNetConfig`)."""

    def __init__(self, config: UNetConfig | None = None) -> None:
        super().__init__()
        self.config = cfg = config or UNetConfig()
        dims = cfg.spatial_dims
        conv, bn, conv_t = _OPS[dims]
        widths = [cfg.base_channels * 2**i for i in range(cfg.depth + 1)]
        self.enc = nn.ModuleList()
        self.down = nn.ModuleList()
        c_in = cfg.net_in_channels
        for i in range(cfg.depth):
            self.enc.append(_double_conv(c_in, widths[i], dims))
            self.down.append(
                nn.Sequential(
                    conv(widths[i], widths[i], 2, stride=2, bias=False),
                    bn(widths[i]),
                    nn.ReLU(inplace=True),
                )
            )
            c_in = widths[i]
        self.bottom = _double_conv(widths[cfg.depth - 1], widths[cfg.depth], dims)
        self.up = nn.ModuleList()
        self.dec = nn.ModuleList()
        for i in reversed(range(cfg.depth)):
            self.up.append(
                nn.Sequential(
                    conv_t(widths[i + 1], widths[i], 2, stride=2, bias=False),
                    bn(widths[i]),
                    nn.ReLU(inplace=True),
                )
            )
            self.dec.append(_double_conv(2 * widths[i], widths[i], dims))
        self.head = conv(widths[0], len(cfg.structures), 1)

    @property
    def multiple(self) -> int:
        """Spatial sizes the network itself needs to be divisible by."""
        return 2**self.config.depth

    def core(self, x: torch.Tensor) -> torch.Tensor:
        """The network on an input whose spatial sizes are multiples of `multiple` (no padding)."""
        return self.head(self.decoder_features(x))

    def decoder_features(self, x: torch.Tensor) -> torch.Tensor:
        """The last decoder layer's features, what `head` reads (`core` without it), on an
        input whose spatial sizes are multiples of `multiple`: other networks can read them
        as input (bench/transfer_side.py)."""
        skips = []
        for enc, down in zip(self.enc, self.down):
            x = enc(x)
            skips.append(x)
            x = down(x)
        x = self.bottom(x)
        for up, dec, skip in zip(self.up, self.dec, reversed(skips)):
            x = dec(torch.cat([up(x), skip], dim=1))
        return x

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dims = self.config.spatial_dims
        if x.ndim != dims + 2 or x.shape[1] != self.config.net_in_channels:
            want = "(N, 1, Z, Y, X)" if dims == 3 else f"(N, {self.config.net_in_channels}, Y, X) (z_window planes)"
            raise ValueError(f"{self.config.mode} U-Net expects {want}, got shape {tuple(x.shape)}")
        size = x.shape[2:]
        y = self.core(pad_to_multiple(x, self.multiple))
        return y[(Ellipsis, *(slice(0, s) for s in size))]
