"""The fast inference path: a trained network rearranged for prediction only.

Training needs BatchNorm as a separate layer; prediction does not. Folding each
BatchNorm into the convolution before it removes a full pass over every activation
tensor. ``channels_last_3d`` lets oneDNN (CPU) and cuDNN (GPU) pick their fastest
convolution kernels, and bf16 autocast halves memory traffic where the hardware has
bf16 arithmetic (AVX512-BF16/AMX on CPUs, Ampere and later GPUs). None of it changes
what the network computes beyond bf16 rounding; `max_abs_difference` measures that.
"""

from __future__ import annotations

import contextlib
import copy
import os
from collections.abc import Iterator
from pathlib import Path

import torch
from torch import nn
from torch.nn.utils.fusion import fuse_conv_bn_eval


def fold_batchnorm(net: nn.Module) -> nn.Module:
    """A copy of ``net`` (eval mode) with every Conv3d/ConvTranspose3d -> BatchNorm3d fused."""
    net = copy.deepcopy(net).eval()
    for module in net.modules():
        if not isinstance(module, nn.Sequential):
            continue
        children = list(module.named_children())
        for (name_a, a), (name_b, b) in zip(children, children[1:]):
            if isinstance(b, nn.BatchNorm3d) and isinstance(a, (nn.Conv3d, nn.ConvTranspose3d)):
                fused = fuse_conv_bn_eval(a, b, transpose=isinstance(a, nn.ConvTranspose3d))
                setattr(module, name_a, fused)
                setattr(module, name_b, nn.Identity())
    return net


class OneDnnConv3d(nn.Conv3d):
    """A Conv3d that always takes oneDNN's kernel for fp32 on the CPU.

    PyTorch picks its slow reference convolution for fp32 whenever batch x channels x
    depth x height of the input is at most 20480 (a rule made for 2D images): in a 3D
    U-Net that is the first layer and every deeper level of a typical stack. Measured
    here: 8 -> 16 channels on 8x128x128 takes 76 ms that way and 4.7 ms with oneDNN,
    with the same result to 3e-6. Under autocast (bf16) PyTorch already uses oneDNN, and
    the call goes the usual way.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if (x.device.type != "cpu" or x.dtype != torch.float32 or x.dim() != 5
                or self.padding_mode != "zeros" or isinstance(self.padding, str)
                or torch.is_autocast_enabled("cpu") or not torch.backends.mkldnn.enabled):
            return super().forward(x)
        return torch.ops.aten.mkldnn_convolution(
            x, self.weight, self.bias, list(self.padding), list(self.stride), list(self.dilation), self.groups
        )


def use_onednn_convolutions(net: nn.Module) -> nn.Module:
    """Swap every Conv3d of ``net`` (in place) for `OneDnnConv3d` sharing its parameters,
    where this torch has oneDNN; returns ``net``."""
    if not (torch.backends.mkldnn.is_available() and hasattr(torch.ops.aten, "mkldnn_convolution")):
        return net
    for module in net.modules():
        for name, child in module.named_children():
            if type(child) is nn.Conv3d:
                child.__class__ = OneDnnConv3d  # same parameters and buffers, other forward
    return net


@contextlib.contextmanager
def onednn_convolutions(net: nn.Module) -> Iterator[nn.Module]:
    """Inside the block, every plain Conv3d of ``net`` takes oneDNN's kernel (fp32, CPU),
    as `use_onednn_convolutions` makes them; afterwards they are plain again, so a
    one-pass prediction outside stays bit-identical to the eager network.

    For tiled prediction on the CPU: PyTorch's 20480 rule (see `OneDnnConv3d`) sends
    most layers of a 4x1048x1048 tile to its slow reference kernel. Measured with the
    bundled model (2 shared cores): 2160 CPU-ns per voxel eager, 1230 with oneDNN
    (eager on a whole 4x2048x2048 plane: 1660), outputs equal to 2e-6. Nets that choose
    their own kernels (a `FastNet`, anything ``torch.compile``d) are left alone.
    """
    if not (torch.backends.mkldnn.is_available() and hasattr(torch.ops.aten, "mkldnn_convolution")) or any(
        isinstance(m, FastNet) or hasattr(m, "_orig_mod") for m in net.modules()
    ):
        yield net
        return
    swapped = [m for m in net.modules() if type(m) is nn.Conv3d]
    for m in swapped:
        m.__class__ = OneDnnConv3d
    try:
        yield net
    finally:
        for m in swapped:
            m.__class__ = nn.Conv3d


def bf16_supported(device: str) -> bool:
    """Whether bf16 arithmetic is native here (so autocast speeds things up)."""
    if device.startswith("cuda"):
        return torch.cuda.is_available() and torch.cuda.is_bf16_supported()
    try:
        return bool(torch.backends.mkldnn.is_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return False


@contextlib.contextmanager
def autocast(device: str, enabled: bool) -> Iterator[None]:
    """bf16 autocast on ``device`` when ``enabled``, else nothing."""
    if not enabled:
        yield
        return
    with torch.autocast(device_type="cuda" if device.startswith("cuda") else "cpu", dtype=torch.bfloat16):
        yield


class FastNet(nn.Module):
    """A network prepared for prediction: folded, channels-last, optionally bf16.

    A drop-in `nn.Module` for the trained network (same ``config`` and ``multiple``),
    so tiling and the predictor use it unchanged.

    Parameters
    ----------
    net : nn.Module
        A trained network (left untouched).
    device : str
        ``cpu`` or ``cuda[:n]``.
    bf16 : bool | None
        Use bf16 autocast; None decides by `bf16_supported`.
    compile : bool
        ``torch.compile`` the network (inductor). Off by default: on the development
        CPU it was slower than eager (see README); the first stack of each shape pays
        the compile, later runs load it from `compile_cache_dir`.
    """

    def __init__(self, net: nn.Module, device: str = "cpu", bf16: bool | None = None,
                 compile: bool = False) -> None:
        super().__init__()
        self.device = device
        self.bf16 = bf16_supported(device) if bf16 is None else bf16
        self.config = getattr(net, "config", None)
        self.multiple = getattr(net, "multiple", 1)
        self.net = fold_batchnorm(net).to(device).to(memory_format=torch.channels_last_3d)
        if not device.startswith("cuda") and not compile:  # inductor picks its own kernels
            use_onednn_convolutions(self.net)
        if compile:
            use_compile_cache()
            # one graph per stack shape; a time-lapse repeats its shape, so it compiles once
            self.net = torch.compile(self.net, dynamic=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.to(self.device).contiguous(memory_format=torch.channels_last_3d)
        with torch.inference_mode(), autocast(self.device, self.bf16):
            y = self.net(x)
        return y.float().contiguous()


def compile_cache_dir() -> Path:
    """Where compiled kernels persist between runs: ``$TORCHINDUCTOR_CACHE_DIR`` if set,
    else ``livestain/torch-compile`` in the user's cache folder."""
    if os.environ.get("TORCHINDUCTOR_CACHE_DIR"):
        return Path(os.environ["TORCHINDUCTOR_CACHE_DIR"])
    base = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    return base / "livestain" / "torch-compile"


def use_compile_cache() -> Path:
    """Point inductor's on-disk caches at `compile_cache_dir` (torch's default lives in
    /tmp, which a reboot empties: the next run would compile again)."""
    folder = compile_cache_dir()
    folder.mkdir(parents=True, exist_ok=True)
    os.environ["TORCHINDUCTOR_CACHE_DIR"] = str(folder)
    return folder


def max_abs_difference(net: nn.Module, fast: FastNet, x: torch.Tensor) -> float:
    """Largest deviation of the fast path from the plain fp32 network on ``x``."""
    with torch.inference_mode():
        ref = net.eval()(x)
    return float((fast(x).cpu() - ref).abs().max())
