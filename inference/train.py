"""Training a `UNet3D` (3D or 2.5D) from paired (brightfield, structures) stacks.

fnet's recipe: z-scored targets, random patches, MSE, Adam. Patches are drawn with a
bias towards foreground (cells fill a fraction of a field; sampling empty background
teaches the network little), with random flips and 90-degree rotations in the image
plane and, when `TrainSettings` asks for them, intensity scaling, gamma, Gaussian noise
and small z shifts of the input against the target (focus drift). Validation Pearson r
per structure on held-out fields is logged as it trains.

Targets per pair: ``(s, z, y, x)`` stacks registered to the brightfield ``(z, y, x)``
(3D models; 2.5D models learn the plane at each window's centre, or with
``target_2d="max"`` the stack's maximum projection) or ``(s, y, x)`` single planes
(2.5D only: the plane the window centred in the stack should give).

Mixed precision: ``precision="auto"`` uses bf16 autocast on CUDA GPUs that have bf16
(else fp16 with gradient scaling) and, on a CPU, bf16 autocast where the CPU has native
bf16 arithmetic (AVX512-BF16 or AMX) and fp32 elsewhere (without native bf16, autocast
emulates it and is slower than fp32 on such CPUs; no such CPU was at hand to measure). Measured with `bench/train_precision.py` on this project's
development machine (AMD EPYC with AVX512-BF16, 2 cores shared, torch 2.13), median of
4-5 alternating training steps: default network (3D, depth 2, 8 channels, 4 x 16x64x64)
0.368 s fp32 vs 0.186 s bf16; fnet size (depth 4, 32 channels, 2 x 16x64x64) 1.30 s vs
0.54 s; 2.5D (depth 3, 16 channels, 4 x 6x128x128) 0.140 s vs 0.081 s. `TrainSettings`
defaults to fp32 so library callers (and the bundled-model recipe) stay bit-reproducible
across machines; ``livestain train`` defaults to ``auto``.

Resumable: with ``state_path`` the full training state (weights, optimiser moments,
learning-rate schedule, random generators, step, history) is written every
``save_every`` steps and at the end, as safetensors (tensors) plus JSON
(everything else) in one file; never a pickle. ``resume=True`` continues from it and
reaches exactly the weights an uninterrupted run would have (same device and threads).
"""

from __future__ import annotations

import hashlib
import json
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .model import UNet3D, UNetConfig, window_indices
from .normalize import PercentileNorm, zscore
from .tiling import predict_volume

PRECISIONS = ("auto", "fp32", "bf16", "fp16")
STATE_KEY = "livestain.train_state"
STATE_FORMAT = "livestain.train_state/1"


@dataclass
class TrainSettings:
    """Hyper-parameters of one training run (recorded in the checkpoint).

    Attributes
    ----------
    steps : int
        Optimiser steps.
    patch : tuple[int, int, int]
        (z, y, x) patch size (2.5D: z is ignored, the window is ``z_window`` planes).
    batch : int
        Patches per step.
    lr : float
        Adam learning rate.
    foreground_fraction : float
        Share of patches centred on a voxel with above-median target signal.
    seed : int
        Seeds patch sampling, augmentation and initial weights.
    intensity : float
        Input intensity augmentation: scaled by U(1 - a, 1 + a) and shifted by
        U(-a, a) (normalised units, where the stack's contrast range is 1). 0: off.
    gamma : float
        Input gamma augmentation: exponent exp(U(-log(1 + g), log(1 + g))) on the
        patch rescaled to [0, 1]. 0: off.
    noise : float
        Gaussian noise of standard deviation U(0, n) added to the input. 0: off.
    z_shift : int
        The input is shifted in z against the target by up to this many planes
        (3D: the input patch; 2.5D: the window's centre), as focus drift would. 0: off.
    precision : str
        ``auto``, ``fp32``, ``bf16`` or ``fp16`` (CUDA only): autocast dtype of the
        forward pass (`resolve_precision`). Default fp32: reproducible everywhere.
    """

    steps: int = 600
    patch: tuple[int, int, int] = (16, 64, 64)
    batch: int = 4
    lr: float = 2e-3
    foreground_fraction: float = 0.7
    seed: int = 0
    intensity: float = 0.0
    gamma: float = 0.0
    noise: float = 0.0
    z_shift: int = 0
    precision: str = "fp32"

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["patch"] = [int(v) for v in self.patch]
        return d


@dataclass
class TrainResult:
    net: UNet3D
    history: list[dict] = field(default_factory=list)
    seconds: float = 0.0
    losses: list[float] = field(default_factory=list)
    precision: str = "fp32"
    resumed_from: int = 0  # the step a resumed run started after; seconds include the earlier run's


def pearson(a: np.ndarray, b: np.ndarray) -> float:
    """Pearson correlation of two arrays (0 when either is constant)."""
    a = np.asarray(a, np.float64).ravel()
    b = np.asarray(b, np.float64).ravel()
    a = a - a.mean()
    b = b - b.mean()
    denom = np.sqrt((a * a).sum() * (b * b).sum())
    return float((a * b).sum() / denom) if denom > 0 else 0.0


def cpu_has_native_bf16() -> bool:
    """Whether this CPU does bf16 arithmetic natively (AVX512-BF16 / AMX), per oneDNN."""
    try:
        return bool(torch.backends.mkldnn.is_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return False


def resolve_precision(precision: str, device: str | torch.device) -> str:
    """``fp32``, ``bf16`` or ``fp16`` for ``precision`` on ``device`` (``auto`` decided here:
    CUDA bf16 if supported else fp16; CPU bf16 with native bf16 arithmetic, else fp32)."""
    if precision not in PRECISIONS:
        raise ValueError(f"precision {precision!r} is not one of {PRECISIONS}")
    cuda = torch.device(device).type == "cuda"
    if precision == "auto":
        if cuda:
            return "bf16" if torch.cuda.is_bf16_supported() else "fp16"
        return "bf16" if cpu_has_native_bf16() else "fp32"
    if precision == "fp16" and not cuda:
        raise ValueError("fp16 training needs a CUDA GPU; use bf16 or fp32 on the CPU")
    return precision


def prepare_targets(targets: np.ndarray, config: UNetConfig, bf_shape: Sequence[int]) -> np.ndarray:
    """Targets in z-score units in the form the model learns: (s, z, y, x) or, for 2.5D
    single-plane or projected targets, (s, y, x). Shapes are checked against the stack."""
    t = np.asarray(targets)
    s = len(config.structures)
    planar = t.ndim == 3
    if t.ndim not in (3, 4) or t.shape[0] != s or tuple(t.shape[-2:]) != tuple(bf_shape[-2:]) or (
        not planar and t.shape[1] != bf_shape[0]
    ):
        raise ValueError(
            f"targets of shape {t.shape} do not fit brightfield {tuple(bf_shape)} and {s} structures: "
            "expected (s, z, y, x) registered to the stack, or (s, y, x) single planes (2.5D)"
        )
    if config.mode == "3d":
        if planar:
            raise ValueError(
                "single-plane targets need a 2.5D model (mode '2.5d'); a 3D model learns a stack from a stack"
            )
    elif not planar and config.target_2d == "max":
        t, planar = t.max(axis=1), True
    return np.stack([zscore(c) for c in t])


def _prepare(
    pairs: Sequence[tuple[np.ndarray, np.ndarray]], norm: PercentileNorm, config: UNetConfig | None = None
) -> list[tuple[np.ndarray, np.ndarray]]:
    config = config or UNetConfig(structures=tuple(f"s{i}" for i in range(np.asarray(pairs[0][1]).shape[0])))
    return [(norm(bf), prepare_targets(tg, config, np.shape(bf))) for bf, tg in pairs]


def predict_normalised(net: UNet3D, x: np.ndarray, planar: bool = False) -> np.ndarray:
    """Network output for a normalised (z, y, x) stack, on the net's device, memory-bounded.

    3D: (s, z, y, x). 2.5D: (s, y, x) from the window centred in the stack when
    ``planar``, else (s, z, y, x) with every plane predicted from the window centred on it.
    """
    cfg = net.config
    device = next(net.parameters()).device
    t = torch.from_numpy(np.ascontiguousarray(x, np.float32)).to(device)
    if cfg.mode == "3d":
        return predict_volume(net, t[None, None])[0].float().cpu().numpy()
    nz = t.shape[0]
    centres = [nz // 2] if planar else range(nz)
    planes = [
        predict_volume(net, t[torch.from_numpy(window_indices(nz, cfg.z_window, c)).to(device)][None])[0]
        for c in centres
    ]
    out = torch.stack(planes, dim=1).float().cpu().numpy()
    return out[:, 0] if planar else out


def evaluate(
    net: UNet3D, pairs: Sequence[tuple[np.ndarray, np.ndarray]], norm: PercentileNorm
) -> list[float]:
    """Mean Pearson r per structure of whole-field predictions against the targets."""
    was_training = net.training
    net.eval()
    rs: list[list[float]] = []
    with torch.inference_mode():
        for x, y in _prepare(pairs, norm, net.config):
            out = predict_normalised(net, x, planar=y.ndim == 3)
            rs.append([pearson(out[i], y[i]) for i in range(y.shape[0])])
    net.train(was_training)
    return list(np.mean(rs, axis=0))


# ------------------------------------------------------------------ sampling


def _augment(xp: np.ndarray, rng: np.random.Generator, s: TrainSettings) -> np.ndarray:
    """Intensity, gamma and noise on an input patch (the target is untouched)."""
    if s.gamma > 0:
        g = math.exp(rng.uniform(-math.log1p(s.gamma), math.log1p(s.gamma)))
        lo, hi = float(xp.min()), float(xp.max())
        if hi > lo:
            xp = lo + (hi - lo) * ((xp - lo) / (hi - lo)) ** g
    if s.intensity > 0:
        xp = xp * rng.uniform(1 - s.intensity, 1 + s.intensity) + rng.uniform(-s.intensity, s.intensity)
    if s.noise > 0:
        xp = xp + rng.normal(0.0, rng.uniform(0.0, s.noise), xp.shape)
    return np.asarray(xp, np.float32)


def _foreground(y: np.ndarray) -> np.ndarray:
    """Indices (of y's spatial axes) with above-median signal in some structure."""
    m = y.max(axis=0)
    return np.argwhere(m > np.median(m) + 0.5)


def _sample(
    rng: np.random.Generator,
    data: list[tuple[np.ndarray, np.ndarray]],
    fg_index: list[np.ndarray],
    s: TrainSettings,
    cfg: UNetConfig,
) -> tuple[np.ndarray, np.ndarray]:
    """One (input, target) patch: 3D (1, pz, py, px), (S, pz, py, px); 2.5D (zw, py, px), (S, py, px)."""
    pz, py, px = s.patch
    i = int(rng.integers(len(data)))
    x, y = data[i]
    nz, ny, nx = x.shape
    planar = y.ndim == 3
    if rng.random() < s.foreground_fraction and len(fg_index[i]):
        c = fg_index[i][rng.integers(len(fg_index[i]))]
        cz, cy, cx = (nz // 2, *c) if planar else c
    else:
        cz, cy, cx = rng.integers(nz), rng.integers(ny), rng.integers(nx)
        if planar:
            cz = nz // 2
    y0 = int(np.clip(cy - py // 2, 0, max(ny - py, 0)))
    x0 = int(np.clip(cx - px // 2, 0, max(nx - px, 0)))
    if cfg.mode == "3d":
        z0 = int(np.clip(cz - pz // 2, 0, max(nz - pz, 0)))
        xz0 = z0
        if s.z_shift:
            xz0 = int(np.clip(z0 + rng.integers(-s.z_shift, s.z_shift + 1), 0, max(nz - pz, 0)))
        xp = x[xz0 : xz0 + pz, y0 : y0 + py, x0 : x0 + px]
        yp = y[:, z0 : z0 + pz, y0 : y0 + py, x0 : x0 + px]
    else:
        centre = int(cz) + (int(rng.integers(-s.z_shift, s.z_shift + 1)) if s.z_shift else 0)
        centre = int(np.clip(centre, 0, nz - 1))
        xp = x[window_indices(nz, cfg.z_window, centre), y0 : y0 + py, x0 : x0 + px]
        yp = y[:, y0 : y0 + py, x0 : x0 + px] if planar else y[:, int(cz), y0 : y0 + py, x0 : x0 + px]
    k = int(rng.integers(4))
    xp, yp = np.rot90(xp, k, axes=(-2, -1)), np.rot90(yp, k, axes=(-2, -1))
    if rng.random() < 0.5:
        xp, yp = xp[..., ::-1], yp[..., ::-1]
    xp = np.ascontiguousarray(xp, np.float32)
    if s.intensity > 0 or s.gamma > 0 or s.noise > 0:
        xp = _augment(xp, rng, s)
    return (xp[None] if cfg.mode == "3d" else xp), np.ascontiguousarray(yp)


# ------------------------------------------------------------------ training state


def data_signature(data: Sequence[tuple[np.ndarray, np.ndarray]]) -> str:
    """Short hash of the prepared training arrays (shapes and a strided sample of values)."""
    h = hashlib.sha256()
    for x, y in data:
        for a in (x, y):
            h.update(repr(a.shape).encode())
            h.update(np.ascontiguousarray(a.reshape(-1)[:: max(1, a.size // 4096)], np.float32).tobytes())
    return h.hexdigest()[:16]


def save_training_state(path: str | Path, state: dict[str, Any], tensors: dict[str, torch.Tensor]) -> Path:
    """Write ``tensors`` (safetensors) and ``state`` (JSON in the header) to ``path`` atomically."""
    from safetensors.torch import save_file

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".partial")
    save_file({k: v.detach().cpu().contiguous() for k, v in tensors.items()}, str(tmp),
              metadata={STATE_KEY: json.dumps({"format": STATE_FORMAT, **state})})
    tmp.replace(path)
    return path


def load_training_state(path: str | Path) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """``(state, tensors)`` from a file written by `save_training_state`; never unpickles."""
    from safetensors import SafetensorError, safe_open
    from safetensors.torch import load_file

    path = Path(path)
    if not path.is_file():
        raise ValueError(f"no training state at {path} to resume from; start without --resume")
    try:
        with safe_open(str(path), framework="pt") as f:
            state = json.loads((f.metadata() or {})[STATE_KEY])
        tensors = load_file(str(path))
    except (SafetensorError, KeyError, json.JSONDecodeError, OSError) as e:
        raise ValueError(f"{path} is not a livestain training state ({e}); start without --resume") from None
    if state.get("format") != STATE_FORMAT:
        raise ValueError(f"{path} has format {state.get('format')!r}, expected {STATE_FORMAT!r}")
    return state, tensors


def _optimizer_to_flat(opt: torch.optim.Optimizer) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """An optimiser's state dict split into JSON (groups, scalars) and named tensors."""
    sd = opt.state_dict()
    tensors: dict[str, torch.Tensor] = {}
    scalars: dict[str, dict[str, Any]] = {}
    for idx, entries in sd["state"].items():
        for name, value in entries.items():
            if isinstance(value, torch.Tensor):
                tensors[f"optimizer/{idx}/{name}"] = value
            else:
                scalars.setdefault(str(idx), {})[name] = value
    return {"param_groups": sd["param_groups"], "scalars": scalars}, tensors


def _optimizer_from_flat(meta: dict[str, Any], tensors: dict[str, torch.Tensor]) -> dict[str, Any]:
    state: dict[int, dict[str, Any]] = {}
    for key, value in tensors.items():
        if key.startswith("optimizer/"):
            _, idx, name = key.split("/", 2)
            state.setdefault(int(idx), {})[name] = value
    for idx, entries in meta["scalars"].items():
        state.setdefault(int(idx), {}).update(entries)
    groups = [{**g, "betas": tuple(g["betas"])} if "betas" in g else g for g in meta["param_groups"]]
    return {"state": state, "param_groups": groups}


# ------------------------------------------------------------------ training


def train(
    train_pairs: Sequence[tuple[np.ndarray, np.ndarray]],
    val_pairs: Sequence[tuple[np.ndarray, np.ndarray]],
    config: UNetConfig,
    settings: TrainSettings | None = None,
    norm: PercentileNorm | None = None,
    on_step: Callable[[int, float], None] | None = None,
    val_every: int = 100,
    device: str | torch.device = "cpu",
    state_path: str | Path | None = None,
    save_every: int = 0,
    resume: bool = False,
) -> TrainResult:
    """Fit a fresh network (or continue one, ``resume``); ``pairs`` are
    ``(brightfield (z,y,x), targets (s,z,y,x) or (s,y,x))``.

    With ``state_path`` the training state is saved every ``save_every`` steps (0: only
    at the end) and at the end; an interrupted run resumes from the last save (a state
    written mid-step would not be consistent, so Ctrl-C writes none).
    ``resume`` loads it and continues after its step; settings, architecture and data
    must be those it was saved with (ValueError naming the difference otherwise).
    """
    s = settings or TrainSettings()
    norm = norm or PercentileNorm()
    device = torch.device(device)
    precision = resolve_precision(s.precision, device)
    torch.manual_seed(s.seed)
    rng = np.random.default_rng(s.seed)
    data = _prepare(train_pairs, norm, config)
    fg_index = [_foreground(y) for _, y in data]
    net = UNet3D(config).to(device)
    net.train()
    opt = torch.optim.Adam(net.parameters(), lr=s.lr)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=s.steps, eta_min=s.lr * 0.05)
    scaler = torch.amp.GradScaler("cuda", enabled=precision == "fp16")
    result = TrainResult(net=net, precision=precision)
    signature = data_signature(data)
    identity = {"settings": s.to_dict(), "config": config.to_dict(), "norm": norm.to_dict(), "data": signature}
    start = 0
    seconds_before = 0.0
    if resume:
        if state_path is None:
            raise ValueError("resume needs the path of a saved training state")
        state, tensors = load_training_state(state_path)
        for key, value in identity.items():
            if state.get(key) != json.loads(json.dumps(value)):
                raise ValueError(
                    f"the training state in {state_path} was saved with other {key} "
                    f"({state.get(key)} vs now {value}); resume with the same data and options, "
                    "or start afresh without --resume"
                )
        net.load_state_dict({k[len("model/"):]: v for k, v in tensors.items() if k.startswith("model/")})
        opt.load_state_dict(_optimizer_from_flat(state["optimizer"], tensors))
        sched.load_state_dict(state["scheduler"])
        if state.get("scaler"):
            scaler.load_state_dict(state["scaler"])
        rng.bit_generator.state = state["numpy_rng"]
        torch.set_rng_state(tensors["rng/torch"])
        start = int(state["step"])
        result.history = list(state["history"])
        result.losses = [float(v) for v in state["losses"]]
        result.resumed_from = start
        seconds_before = float(state.get("seconds", 0.0))

    def save_state(step: int) -> None:
        if state_path is None:
            return
        opt_meta, opt_tensors = _optimizer_to_flat(opt)
        tensors = {f"model/{k}": v for k, v in net.state_dict().items()}
        tensors.update(opt_tensors)
        tensors["rng/torch"] = torch.get_rng_state()
        save_training_state(state_path, {
            **identity,
            "step": step,
            "optimizer": opt_meta,
            "scheduler": sched.state_dict(),
            "scaler": scaler.state_dict() if scaler.is_enabled() else None,
            "numpy_rng": rng.bit_generator.state,
            "history": result.history,
            "losses": result.losses,
            "precision": precision,
            "seconds": seconds_before + time.perf_counter() - t0,
        }, tensors)

    autocast_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision, torch.bfloat16)
    if precision == "fp32":
        autocast_dtype = None
    t0 = time.perf_counter()
    for step in range(start + 1, s.steps + 1):
        batch = [_sample(rng, data, fg_index, s, config) for _ in range(s.batch)]
        xb = torch.from_numpy(np.stack([b[0] for b in batch])).to(device)
        yb = torch.from_numpy(np.stack([b[1] for b in batch])).to(device)
        with torch.autocast(device.type, dtype=autocast_dtype, enabled=autocast_dtype is not None):
            out = net(xb)
        loss = torch.nn.functional.mse_loss(out.float(), yb)
        opt.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        scaler.step(opt)
        scaler.update()
        sched.step()
        value = float(loss.detach())
        result.losses.append(value)
        if on_step is not None:
            on_step(step, value)
        if val_pairs and (step % val_every == 0 or step == s.steps):
            r = evaluate(net, val_pairs, norm)
            result.history.append(
                {"step": step, "loss": value, "val_pearson": dict(zip(config.structures, map(float, r)))}
            )
        if save_every and step % save_every == 0 and step != s.steps:
            save_state(step)
    save_state(s.steps)
    net.eval()
    result.seconds = seconds_before + time.perf_counter() - t0
    return result
