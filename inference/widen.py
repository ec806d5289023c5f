"""Widen a trained U-Net without changing what it predicts (Net2WiderNet, Chen et al.,
ICLR 2016), so a larger network starts where a smaller one ended.

Why: the bundled 3D network (8 base channels, 88k parameters) is at its capacity on
mitochondria, and training a wider one from scratch repeats the whole recipe chain (an
hour on 2 CPU cores). Widening copies each feature channel of the trained network into
the new ones (new channel j of a layer is old channel ``j mod old``), and divides the
next layer's weights from a copied channel by the number of its copies, so every
layer's output is the same function of the input; a small noise on the copies' incoming
weights lets them drift apart when fine-tuning (identical copies would get identical
gradients forever).

Every normalisation is BatchNorm, per channel, so a copy's statistics equal its
original's in training and in evaluation alike.
"""

from __future__ import annotations

from dataclasses import replace

import torch

from .model import UNet3D


def _mapping(old: int, new: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(source old channel of each new channel, copies of each old channel)."""
    if new < old:
        raise ValueError(f"widening cannot shrink a layer ({old} -> {new} channels)")
    source = torch.arange(new) % old
    return source, torch.bincount(source, minlength=old).to(torch.float32)


def widen(net: UNet3D, base_channels: int, noise: float = 0.01, seed: int = 0) -> UNet3D:
    """A `UNet3D` with ``base_channels`` (>= ``net``'s) predicting what ``net`` predicts.

    ``noise``: standard deviation of the noise on the copies' incoming weights, as a
    fraction of each weight tensor's own standard deviation (0: an exact copy of the
    function, whose copies never diverge).
    """
    cfg = net.config
    if base_channels < cfg.base_channels:
        raise ValueError(f"widening needs at least {cfg.base_channels} base channels, got {base_channels}")
    wide = UNet3D(replace(cfg, base_channels=base_channels))
    old_w = [cfg.base_channels * 2**i for i in range(cfg.depth + 1)]
    new_w = [base_channels * 2**i for i in range(cfg.depth + 1)]
    maps = [_mapping(o, n) for o, n in zip(old_w, new_w)]
    generator = torch.Generator().manual_seed(seed)
    fixed_in = (torch.arange(cfg.net_in_channels), torch.ones(cfg.net_in_channels))

    def concat(*parts: tuple[torch.Tensor, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        """The mapping of concatenated feature spaces (a decoder's up + skip input)."""
        sources, counts, offset = [], [], 0
        for source, count in parts:
            sources.append(source + offset)
            counts.append(count)
            offset += count.numel()
        return torch.cat(sources), torch.cat(counts)

    def weight(old: torch.Tensor, out_map, in_map, transposed: bool = False) -> torch.Tensor:
        """Conv weight (out, in, ...) or transposed-conv weight (in, out, ...), widened."""
        if transposed:
            old = old.transpose(0, 1)
        (out_src, out_copies), (in_src, in_copies) = out_map, in_map
        new = old[out_src][:, in_src] / in_copies[in_src].view(1, -1, *([1] * (old.ndim - 2)))
        is_copy = torch.arange(out_src.numel()) >= out_copies.numel()
        if noise and bool(is_copy.any()):
            scale = noise * float(old.std())
            new[is_copy] += scale * torch.randn(new[is_copy].shape, generator=generator)
        return new.transpose(0, 1).contiguous() if transposed else new

    def norm(old: torch.nn.BatchNorm3d | torch.nn.BatchNorm2d, new, out_map) -> None:
        source = out_map[0]
        for name in ("weight", "bias", "running_mean", "running_var"):
            getattr(new, name).data.copy_(getattr(old, name).data[source])
        new.num_batches_tracked.data.copy_(old.num_batches_tracked.data)

    def double_conv(old, new, in_map, out_map) -> None:
        new[0].weight.data.copy_(weight(old[0].weight.data, out_map, in_map))
        norm(old[1], new[1], out_map)
        new[3].weight.data.copy_(weight(old[3].weight.data, out_map, out_map))
        norm(old[4], new[4], out_map)

    with torch.no_grad():
        in_map = fixed_in
        for i in range(cfg.depth):
            double_conv(net.enc[i], wide.enc[i], in_map, maps[i])
            wide.down[i][0].weight.data.copy_(weight(net.down[i][0].weight.data, maps[i], maps[i]))
            norm(net.down[i][1], wide.down[i][1], maps[i])
            in_map = maps[i]
        double_conv(net.bottom, wide.bottom, maps[cfg.depth - 1], maps[cfg.depth])
        below = maps[cfg.depth]
        for k, i in enumerate(reversed(range(cfg.depth))):
            wide.up[k][0].weight.data.copy_(weight(net.up[k][0].weight.data, maps[i], below, transposed=True))
            norm(net.up[k][1], wide.up[k][1], maps[i])
            double_conv(net.dec[k], wide.dec[k], concat(maps[i], maps[i]), maps[i])
            below = maps[i]
        heads = (torch.arange(len(cfg.structures)), torch.ones(len(cfg.structures)))
        wide.head.weight.data.copy_(weight(net.head.weight.data, heads, maps[0]))
        wide.head.bias.data.copy_(net.head.bias.data)
    wide.train(net.training)
    return wide
