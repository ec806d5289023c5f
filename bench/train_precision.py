"""One training step in fp32 vs bf16 autocast, side by side, on this machine.

``livestain train --precision auto`` (`livestain.inference.train.resolve_precision`) uses
bf16 (or fp16) autocast on CUDA and, on a CPU, bf16 only where it has native bf16
arithmetic (AVX512-BF16/AMX), which this measurement found 1.7-2.4x faster than fp32 on
the development machine (AMD EPYC, AVX512-BF16). Rerun it on a new CPU to check:

    .venv/bin/python bench/train_precision.py [--depth 2] [--base 8] [--patch 16,64,64]
        [--batch 4] [--steps 6] [--threads N] [--device cpu|cuda]

Steps alternate between the two precisions (after one warm-up step each) so that load
from other processes affects both alike; the median step time of each is reported.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch

from livestain.inference.model import UNet3D, UNetConfig


def step_time(net: UNet3D, opt: torch.optim.Optimizer, xb: torch.Tensor, yb: torch.Tensor,
              dtype: torch.dtype | None, device: str) -> float:
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    with torch.autocast(device.split(":")[0], dtype=dtype, enabled=dtype is not None):
        out = net(xb)
    loss = torch.nn.functional.mse_loss(out.float(), yb)
    opt.zero_grad(set_to_none=True)
    loss.backward()
    opt.step()
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    return time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--depth", type=int, default=2)
    ap.add_argument("--base", type=int, default=8)
    ap.add_argument("--patch", default="16,64,64", help="Z,Y,X (2.5d: Z is the window)")
    ap.add_argument("--mode", default="3d", choices=("3d", "2.5d"))
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--steps", type=int, default=6)
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--json", action="store_true")
    a = ap.parse_args()
    if a.threads:
        torch.set_num_threads(a.threads)
    patch = tuple(int(v) for v in a.patch.split(","))
    torch.manual_seed(0)
    if a.mode == "3d":
        cfg = UNetConfig(depth=a.depth, base_channels=a.base)
        in_shape, out_shape = (a.batch, 1, *patch), (a.batch, 3, *patch)
    else:
        cfg = UNetConfig(depth=a.depth, base_channels=a.base, mode="2.5d", z_window=patch[0])
        in_shape, out_shape = (a.batch, *patch), (a.batch, 3, *patch[1:])
    nets = {name: UNet3D(cfg).to(a.device).train() for name in ("fp32", "bf16")}
    opts = {name: torch.optim.Adam(n.parameters(), lr=1e-3) for name, n in nets.items()}
    dtypes = {"fp32": None, "bf16": torch.bfloat16}
    xb = torch.randn(*in_shape, device=a.device)
    yb = torch.randn(*out_shape, device=a.device)
    times: dict[str, list[float]] = {"fp32": [], "bf16": []}
    for i in range(a.steps + 1):
        for name in ("fp32", "bf16"):
            t = step_time(nets[name], opts[name], xb, yb, dtypes[name], a.device)
            if i:  # first step of each: warm-up
                times[name].append(t)
    med = {k: statistics.median(v) for k, v in times.items()}
    report = {
        "device": a.device, "threads": torch.get_num_threads(), "torch": torch.__version__,
        "network": {"mode": a.mode, "depth": a.depth, "base_channels": a.base}, "batch": a.batch, "patch": list(patch),
        "median_step_s": med, "steps_s": times, "faster": min(med, key=med.get),
    }
    if a.json:
        print(json.dumps(report, indent=2))
    else:
        print(f"{a.device}, {report['threads']} threads, torch {torch.__version__}: {a.mode} depth {a.depth}, "
              f"{a.base} base channels, {a.batch} x {patch}")
        for k in ("fp32", "bf16"):
            print(f"  {k}: median {med[k]:.3f} s/step  ({', '.join(f'{t:.3f}' for t in times[k])})")
        print(f"  faster: {report['faster']} ({max(med.values()) / min(med.values()):.2f}x)")


if __name__ == "__main__":
    main()
