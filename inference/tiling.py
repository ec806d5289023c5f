"""Whole-volume prediction in overlapping tiles, blended so no seam shows.

A 3D U-Net's activations grow with the volume: a large stack (say 64x2048x2048) does
not fit in GPU (or even host) memory in one pass. Cutting it into tiles does, but each
tile's border sees zero padding instead of its real neighbourhood, so naive tiling
leaves visible seams. Here tiles overlap (by default twice the network's receptive
radius) and each tile's prediction is weighted by a separable window that ignores the
outer 3/8 of the overlap and cross-fades (sin^2/cos^2) across the middle; weighted
predictions and weights are accumulated and divided. With the bundled model the
result differs from a one-pass prediction by ~1e-4 of the output's standard deviation. Tile starts
and sizes are multiples of ``2**depth`` so every tile sees the same stride-2 grid as a
whole-volume pass would (the network is only shift-equivariant by those multiples),
and the volume is first padded exactly as the network pads a whole volume.

The default tile comes from a simple estimate of activation memory per voxel and the
free memory of the device, at most `CPU_TILE_BYTES` on the CPU (a larger tile is barely
faster there, and a plane of 4096x4096 pixels took 10 GB in one 2x2 tiling of nearly
whole-plane tiles), shrunk so tiles split the volume evenly (`balanced_tile`); on the
CPU tiles run on oneDNN's convolutions (`fast.onednn_convolutions`: PyTorch's own choice
is several times slower on tile-sized inputs);
an out-of-memory error halves the tile and starts again. The blend is accumulated
only over the volume itself, not the padding the network needs, and a callback can
report each finished tile (``livestain predict`` prints progress with it).
Optional test-time augmentation averages the predictions of the y/x-flipped inputs.

Everything works on 3D volumes ``(1, C, Z, Y, X)`` and, for 2.5D networks, on 2D
images ``(1, C, Y, X)`` alike: tiles, overlaps and windows then have two axes.
"""

from __future__ import annotations

import contextlib
import itertools
import logging
import math
import os
from collections.abc import Callable, Sequence

import numpy as np
import torch
from torch import nn

from .fast import onednn_convolutions
from .model import pad_to_multiple

#: Bytes of activations per input voxel per channel-at-full-resolution: float32 (4) times
#: the tensors alive at once (conv input and output, BatchNorm output, skip copy, concat).
#: Checked on the CPU: depth 2, 8 base channels, 16x384x384 in one pass peaked at 628 MB
#: more resident memory; this estimate says 793 MB.
ACTIVATION_FACTOR = 4 * 8
#: Share of the free memory a default tile may use (the rest: weights, workspace, others).
MEMORY_FRACTION = 0.5
#: Free memory assumed when the platform cannot tell (CPU without sysconf).
FALLBACK_FREE_BYTES = 2 * 1024**3
#: Most estimated activation bytes of a default tile on the CPU, whatever memory is free.
#: Without it a 1x4096x4096 plane on a 23 GB machine peaked at 10.3 GB resident (and
#: took 378 s, half of it recomputing the overlap of two nearly whole-plane tiles per
#: axis). With oneDNN's convolutions (which tiles use on the CPU) the time per voxel is
#: flat from 4x640x640 to 4x2048x2048 tiles (bundled model, 1230-1380 CPU-ns), so
#: smaller tiles cost only their overlap: at 2 GiB, 7% more voxels for a 4096x4096 plane.
CPU_TILE_BYTES = 2 * 1024**3

Tile = tuple[int, int, int]
log = logging.getLogger(__name__)


def is_out_of_memory(e: BaseException) -> bool:
    """True for CUDA/CPU allocation failures (torch raises several types for them)."""
    oom_types = tuple(
        t for t in (getattr(torch, "OutOfMemoryError", None), getattr(torch.cuda, "OutOfMemoryError", None)) if t
    )
    if oom_types and isinstance(e, oom_types):
        return True
    text = str(e).lower()
    return isinstance(e, RuntimeError) and ("out of memory" in text or "can't allocate memory" in text)


def _config(net: nn.Module) -> tuple[int, int]:
    """(depth, base_channels) of a `UNet3D`-like net (defaults for anything else)."""
    cfg = getattr(net, "config", None)
    return int(getattr(cfg, "depth", 2)), int(getattr(cfg, "base_channels", 8))


def spatial_dims(net: nn.Module) -> int:
    """3 for a 3D network, 2 for a 2.5D one (its convolutions are 2D)."""
    return int(getattr(getattr(net, "config", None), "spatial_dims", 3))


def multiple_of(net: nn.Module) -> int:
    """Spatial multiple the network down-samples by: tiles align to it."""
    return int(getattr(net, "multiple", 2 ** _config(net)[0]))


def bytes_per_voxel(net: nn.Module) -> float:
    """Estimated activation bytes per input voxel: widths summed over levels.

    Level ``i`` has ``base * 2**i`` channels on ``1 / 8**i`` of the voxels (``1 / 4**i``
    of the pixels for a 2D network); encoder and decoder both keep it, hence the sum
    over levels times a constant factor.
    """
    depth, base = _config(net)
    shrink = 2 ** spatial_dims(net)
    channels = sum(base * 2**i / shrink**i for i in range(depth + 1))
    return channels * ACTIVATION_FACTOR


def free_memory_bytes(device: str | torch.device) -> int:
    """Free memory of ``device``: CUDA's own count, else the host's available pages."""
    dev = torch.device(device)
    if dev.type == "cuda":
        free, _total = torch.cuda.mem_get_info(dev)
        return int(free)
    try:
        return int(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_AVPHYS_PAGES"))
    except (ValueError, OSError, AttributeError):  # not on every platform (e.g. Windows, macOS)
        return FALLBACK_FREE_BYTES


def receptive_radius(net: nn.Module) -> int:
    """Voxels of context a U-Net output voxel depends on, per side (an overestimate).

    Per level ``i``: two 3-convs in the encoder and two in the decoder at scale ``2**i``
    (1 voxel each at that scale) plus the stride-2 down-convolution; at the bottom two
    3-convs at scale ``2**depth``. Checked against the gradient support of real nets:
    9, 23 and 50 voxels for depth 1, 2 and 3 (this gives 9, 23, 51).
    """
    depth, _ = _config(net)
    return sum(5 * 2**i for i in range(depth)) + 2 * 2**depth


def default_overlap(net: nn.Module) -> int:
    """Overlap between neighbouring tiles: twice the receptive radius (rounded up to the multiple).

    Then, with the outer 3/8 of the overlap unweighted on each side, almost every voxel
    that counts comes from a tile whose padding it cannot see. Measured with the
    bundled model (depth 2, radius 23) on a 16x256x256 simulated stack in 128-voxel
    tiles: overlap 48 differs from the one-pass prediction by at most 1.3e-4 of the
    output's standard deviation, overlap 32 by up to 0.07, 24 by up to 0.17 (at a few
    voxels near tile edges). Clipped to half a tile.
    """
    m = multiple_of(net)
    return _round_up(2 * receptive_radius(net), m)


def min_tile(net: nn.Module, overlap: int | None = None) -> int:
    """Smallest tile side worth using: twice the overlap, so the overlap is never clipped.

    Smaller tiles lose context at every edge; along z that is catastrophic for thin
    stacks (measured: the bundled model in 8-plane z tiles of a 16-plane stack falls
    from Pearson r 0.98 to 0.19 for DNA), so out-of-memory halving stops here.
    """
    m = multiple_of(net)
    return _round_up(2 * (default_overlap(net) if overlap is None else overlap), m)


def default_tile(
    net: nn.Module,
    shape: Sequence[int],
    device: str | torch.device = "cpu",
    free_bytes: int | None = None,
) -> Tile:
    """Largest tile for ``shape`` (z, y, x) that the memory estimate allows.

    Keeps the whole z range unless even a `min_tile` square in y/x would not fit (stacks
    are thin and z context matters most), then a square in y/x; every size is a
    multiple of the network's down-sampling factor, at least `min_tile` (or the volume)
    and no larger than the (padded) volume. A 2-axis ``shape`` (y, x) (2.5D networks)
    gets the largest such square.
    """
    m = multiple_of(net)
    free = free_memory_bytes(device) if free_bytes is None else free_bytes
    budget = max(free * MEMORY_FRACTION / bytes_per_voxel(net), float(m ** len(shape)))
    padded = [_round_up(int(n), m) for n in shape]
    floor = [min(n, min_tile(net)) for n in padded]
    if len(shape) == 2:
        side = _round_down(int(math.sqrt(budget)), m)
        return (min(padded[0], max(floor[0], side)), min(padded[1], max(floor[1], side)))  # type: ignore[return-value]
    z = min(padded[0], max(floor[0], _round_down(int(budget / (floor[1] * floor[2])), m)))
    side = _round_down(int(math.sqrt(budget / z)), m)
    return (z, min(padded[1], max(floor[1], side)), min(padded[2], max(floor[2], side)))


def balanced_tile(
    net: nn.Module, shape: Sequence[int], tile: Sequence[int], overlap: Sequence[int] | int | None = None
) -> tuple[int, ...]:
    """``tile`` shrunk, per axis, to the smallest size that needs no more tiles.

    The largest tile that fits often leaves a thin last tile that mostly repeats its
    neighbour (a 2928-pixel tile covers 4096 pixels in two tiles that overlap by 1760):
    evenly split tiles cost the same number of passes and less compute and memory.
    Never below `min_tile` (the context the prediction depends on) nor above ``tile``.
    """
    m = multiple_of(net)
    nd = len(shape)
    ov = default_overlap(net) if overlap is None else overlap
    ovs = (ov,) * nd if isinstance(ov, int) else tuple(int(o) for o in ov)
    out = []
    for n, t, o in zip(shape, tile, ovs):
        padded, t, o = _round_up(int(n), m), int(t), int(o)
        count = _tile_count(padded, t, o, m)
        floor = min(min_tile(net, o), padded)
        guess = _round_up(-(-(padded - min(o, t // 2)) // count) + min(o, t // 2), m)
        best = t
        for cand in range(max(floor, guess, m), t, m):
            if _tile_count(padded, cand, o, m) <= count:
                best = cand
                break
        out.append(best)
    return tuple(out)


def _tile_count(padded: int, tile: int, overlap: int, m: int) -> int:
    """Tiles along one axis, with the overlap clipped to half a tile as `predict_tiled` does."""
    return len(tile_starts(padded, tile, max(0, min(overlap, tile // 2)), m))


def _round_up(n: int, m: int) -> int:
    return -(-n // m) * m


def _round_down(n: int, m: int) -> int:
    return max(m, n // m * m)


def tile_starts(size: int, tile: int, overlap: int, multiple: int) -> list[int]:
    """Start offsets along one axis: aligned to ``multiple``, the last one flush with the end."""
    if tile >= size:
        return [0]
    overlap = min(overlap, tile // 2)  # as `predict_tiled` clips it
    step = max(multiple, _round_down(tile - overlap, multiple))
    starts = list(range(0, size - tile, step))
    starts.append(size - tile)
    return starts


def _window(length: int, overlap_lo: int, overlap_hi: int) -> torch.Tensor:
    """1-D weight of a tile along one axis: a cross-fade on each side shared with a neighbour.

    On such a side the outer 3/8 of the overlap gets weight 0 (those voxels saw the
    tile's zero padding, not the real neighbourhood), the middle quarter rises as
    ``sin^2`` and the rest is 1; the neighbour's mirror image falls as ``cos^2`` over the
    same voxels, so at the nominal overlap the two weights sum to exactly 1 and every
    voxel is covered by some tile's interior. (Measured: a margin of 1/4 instead of 3/8
    leaves 25x larger differences to the one-pass prediction at the default overlap.)
    """
    w = torch.ones(length, dtype=torch.float32)
    for o, flip in ((overlap_lo, False), (overlap_hi, True)):
        if o <= 0:
            continue
        margin = (3 * o) // 8
        n = o - 2 * margin
        r = torch.ones(o, dtype=torch.float32)
        r[:margin] = 0.0
        r[margin : margin + n] = torch.sin(0.5 * math.pi * (torch.arange(n, dtype=torch.float32) + 0.5) / n) ** 2
        if flip:
            w[length - o :] = torch.minimum(w[length - o :], r.flip(0))
        else:
            w[:o] = torch.minimum(w[:o], r)
    return w


def _pad_like_net(x: torch.Tensor, m: int) -> torch.Tensor:
    """Pad to a multiple of ``m`` exactly as `UNet3D.forward` pads a whole volume."""
    return pad_to_multiple(x, m)


def _forward(net: nn.Module, x: torch.Tensor, tta: bool) -> torch.Tensor:
    """Network output for one tile, averaged over the four y/x flips when ``tta``."""
    if not tta:
        return net(x)
    out = None
    for dims in ((), (-1,), (-2,), (-2, -1)):
        xi = x.flip(dims) if dims else x
        yi = net(xi)
        yi = yi.flip(dims) if dims else yi
        out = yi if out is None else out + yi
    return out / 4.0


def predict_tiled(
    net: nn.Module,
    x: torch.Tensor,
    tile: Sequence[int],
    overlap: Sequence[int] | int | None = None,
    tta: bool = False,
    device: str | torch.device | None = None,
    on_tile: Callable[[int, int], None] | None = None,
) -> torch.Tensor:
    """Prediction of ``net`` for ``x`` (1, C, Z, Y, X) in blended tiles of ``tile`` (z, y, x).

    Tiles run on ``device`` (default: ``x``'s); the blend is accumulated on the CPU so
    the device only ever holds one tile. Returns (1, S, Z, Y, X) on ``x``'s device.
    ``tile`` is rounded up to the network's multiple; ``overlap`` defaults to the
    network's `default_overlap`, at most half a tile. For a 2.5D network ``x`` is
    (1, C, Y, X), ``tile`` and ``overlap`` have two axes, and the result is (1, S, Y, X).
    ``on_tile(done, total)`` is called after each tile.

    The accumulators cover the volume, not its padding (a single plane is padded to
    four for a depth-2 network: four times the memory for nothing kept).
    """
    if x.ndim not in (4, 5) or x.shape[0] != 1:
        raise ValueError(f"expected a (1, C, Z, Y, X) or (1, C, Y, X) tensor, got shape {tuple(x.shape)}")
    nd = x.ndim - 2
    if len(tile) != nd:
        raise ValueError(f"tile {tuple(tile)} needs {nd} sizes for a {nd}-axis input")
    device = torch.device(device) if device is not None else x.device
    m = multiple_of(net)
    size = tuple(x.shape[2:])
    xp = _pad_like_net(x, m).cpu()
    padded = tuple(xp.shape[2:])
    t = tuple(min(_round_up(max(1, int(v)), m), n) for v, n in zip(tile, padded))
    if overlap is None:
        overlap = default_overlap(net)
    ov = (overlap,) * nd if isinstance(overlap, int) else tuple(int(o) for o in overlap)
    if any(o > ti // 2 and ti < n for o, ti, n in zip(ov, t, padded)):
        log.warning(
            "tile %s is less than twice the overlap %s: voxels near tile edges lose context "
            "and may differ from a one-pass prediction; use a larger tile if memory allows", t, ov
        )
    ov = tuple(max(0, min(o, ti // 2)) for o, ti in zip(ov, t))
    starts = [tile_starts(n, ti, o, m) for n, ti, o in zip(padded, t, ov)]
    total = math.prod(len(s) for s in starts)
    out: torch.Tensor | None = None
    weight = torch.zeros(size, dtype=torch.float32)
    # on the CPU, tiles take oneDNN's convolutions: PyTorch's own choice puts most layers
    # of a tile on its slow reference kernel (see `fast.onednn_convolutions`)
    kernels = onednn_convolutions(net) if device.type == "cpu" else contextlib.nullcontext(net)
    with kernels:
        for done, lo in enumerate(itertools.product(*starts), start=1):
            sl = tuple(slice(a, a + ti) for a, ti in zip(lo, t))
            with torch.inference_mode():
                pred = _forward(net, xp[(..., *sl)].to(device), tta)[0].float().cpu()
            if out is None:
                out = torch.zeros((pred.shape[0], *size), dtype=torch.float32)
            ws = [
                _window(ti, o if a > 0 else 0, o if a + ti < n else 0)
                for a, ti, o, n in zip(lo, t, ov, padded)
            ]
            # the part of the tile inside the volume (tiles end in the padding at the far edges)
            keep = tuple(slice(0, min(a + ti, s) - a) for a, ti, s in zip(lo, t, size))
            ws = [wi[k] for wi, k in zip(ws, keep)]
            w = ws[0]
            for wi in ws[1:]:
                w = w[..., None] * wi  # outer product over the axes
            inside = tuple(slice(a, a + k.stop) for a, k in zip(lo, keep))
            out[(slice(None), *inside)] += pred[(slice(None), *keep)] * w
            weight[inside] += w
            if on_tile is not None:
                on_tile(done, total)
    assert out is not None
    out /= weight
    return out[None].to(x.device)


def halve(tile: Sequence[int], multiple: int, floor: Sequence[int] | None = None) -> Tile | None:
    """Next smaller tile after an out-of-memory error, or None when it is at ``floor``.

    Halves y and x first (where tiles are largest); z only once y/x are at the floor.
    ``floor`` (z, y, x) defaults to ``multiple`` on every axis. A 2-axis tile (y, x)
    halves both.
    """
    if len(tile) == 2:
        smaller = halve((1, *tile), multiple, None if floor is None else (1, *floor))
        return None if smaller is None or smaller[0] != 1 else smaller[1:]  # type: ignore[return-value]
    z, y, x = (int(v) for v in tile)
    fz, fy, fx = (int(f) for f in floor) if floor is not None else (multiple,) * 3
    if y > fy or x > fx:
        return (z, max(min(y, fy), _round_down(y // 2, multiple)), max(min(x, fx), _round_down(x // 2, multiple)))
    if z > fz:
        return (max(fz, _round_down(z // 2, multiple)), y, x)
    return None


def predict_volume(
    net: nn.Module,
    x: torch.Tensor,
    tile: Sequence[int] | None = None,
    overlap: Sequence[int] | int | None = None,
    tta: bool = False,
    device: str | torch.device | None = None,
    on_tile: Callable[[int, int], None] | None = None,
) -> torch.Tensor:
    """Prediction for a whole (1, C, Z, Y, X) volume (2.5D: (1, C, Y, X) image), tiled
    only when it must be.

    Without ``tile`` the tile is `default_tile` for the device (on the CPU for at most
    `CPU_TILE_BYTES` of activations), evened out by `balanced_tile`; a volume that fits
    in it is predicted in one pass (bit-identical to ``net(x)``). Out of memory halves
    the tile and starts again, down to `min_tile` (smaller tiles would lose the context
    the prediction depends on), then raises a RuntimeError saying what to do. Other
    errors pass through untouched. ``on_tile(done, total)`` is called after each tile of
    a tiled prediction (not for a one-pass one).
    """
    device = torch.device(device) if device is not None else x.device
    m = multiple_of(net)
    size = tuple(x.shape[2:])
    if tile is not None:
        current = tuple(int(v) for v in tile)
    else:
        current = default_tile(net, size, device, free_bytes=tile_memory_bytes(device))
        current = balanced_tile(net, size, current, overlap)
    while True:
        try:
            if all(_round_up(n, m) <= t for n, t in zip(size, current)):
                with torch.inference_mode():
                    return _forward(net, x.to(device), tta).to(x.device)
            return predict_tiled(net, x, current, overlap, tta, device, on_tile=on_tile)
        except (RuntimeError, MemoryError) as e:
            if not (isinstance(e, MemoryError) or is_out_of_memory(e)):
                raise
            padded = [_round_up(n, m) for n in size]
            ov = default_overlap(net) if overlap is None else max(np.atleast_1d(overlap))
            floor = [min(n, min_tile(net, int(ov))) for n in padded]
            smaller = halve([min(t, n) for t, n in zip(current, padded)], m, floor)
            if smaller is None:
                raise RuntimeError(
                    f"out of memory even in tiles of {tuple(current)} voxels ({e}); free memory "
                    "on the device (close other jobs), predict on the CPU, or pass a smaller "
                    "tile explicitly and accept edge effects"
                ) from e
            log.warning("out of memory in tiles of %s; retrying with %s", tuple(current), smaller)
            if device.type == "cuda":
                torch.cuda.empty_cache()
            current = smaller


def tile_memory_bytes(device: str | torch.device) -> int:
    """Memory a default tile may plan with: the device's free memory, on the CPU no more
    than `CPU_TILE_BYTES` of activations' worth (see there)."""
    free = free_memory_bytes(device)
    if torch.device(device).type == "cpu":
        free = min(free, int(CPU_TILE_BYTES / MEMORY_FRACTION))
    return free
