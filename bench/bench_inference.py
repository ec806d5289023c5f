"""Inference speed, measured side by side in one run: fnet-style reference vs livestain.

For each network (the bundled model and an fnet-size network: depth 4, 32 base
channels, 23.3 M parameters) and one stack (default 32x256x256, 3 structures):

* ``reference``: fnet's way: fp32, eager, NCDHW, BatchNorm unfused, one pass per
  structure (a one-output network per structure);
* ``fp32``: livestain's fast path in fp32: BatchNorm folded, channels_last_3d, all
  structures in one pass;
* ``bf16``: the same with bf16 autocast.

Reports seconds per stack, voxels per second, achieved FLOP/s (convolution
multiply-adds counted with hooks, x2) and that as a fraction of this machine's measured
matrix-multiply peak of the same dtype, plus the speed-up over the reference.

    .venv/bin/python bench/bench_inference.py [--shape 32,256,256] [--repeats 3] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch
from torch import nn

from livestain.inference.checkpoint import bundled_model_path, load_checkpoint
from livestain.inference.fast import FastNet
from livestain.inference.model import UNet3D, UNetConfig


def matmul_peak(dtype: torch.dtype, n: int = 2048, repeats: int = 5) -> float:
    """Best measured FLOP/s of an n x n matrix multiply in ``dtype``."""
    a = torch.randn(n, n).to(dtype)
    b = torch.randn(n, n).to(dtype)
    torch.mm(a, b)
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        torch.mm(a, b)
        best = min(best, time.perf_counter() - t0)
    return 2 * n**3 / best


def conv_flops(net: nn.Module, shape: tuple[int, ...]) -> float:
    """FLOPs (2 x multiply-adds) of all convolutions for one input of ``shape``."""
    total = 0.0

    def hook(module: nn.Module, inputs: tuple, output: torch.Tensor) -> None:
        nonlocal total
        k = 1
        for s in module.kernel_size:
            k *= s
        if isinstance(module, nn.ConvTranspose3d):
            total += 2.0 * inputs[0].numel() * module.out_channels * k / module.groups
        else:
            total += 2.0 * output.numel() * module.in_channels * k / module.groups

    handles = [m.register_forward_hook(hook) for m in net.modules()
               if isinstance(m, (nn.Conv3d, nn.ConvTranspose3d))]
    with torch.inference_mode():
        net.eval()(torch.zeros(1, 1, *shape))
    for h in handles:
        h.remove()
    return total


def timed(fn, repeats: int) -> float:
    fn()  # warm-up: oneDNN picks kernels on the first call
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def with_running_stats(net: UNet3D) -> UNet3D:
    """A randomly initialised network whose BatchNorm statistics are not trivial."""
    net.train()
    with torch.no_grad():
        net(torch.randn(2, 1, 16, 32, 32))
    return net.eval()


def bench_network(name: str, net: UNet3D, shape: tuple[int, int, int], repeats: int,
                  peaks: dict[str, float]) -> list[dict]:
    structures = len(net.config.structures)
    x = torch.randn(1, 1, *shape)
    voxels = shape[0] * shape[1] * shape[2]
    single = with_running_stats(UNet3D(UNetConfig(structures=("one",), depth=net.config.depth,
                                                  base_channels=net.config.base_channels)))
    flops_all = conv_flops(net, shape)
    flops_single = conv_flops(single, shape)

    def reference() -> None:
        with torch.inference_mode():
            for _ in range(structures):
                single(x)

    fast32 = FastNet(net, "cpu", bf16=False)
    fast16 = FastNet(net, "cpu", bf16=True)
    rows = []
    for path, fn, flops, peak in (
        ("reference", reference, flops_single * structures, peaks["fp32"]),
        ("fp32", lambda: fast32(x), flops_all, peaks["fp32"]),
        ("bf16", lambda: fast16(x), flops_all, peaks["bf16"]),
    ):
        s = timed(fn, repeats)
        rows.append({
            "network": name, "path": path, "seconds": round(s, 3),
            "voxels_per_s": round(voxels / s), "gflop_per_s": round(flops / s / 1e9, 1),
            "fraction_of_peak": round(flops / s / peak, 3),
        })
    for r in rows:
        r["speedup_vs_reference"] = round(rows[0]["seconds"] / r["seconds"], 2)
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shape", default="32,256,256")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args()
    shape = tuple(int(v) for v in args.shape.split(","))
    torch.manual_seed(0)
    peaks = {"fp32": matmul_peak(torch.float32), "bf16": matmul_peak(torch.bfloat16)}
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; measured matmul peak: "
          f"fp32 {peaks['fp32'] / 1e9:.0f} GFLOP/s, bf16 {peaks['bf16'] / 1e9:.0f} GFLOP/s")
    bundled = load_checkpoint(bundled_model_path()).net
    fnet = with_running_stats(UNet3D(UNetConfig(depth=4, base_channels=32)))
    rows = bench_network("bundled", bundled, shape, args.repeats, peaks)
    rows += bench_network("fnet-size", fnet, shape, max(1, args.repeats - 1), peaks)
    print(f"stack {'x'.join(map(str, shape))}, 3 structures")
    print(f"{'network':<10}{'path':<11}{'s/stack':>9}{'Mvox/s':>9}{'GFLOP/s':>9}{'of peak':>9}{'speed-up':>10}")
    for r in rows:
        print(f"{r['network']:<10}{r['path']:<11}{r['seconds']:>9.3f}{r['voxels_per_s'] / 1e6:>9.2f}"
              f"{r['gflop_per_s']:>9.1f}{r['fraction_of_peak']:>9.3f}{r['speedup_vs_reference']:>9.2f}x")
    if args.json:
        args.json.write_text(json.dumps({"peaks": peaks, "shape": shape, "rows": rows}, indent=2))


if __name__ == "__main__":
    main()
