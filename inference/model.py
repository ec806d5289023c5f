"""The 3D U-Net that maps a brightfield stack to one output channel per structure.

Design follows the Allen Institute's label-free model (fnet, Ounkomol et al. 2018):
per level two 3x3x3 conv + BatchNorm + ReLU, stride-2 convolution down, transposed
convolution up, skip connections by concatenation. Unlike fnet, all structures are
output channels of one network (one pass predicts all), depth and width are
configurable, and any input size is accepted: the input is padded to a multiple of
``2**depth`` and the output cropped back.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from torch import nn


@dataclass(frozen=True)
class UNetConfig:
    """Architecture of a `UNet3D`; stored in every checkpoint.

    Attributes
    ----------
    in_channels : int
        Input channels (1: brightfield).
    structures : tuple[str, ...]
        Names of the output channels, one per predicted structure.
    depth : int
        Number of down-sampling levels (fnet: 4).
    base_channels : int
        Channels of the first level, doubled per level (fnet: 32).
    """

    in_channels: int = 1
    structures: tuple[str, ...] = ("dna", "membrane", "mitochondria")
    depth: int = 2
    base_channels: int = 8

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> UNetConfig:
        known = {k: d[k] for k in ("in_channels", "depth", "base_channels") if k in d}
        return cls(structures=tuple(d["structures"]), **known)


def _double_conv(c_in: int, c_out: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv3d(c_in, c_out, 3, padding=1, bias=False),
        nn.BatchNorm3d(c_out),
        nn.ReLU(inplace=True),
        nn.Conv3d(c_out, c_out, 3, padding=1, bias=False),
        nn.BatchNorm3d(c_out),
        nn.ReLU(inplace=True),
    )


class UNet3D(nn.Module):
    """3D U-Net: ``(N, C_in, Z, Y, X) -> (N, n_structures, Z, Y, X)`` for any Z, Y, X."""

    def __init__(self, config: UNetConfig | None = None) -> None:
        super().__init__()
        self.config = cfg = config or UNetConfig()
        widths = [cfg.base_channels * 2**i for i in range(cfg.depth + 1)]
        self.enc = nn.ModuleList()
        self.down = nn.ModuleList()
        c_in = cfg.in_channels
        for i in range(cfg.depth):
            self.enc.append(_double_conv(c_in, widths[i]))
            self.down.append(
                nn.Sequential(
                    nn.Conv3d(widths[i], widths[i], 2, stride=2, bias=False),
                    nn.BatchNorm3d(widths[i]),
                    nn.ReLU(inplace=True),
                )
            )
            c_in = widths[i]
        self.bottom = _double_conv(widths[cfg.depth - 1], widths[cfg.depth])
        self.up = nn.ModuleList()
        self.dec = nn.ModuleList()
        for i in reversed(range(cfg.depth)):
            self.up.append(
                nn.Sequential(
                    nn.ConvTranspose3d(widths[i + 1], widths[i], 2, stride=2, bias=False),
                    nn.BatchNorm3d(widths[i]),
                    nn.ReLU(inplace=True),
                )
            )
            self.dec.append(_double_conv(2 * widths[i], widths[i]))
        self.head = nn.Conv3d(widths[0], len(cfg.structures), 1)

    @property
    def multiple(self) -> int:
        """Spatial sizes the network itself needs to be divisible by."""
        return 2**self.config.depth

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        size = x.shape[-3:]
        m = self.multiple
        pad = [(-s) % m for s in size]
        if any(pad):
            # F.pad takes (x_lo, x_hi, y_lo, y_hi, z_lo, z_hi); reflect keeps edges natural
            # but needs pad < size, so fall back to replicate for tiny inputs.
            spec = (0, pad[2], 0, pad[1], 0, pad[0])
            mode = "reflect" if all(p < s for p, s in zip(pad, size)) else "replicate"
            x = F.pad(x, spec, mode=mode)
        skips = []
        for enc, down in zip(self.enc, self.down):
            x = enc(x)
            skips.append(x)
            x = down(x)
        x = self.bottom(x)
        for up, dec, skip in zip(self.up, self.dec, reversed(skips)):
            x = dec(torch.cat([up(x), skip], dim=1))
        x = self.head(x)
        return x[..., : size[0], : size[1], : size[2]]
