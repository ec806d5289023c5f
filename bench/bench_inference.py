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

Small stacks flatter the fast path against the reference: for fp32 on the CPU, PyTorch
runs a Conv3d on its slow native kernel instead of oneDNN when batch x channels x depth
x height <= 20480 (a 2D heuristic applied to 5D input), e.g. every 8-channel layer of a
16x128x128 stack. The reference (fnet's way) takes that kernel; the fast fp32 path
forces oneDNN (`OneDnnConv3d`). At 32x256x256 most reference layers are past it.

With CUDA, the same three paths also run on the GPU (input already on the device, timed
to ``torch.cuda.synchronize``), against the GPU's own measured matmul peak.

    .venv/bin/python bench/bench_inference.py [--shape 32,256,256] [--repeats 3] [--json out.json]

`measure` returns the figures as plain dicts (``bench/run_all.py`` calls it too).
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
from livestain.inference.fast import FastNet, bf16_supported
from livestain.inference.model import UNet3D, UNetConfig


def matmul_peak(dtype: torch.dtype, n: int | tuple[int, ...] = (1024, 2048, 4096), repeats: int = 5,
                device: str = "cpu") -> float:
    """Best measured FLOP/s of an n x n matrix multiply in ``dtype`` on ``device``
    (the best over the sizes when ``n`` is several: no one size is fastest everywhere)."""
    if not isinstance(n, int):
        return max(matmul_peak(dtype, size, repeats, device) for size in n)
    a = torch.randn(n, n, device=device).to(dtype)
    b = torch.randn(n, n, device=device).to(dtype)
    sync = _synchronizer(device)
    torch.mm(a, b)
    sync()
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        torch.mm(a, b)
        sync()
        best = min(best, time.perf_counter() - t0)
    return 2 * n**3 / best


def measured_peaks(device: str = "cpu") -> dict[str, float]:
    """fp32 and bf16 matmul peaks of ``device`` (FLOP/s)."""
    sizes = (4096, 8192) if device.startswith("cuda") else (1024, 2048, 4096)
    repeats = 10 if device.startswith("cuda") else 5
    return {"fp32": matmul_peak(torch.float32, sizes, repeats, device),
            "bf16": matmul_peak(torch.bfloat16, sizes, repeats, device)}


def _synchronizer(device: str):  # noqa: ANN202
    """A function that waits for ``device`` to finish queued work (CUDA is asynchronous)."""
    if device.startswith("cuda"):
        return lambda: torch.cuda.synchronize(device)
    return lambda: None


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


def timed(fn, repeats: int, device: str = "cpu") -> float:
    """Median seconds of ``fn()`` over ``repeats`` calls, after one warm-up call."""
    sync = _synchronizer(device)
    fn()  # warm-up: oneDNN / cuDNN pick kernels on the first call
    sync()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def with_running_stats(net: UNet3D) -> UNet3D:
    """A randomly initialised network whose BatchNorm statistics are not trivial."""
    net.train()
    with torch.no_grad():
        net(torch.randn(2, 1, 16, 32, 32))
    return net.eval()


def bench_network(name: str, net: UNet3D, shape: tuple[int, int, int], repeats: int,
                  peaks: dict[str, float], device: str = "cpu") -> list[dict]:
    """Reference, fast fp32 and fast bf16 of ``net`` on one stack of ``shape``, on ``device``."""
    structures = len(net.config.structures)
    voxels = shape[0] * shape[1] * shape[2]
    single = with_running_stats(UNet3D(UNetConfig(structures=("one",), depth=net.config.depth,
                                                  base_channels=net.config.base_channels)))
    flops_all = conv_flops(net, shape)  # counted on the CPU: the count does not depend on the device
    flops_single = conv_flops(single, shape)
    single = single.to(device)
    x = torch.randn(1, 1, *shape).to(device)

    def reference() -> None:
        with torch.inference_mode():
            for _ in range(structures):
                single(x)

    fast32 = FastNet(net, device, bf16=False)
    fast16 = FastNet(net, device, bf16=True)
    paths = [
        ("reference", reference, flops_single * structures, peaks["fp32"]),
        ("fp32", lambda: fast32(x), flops_all, peaks["fp32"]),
        ("bf16", lambda: fast16(x), flops_all, peaks["bf16"]),
    ]
    if device.startswith("cuda") and not bf16_supported(device):
        paths.pop()  # a GPU older than Ampere: no bf16 arithmetic
    rows = []
    for path, fn, flops, peak in paths:
        s = timed(fn, repeats, device)
        rows.append({
            "network": name, "device": device, "path": path, "seconds": round(s, 4),
            "voxels_per_s": round(voxels / s), "gflop_per_s": round(flops / s / 1e9, 1),
            "fraction_of_peak": round(flops / s / peak, 3),
        })
    for r in rows:
        r["speedup_vs_reference"] = round(rows[0]["seconds"] / r["seconds"], 2)
    return rows


def _rescale(rows: list[dict], peaks: dict[str, float], after: dict[str, float]) -> None:
    """Keep the better of two peak measurements in ``peaks`` (in place) and refer the
    rows' ``fraction_of_peak`` to it."""
    for dtype in peaks:
        if after[dtype] > peaks[dtype]:
            for r in rows:
                if (r["path"] == "bf16") == (dtype == "bf16"):
                    r["fraction_of_peak"] = round(r["fraction_of_peak"] * peaks[dtype] / after[dtype], 3)
            peaks[dtype] = after[dtype]


def fnet_size_network() -> UNet3D:
    """fnet's size: depth 4, 32 base channels, three structures (23.3 M parameters)."""
    return with_running_stats(UNet3D(UNetConfig(depth=4, base_channels=32)))


def measure(shape: tuple[int, int, int] = (32, 256, 256), repeats: int = 3,
            fnet_repeats: int | None = None, cuda: bool | None = None,
            cuda_repeats: int = 10) -> dict:
    """Every row of the comparison, as plain dicts.

    Returns ``{"shape", "threads", "peaks": {"fp32", "bf16"} (CPU FLOP/s), "rows": [...]}``
    plus, when CUDA is used (``cuda`` None: when available), ``"cuda_device"`` and
    ``"cuda_peaks"``; each row names its ``device``. The fnet-size network is timed
    ``fnet_repeats`` times (default ``max(1, repeats - 1)``) on the CPU.
    """
    torch.manual_seed(0)
    shape = tuple(int(v) for v in shape)
    fnet_repeats = max(1, repeats - 1) if fnet_repeats is None else fnet_repeats
    # the peak is measured before and after the networks and the better one kept, so a
    # moment of load from elsewhere does not lower the yardstick
    peaks = measured_peaks()
    bundled = load_checkpoint(bundled_model_path(), "cpu").net
    fnet = fnet_size_network()
    rows = bench_network("bundled", bundled, shape, repeats, peaks)
    rows += bench_network("fnet-size", fnet, shape, fnet_repeats, peaks)
    after = measured_peaks()
    _rescale(rows, peaks, after)
    result: dict = {"shape": list(shape), "threads": torch.get_num_threads(), "peaks": peaks, "rows": rows}
    if cuda is None:
        cuda = torch.cuda.is_available()
    if cuda:
        device = "cuda"
        cuda_peaks = measured_peaks(device)
        result["cuda_device"] = torch.cuda.get_device_name(device)
        result["cuda_peaks"] = cuda_peaks
        # torch lets cuDNN run "fp32" convolutions in TF32 by default, while its fp32
        # matmul (the peak) is true fp32 by default: "fp32" fractions over 1 mean TF32
        result["cuda_tf32"] = {"matmul": torch.backends.cuda.matmul.allow_tf32,
                               "cudnn_conv": torch.backends.cudnn.allow_tf32}
        result["rows"] += bench_network("bundled", bundled, shape, cuda_repeats, cuda_peaks, device)
        result["rows"] += bench_network("fnet-size", fnet, shape, cuda_repeats, cuda_peaks, device)
        torch.cuda.empty_cache()
    return result


def print_table(result: dict) -> None:
    """The rows of `measure` as a table (one block per device)."""
    peaks = result["peaks"]
    print(f"torch {torch.__version__}, {result['threads']} threads; measured matmul peak: "
          f"fp32 {peaks['fp32'] / 1e9:.0f} GFLOP/s, bf16 {peaks['bf16'] / 1e9:.0f} GFLOP/s")
    if "cuda_peaks" in result:
        cp = result["cuda_peaks"]
        print(f"GPU {result['cuda_device']}: measured matmul peak fp32 {cp['fp32'] / 1e12:.1f} TFLOP/s, "
              f"bf16 {cp['bf16'] / 1e12:.1f} TFLOP/s")
    print(f"stack {'x'.join(map(str, result['shape']))}, 3 structures")
    devices = list(dict.fromkeys(r.get("device", "cpu") for r in result["rows"]))
    dev_col = len(devices) > 1
    print(f"{'device':<7}" * dev_col + f"{'network':<10}{'path':<11}{'s/stack':>9}{'Mvox/s':>9}"
          f"{'GFLOP/s':>9}{'of peak':>9}{'speed-up':>10}")
    for r in result["rows"]:
        print(f"{r.get('device', 'cpu'):<7}" * dev_col +
              f"{r['network']:<10}{r['path']:<11}{r['seconds']:>9.3f}{r['voxels_per_s'] / 1e6:>9.2f}"
              f"{r['gflop_per_s']:>9.1f}{r['fraction_of_peak']:>9.3f}{r['speedup_vs_reference']:>9.2f}x")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shape", default="32,256,256")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args()
    shape = tuple(int(v) for v in args.shape.split(","))
    result = measure(shape, args.repeats)
    print_table(result)
    if args.json:
        args.json.write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
