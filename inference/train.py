"""Training a `UNet3D` from paired (brightfield, structures) stacks.

fnet's recipe: z-scored targets, random 3D patches, MSE, Adam. Patches are drawn with a
bias towards foreground (cells fill a fraction of a field; sampling empty background
teaches the network little), with random flips and 90-degree rotations in the image
plane. Validation Pearson r per structure on held-out fields is logged as it trains.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np
import torch

from .model import UNet3D, UNetConfig
from .normalize import PercentileNorm, zscore


@dataclass
class TrainSettings:
    """Hyper-parameters of one training run (recorded in the checkpoint).

    Attributes
    ----------
    steps : int
        Optimiser steps.
    patch : tuple[int, int, int]
        (z, y, x) patch size.
    batch : int
        Patches per step.
    lr : float
        Adam learning rate.
    foreground_fraction : float
        Share of patches centred on a voxel with above-median target signal.
    seed : int
        Seeds patch sampling, augmentation and initial weights.
    """

    steps: int = 600
    patch: tuple[int, int, int] = (16, 64, 64)
    batch: int = 4
    lr: float = 2e-3
    foreground_fraction: float = 0.7
    seed: int = 0


@dataclass
class TrainResult:
    net: UNet3D
    history: list[dict] = field(default_factory=list)
    seconds: float = 0.0


def pearson(a: np.ndarray, b: np.ndarray) -> float:
    """Pearson correlation of two arrays (0 when either is constant)."""
    a = np.asarray(a, np.float64).ravel()
    b = np.asarray(b, np.float64).ravel()
    a = a - a.mean()
    b = b - b.mean()
    denom = np.sqrt((a * a).sum() * (b * b).sum())
    return float((a * b).sum() / denom) if denom > 0 else 0.0


def _prepare(
    pairs: Sequence[tuple[np.ndarray, np.ndarray]], norm: PercentileNorm
) -> list[tuple[np.ndarray, np.ndarray]]:
    return [(norm(bf), np.stack([zscore(t) for t in tg])) for bf, tg in pairs]


def evaluate(
    net: UNet3D, pairs: Sequence[tuple[np.ndarray, np.ndarray]], norm: PercentileNorm
) -> list[float]:
    """Mean Pearson r per structure of whole-field predictions against the targets."""
    net.eval()
    rs: list[list[float]] = []
    with torch.inference_mode():
        for x, y in _prepare(pairs, norm):
            out = net(torch.from_numpy(x)[None, None])[0].numpy()
            rs.append([pearson(out[i], y[i]) for i in range(y.shape[0])])
    net.train()
    return list(np.mean(rs, axis=0))


def train(
    train_pairs: Sequence[tuple[np.ndarray, np.ndarray]],
    val_pairs: Sequence[tuple[np.ndarray, np.ndarray]],
    config: UNetConfig,
    settings: TrainSettings | None = None,
    norm: PercentileNorm | None = None,
    on_step: Callable[[int, float], None] | None = None,
    val_every: int = 100,
) -> TrainResult:
    """Fit a fresh network; ``pairs`` are ``(brightfield (z,y,x), targets (s,z,y,x))``."""
    s = settings or TrainSettings()
    norm = norm or PercentileNorm()
    torch.manual_seed(s.seed)
    rng = np.random.default_rng(s.seed)
    data = _prepare(train_pairs, norm)
    fg_index = [np.argwhere(y.max(axis=0) > np.median(y.max(axis=0)) + 0.5) for _, y in data]
    net = UNet3D(config)
    net.train()
    opt = torch.optim.Adam(net.parameters(), lr=s.lr)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=s.steps, eta_min=s.lr * 0.05)
    result = TrainResult(net=net)
    t0 = time.perf_counter()
    pz, py, px = s.patch
    for step in range(1, s.steps + 1):
        xs, ys = [], []
        for _ in range(s.batch):
            i = int(rng.integers(len(data)))
            x, y = data[i]
            nz, ny, nx = x.shape
            if rng.random() < s.foreground_fraction and len(fg_index[i]):
                cz, cy, cx = fg_index[i][rng.integers(len(fg_index[i]))]
            else:
                cz, cy, cx = rng.integers(nz), rng.integers(ny), rng.integers(nx)
            z0 = int(np.clip(cz - pz // 2, 0, max(nz - pz, 0)))
            y0 = int(np.clip(cy - py // 2, 0, ny - py))
            x0 = int(np.clip(cx - px // 2, 0, nx - px))
            xp = x[z0 : z0 + pz, y0 : y0 + py, x0 : x0 + px]
            yp = y[:, z0 : z0 + pz, y0 : y0 + py, x0 : x0 + px]
            k = int(rng.integers(4))
            xp, yp = np.rot90(xp, k, axes=(-2, -1)), np.rot90(yp, k, axes=(-2, -1))
            if rng.random() < 0.5:
                xp, yp = xp[..., ::-1], yp[..., ::-1]
            xs.append(np.ascontiguousarray(xp)[None])
            ys.append(np.ascontiguousarray(yp))
        xb = torch.from_numpy(np.stack(xs))
        yb = torch.from_numpy(np.stack(ys))
        loss = torch.nn.functional.mse_loss(net(xb), yb)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        if on_step is not None:
            on_step(step, float(loss.detach()))
        if val_pairs and (step % val_every == 0 or step == s.steps):
            r = evaluate(net, val_pairs, norm)
            result.history.append(
                {"step": step, "loss": float(loss.detach()), "val_pearson": dict(zip(config.structures, map(float, r)))}
            )
    net.eval()
    result.seconds = time.perf_counter() - t0
    return result
