"""Getting a raw stack onto the device, normalised, without waiting on the copy.

A brightfield stack arrives as uint16 in host memory. The plain way (normalise to a
fresh float32 array with numpy, then ``.to(device)``) allocates twice the stack's bytes
on every stack and, on a GPU, copies them from pageable memory: the driver first copies
into its own pinned bounce buffer, and nothing else happens meanwhile. For a 2048x2048
sCMOS stack of 32 planes that is 512 MiB of float32 per stack.

`InputStaging` keeps its buffers from one stack to the next (fresh pages cost more
than the copy: a first touch of 512 MiB is ~0.1 s) and, on CUDA:

* copies the raw integers (half the bytes of float32) into a preallocated *pinned*
  host buffer, from which the GPU copies by DMA at full bus speed;
* moves the stack in chunks of planes on a separate CUDA stream, so the copy of chunk
  k+1 runs while chunk k is converted to float32 and normalised on the compute stream
  (an event per chunk orders the two);
* computes the normalisation statistics on the host from a strided subsample (as
  `PercentileNorm` does), so no full pass over the stack is needed before copying.

The result equals ``PercentileNorm()(stack)`` exactly (the same float32 operations in
the same order). On the CPU the same chunked loop runs without streams or pinning.
"""

from __future__ import annotations

import warnings

import numpy as np
import torch

from .normalize import PercentileNorm

#: Bytes of raw stack moved per chunk: large enough to reach full copy bandwidth.
CHUNK_BYTES = 16 << 20


class InputStaging:
    """Turns ``(z, y, x)`` stacks into normalised ``(1, 1, z, y, x)`` float32 tensors on
    ``device``, reusing its buffers.

    The returned tensor is one of those buffers: it is valid until the next call.

    Parameters
    ----------
    device : str
        ``cpu`` or ``cuda[:n]``.
    norm : PercentileNorm
        The model's normalisation (from its checkpoint).
    chunk_bytes : int
        Raw bytes per chunk on CUDA (the unit of copy/compute overlap).
    """

    def __init__(self, device: str, norm: PercentileNorm, chunk_bytes: int = CHUNK_BYTES) -> None:
        self.device = torch.device(device)
        self.norm = norm
        self.chunk_bytes = chunk_bytes
        self.cuda = self.device.type == "cuda"
        self._copy_stream = torch.cuda.Stream(self.device) if self.cuda else None
        self._buffers: dict[str, torch.Tensor] = {}
        self._last_copy: torch.cuda.Event | None = None  # the previous stack's last host->device copy

    def __call__(self, stack: np.ndarray) -> torch.Tensor:
        if stack.ndim != 3:
            raise ValueError(f"expected a (z, y, x) stack, got shape {stack.shape}")
        med, scale = self.norm.statistics(stack)
        raw, wrapped = _as_tensor(stack)
        out = self._buffer("float", stack.shape, torch.float32, self.device)
        planes = max(1, self.chunk_bytes // max(1, stack[0].nbytes))
        if self.cuda:
            self._to_cuda(raw, wrapped, out, planes, med, scale)
        else:
            for k in range(0, stack.shape[0], planes):
                _normalise(out[k:k + planes], raw[k:k + planes], wrapped, med, scale)
        return out[None, None]

    def _to_cuda(self, raw: torch.Tensor, wrapped: bool, out: torch.Tensor, planes: int,
                 med: float, scale: float) -> None:
        pinned = self._buffer("pinned", tuple(raw.shape), raw.dtype, torch.device("cpu"), pin=True)
        on_device = self._buffer("raw", tuple(raw.shape), raw.dtype, self.device)
        compute = torch.cuda.current_stream(self.device)
        if self._last_copy is not None:
            self._last_copy.synchronize()  # the pinned buffer is refilled by the host below
        # the previous stack's work on these buffers must be over before they are refilled
        self._copy_stream.wait_stream(compute)
        # device scalars: a host float divisor makes CUDA multiply by its reciprocal,
        # which differs from the host's division in the last bit
        med_t = torch.tensor(med, dtype=torch.float32, device=self.device)
        scale_t = torch.tensor(scale, dtype=torch.float32, device=self.device)
        for k in range(0, raw.shape[0], planes):
            chunk = slice(k, k + planes)
            pinned[chunk].copy_(raw[chunk])  # host memcpy, overlapping the last chunk's DMA
            with torch.cuda.stream(self._copy_stream):
                on_device[chunk].copy_(pinned[chunk], non_blocking=True)
                arrived = torch.cuda.Event()
                arrived.record(self._copy_stream)
            compute.wait_event(arrived)  # this chunk only: the next one keeps copying
            _normalise(out[chunk], on_device[chunk], wrapped, med_t, scale_t)
        self._last_copy = arrived

    def _buffer(self, name: str, shape: tuple[int, ...], dtype: torch.dtype, device: torch.device,
                pin: bool = False) -> torch.Tensor:
        """A kept buffer of ``shape``; reallocated only when the shape or dtype changes."""
        buf = self._buffers.get(name)
        if buf is None or tuple(buf.shape) != tuple(shape) or buf.dtype != dtype:
            self._buffers.pop(name, None)  # free the old one first: they can be large
            # a normal tensor even when called under inference_mode: it is refilled in
            # place by later calls, which an inference tensor outside that mode refuses
            with torch.inference_mode(False):
                buf = torch.empty(shape, dtype=dtype, device=device, pin_memory=pin)
            self._buffers[name] = buf
        return buf


def _as_tensor(stack: np.ndarray) -> tuple[torch.Tensor, bool]:
    """A zero-copy tensor of the raw stack, and whether it is uint16 read as int16
    (torch's uint16 has few kernels): `_normalise` then unwraps it after conversion."""
    arr = np.ascontiguousarray(stack)
    wrapped = arr.dtype == np.uint16
    if wrapped:
        arr = arr.view(np.int16)
    elif arr.dtype not in (np.uint8, np.int16, np.float32):
        arr = arr.astype(np.float32)
    with warnings.catch_warnings():
        # a read-only view (a ZeroMQ frame, a shared segment) becomes a tensor torch
        # calls writable; the staging only reads it
        warnings.filterwarnings("ignore", message="The given NumPy array is not writable")
        return torch.from_numpy(arr), wrapped


def _normalise(out: torch.Tensor, raw: torch.Tensor, wrapped: bool,
               med: float | torch.Tensor, scale: float | torch.Tensor) -> None:
    """``out = (raw - med) / scale`` in float32, as `PercentileNorm` computes it."""
    out.copy_(raw)
    if wrapped:
        out.remainder_(65536.0)  # uint16 read as int16: -1 -> 65535, exactly
    out.sub_(med).div_(scale)
