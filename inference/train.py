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
learning-rate schedule, random generators, step, history, the best weights so far and
the early-stopping count) is written every ``save_every`` steps and at the end, as
safetensors (tensors) plus JSON (everything else) in one file; never a pickle.
``resume=True`` continues from it and reaches exactly the weights an uninterrupted run
would have (same device and threads).

Best weights and early stopping: every validation's mean Pearson r (over structures)
is compared with the best so far; ``keep_best`` returns the best validation's weights
rather than the last step's, and ``patience`` stops a run that has not improved for
that many validations. Library callers get neither by default: `experiments` validates
on its *test* fields (selecting weights on them would bias the reported scores) and the
bundled recipe must reproduce the shipped model; ``livestain train`` turns both on.

Fine-tuning (``init``): the network starts from another network of the same
architecture (`transfer_weights`: every tensor whose name and shape match, the output
head row by row for the structures both know); the data-derived defaults of
``livestain train`` (`data_patch`, `data_steps`) live here too.
"""

from __future__ import annotations

import hashlib
import json
import math
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from livestain.metrics import pearson  # noqa: F401  (re-exported: callers import it from here)

from .model import UNet3D, UNetConfig, window_indices
from .normalize import PercentileNorm, zscore
from .structures import match
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
    structure_weights : tuple[float, ...]
        Weight of each structure's squared error in the loss, in the network's structure
        order (empty: all equal). A fine, sparse structure (mitochondria) contributes
        little to an even mean squared error once the coarse ones fit; weighting it
        more trains the network's capacity where its Pearson r is lowest.
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
    structure_weights: tuple[float, ...] = ()

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["patch"] = [int(v) for v in self.patch]
        if self.structure_weights:
            d["structure_weights"] = [float(w) for w in self.structure_weights]
        else:  # equal weights: recorded as before, so earlier training states still resume
            del d["structure_weights"]
        return d


def structure_loss(out: torch.Tensor, target: torch.Tensor, weights: Sequence[float] = ()) -> torch.Tensor:
    """Mean squared error, each structure (axis 1) weighted by ``weights`` (empty: equal,
    the plain mean squared error); weights are normalised to sum to the structure count,
    so a weighted loss stays on the plain loss's scale."""
    if not weights:
        return torch.nn.functional.mse_loss(out, target)
    w = torch.as_tensor([float(v) for v in weights], dtype=out.dtype, device=out.device)
    if w.numel() != out.shape[1] or bool((w < 0).any()) or float(w.sum()) <= 0:
        raise ValueError(f"structure weights {list(weights)} must be {out.shape[1]} non-negative numbers, "
                         "one per structure of the network, not all zero")
    per_structure = ((out - target) ** 2).mean(dim=[d for d in range(out.ndim) if d != 1])
    return (per_structure * w).sum() / w.sum()


@dataclass
class Transfer:
    """What `transfer_weights` copied from an initial network into a new one.

    Attributes
    ----------
    kept : list[str]
        Tensors copied whole (same name and shape; the head when every structure of
        the new network has its row in the initial one).
    total : int
        Tensors of the new network.
    head_rows : dict[str, str]
        New structure -> the initial network's structure whose output-head row it got
        (the same structure, by name or alias).
    new_structures : list[str]
        Structures the initial network lacks: their head rows keep their fresh
        (seeded) initialisation.
    skipped : list[str]
        Other tensors left at their fresh initialisation (no tensor of that name and
        shape in the initial network).
    """

    kept: list[str]
    total: int
    head_rows: dict[str, str]
    new_structures: list[str]
    skipped: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return {"kept_tensors": len(self.kept), "total_tensors": self.total, "head_rows": dict(self.head_rows),
                "new_structures": list(self.new_structures), "skipped": list(self.skipped)}

    def describe(self) -> str:
        """One line for the user: how much of the initial network the new one starts from."""
        text = f"kept {len(self.kept)} of {self.total} tensors"
        if self.new_structures:
            rows = ", ".join(self.head_rows) or "none"
            text += (f"; output head re-initialised for {', '.join(self.new_structures)} "
                     f"(rows kept for: {rows})")
        if self.skipped:
            text += f"; {len(self.skipped)} other tensor(s) fresh: {', '.join(self.skipped[:4])}"
        return text


@dataclass
class TrainResult:
    """A trained network and how it got there.

    ``net`` holds the best validation's weights when `train` was asked to keep them
    (``restored_best``), else the last step's. ``history`` keeps every validation.
    """

    net: UNet3D
    history: list[dict] = field(default_factory=list)
    seconds: float = 0.0
    losses: list[float] = field(default_factory=list)
    precision: str = "fp32"
    resumed_from: int = 0  # the step a resumed run started after; seconds include the earlier run's
    best_step: int | None = None  # step of the best mean validation r (0: the initial network); None: no validation
    best_score: float | None = None  # that mean validation r
    steps_run: int = 0  # the last step trained (< settings.steps when stopped early)
    stopped_early_at: int | None = None  # the step early stopping ended the run at
    restored_best: bool = False  # net holds best_step's weights, not the last step's
    transfer: Transfer | None = None  # what a fine-tune kept of its initial network

    @property
    def best_val_pearson(self) -> dict[str, float] | None:
        """Validation r per structure of the best validation (None without validation)."""
        for h in self.history:
            if h["step"] == self.best_step:
                return dict(h["val_pearson"])
        return None


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
    if xp.shape[-2] != xp.shape[-1]:  # a quarter turn would swap a non-square patch's sides
        k = 2 * (k % 2)
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


# ------------------------------------------------------------------ fine-tuning

#: Prefix of the output layer's tensors (`UNet3D.head`: one 1x1(x1) conv, a row per structure).
HEAD = "head."


def same_architecture(a: UNetConfig, b: UNetConfig) -> bool:
    """Whether two configs build the same network apart from the structures it outputs."""
    return a.to_dict() | {"structures": None} == b.to_dict() | {"structures": None}


def plan_transfer(
    target: Mapping[str, torch.Size], source: Mapping[str, torch.Size],
    target_structures: Sequence[str], source_structures: Sequence[str],
) -> Transfer:
    """What `transfer_weights` would copy, from the tensors' names and shapes alone.

    Every tensor whose name and shape match is kept. The output head is matched per
    structure instead (by name or alias, `structures.match`): a shape match alone would
    copy, say, membrane's row into actin's when both have two structures.
    """
    rows = match(list(target_structures), list(source_structures))
    new = [t for t in target_structures if t not in rows]
    kept, skipped = [], []
    for name, shape in target.items():
        if name.startswith(HEAD):
            if not new and name in source and tuple(source[name])[1:] == tuple(shape)[1:]:
                kept.append(name)
        elif name in source and tuple(source[name]) == tuple(shape):
            kept.append(name)
        else:
            skipped.append(name)
    return Transfer(kept=kept, total=len(target), head_rows=rows, new_structures=new, skipped=skipped)


def transfer_weights(net: UNet3D, init: UNet3D) -> Transfer:
    """Copy ``init``'s weights into ``net`` (same architecture; structures may differ).

    Tensors with the same name and shape are copied; the output head gets, for each of
    ``net``'s structures that ``init`` also predicts, that structure's row of ``init``'s
    head (so a subset, or a reordering, of ``init``'s structures starts exactly where
    ``init`` was); rows of structures ``init`` lacks keep ``net``'s fresh initialisation.
    """
    if not same_architecture(net.config, init.config):
        raise ValueError(
            f"cannot fine-tune from a {describe_architecture(init.config)} network into a "
            f"{describe_architecture(net.config)} one: "
            "a fine-tune keeps the initial network's architecture (build the config from it with "
            "dataclasses.replace(init.config, structures=...))"
        )
    dst, src = net.state_dict(), init.state_dict()
    plan = plan_transfer({k: v.shape for k, v in dst.items()}, {k: v.shape for k, v in src.items()},
                         net.config.structures, init.config.structures)
    index = {name: i for i, name in enumerate(init.config.structures)}
    with torch.no_grad():
        for name in dst:
            if name.startswith(HEAD) and name in src:
                for i, structure in enumerate(net.config.structures):
                    if structure in plan.head_rows:
                        dst[name][i].copy_(src[name][index[plan.head_rows[structure]]])
            elif name in plan.kept:
                dst[name].copy_(src[name])
    return plan


def describe_architecture(c: UNetConfig) -> str:
    """``3d, depth 2, 8 base channels`` (2.5D: with its window and target): for messages."""
    window = f", {c.z_window}-plane window" + (", max projection" if c.target_2d == "max" else "") \
        if c.mode == "2.5d" else ""
    return f"{c.mode}, depth {c.depth}, {c.base_channels} base channels{window}"


def _tensors_signature(state: Mapping[str, torch.Tensor]) -> str:
    """Short hash of a state dict's names and values: identifies a fine-tune's start for `train`'s resume check."""
    h = hashlib.sha256()
    for k in sorted(state):
        h.update(k.encode())
        h.update(state[k].detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()[:16]


# ------------------------------------------------------------------ data-derived defaults

#: ``livestain train``'s patch when the data allow it (fnet's 32x64x64 halved in z: the
#: simulated and typical widefield stacks have 16-40 planes).
DEFAULT_PATCH = (16, 64, 64)
#: Passes over the training voxels a run from scratch makes: the bundled recipe's 600
#: steps of 4 x 16x64x64 patches over its 9 fields of 16x256x256 are ~16 (and its
#: validation r has levelled off by then). A fine-tune starts from features that already
#: read brightfield and only adapts them: 4 passes.
PASSES, FINETUNE_PASSES = 16.0, 4.0
#: Sane bounds on the derived steps: below 300 a run from scratch has barely left its
#: initialisation even on one small field; above 3000 (~10-20 min on a CPU for the
#: default network) more data buys little that --steps cannot ask for explicitly. A
#: fine-tune: at least 100 (the step-0 baseline and early stopping guard the rest), at
#: most 750 ("minutes", not hours, on a CPU).
STEP_BOUNDS, FINETUNE_STEP_BOUNDS = (300, 3000), (100, 750)


def data_patch(
    smallest: Sequence[int], depth: int, mode: str = "3d", z_window: int = 1,
    upper: Sequence[int] = DEFAULT_PATCH,
) -> tuple[tuple[int, int, int], str]:
    """``(patch, why)``: the default patch fitted to the smallest training stack.

    z never exceeds the smallest stack's planes (2.5D: z is the window); y and x never
    exceed the smallest field's and are rounded down to a multiple of ``2**depth``, so
    the network pads nothing in the image plane (padding would make it learn reflected
    borders). A field at least as large as ``upper`` gets ``upper``.
    """
    m = 2**depth
    sz, sy, sx = (int(v) for v in smallest)
    pz = z_window if mode == "2.5d" else min(int(upper[0]), sz)
    py, px = (max(m, min(int(u), s) // m * m) if s >= m else s for u, s in zip(upper[1:], (sy, sx)))
    patch = (pz, py, px)
    if mode == "3d" and patch == tuple(upper):
        why = f"the default; every training stack is at least {'x'.join(map(str, upper))}"
    else:
        why = (f"the default {'x'.join(map(str, upper))} fitted to the smallest training stack "
               f"{sz}x{sy}x{sx}" + (f" (z: the {z_window}-plane window)" if mode == "2.5d" else "")
               + f", y/x multiples of {m} (2**depth)")
    return patch, why


def data_steps(
    target_voxels: int, batch: int, patch: Sequence[int], mode: str = "3d", finetune: bool = False
) -> tuple[int, str]:
    """``(steps, why)``: steps for ``PASSES`` (fine-tune: ``FINETUNE_PASSES``) over the
    training target voxels in ``batch`` patches per step, within ``STEP_BOUNDS``
    (``FINETUNE_STEP_BOUNDS``). A 2.5D patch teaches one plane of y x x voxels."""
    per_step = batch * (int(np.prod(patch)) if mode == "3d" else int(patch[1]) * int(patch[2]))
    passes = FINETUNE_PASSES if finetune else PASSES
    lo, hi = FINETUNE_STEP_BOUNDS if finetune else STEP_BOUNDS
    raw = math.ceil(passes * target_voxels / max(1, per_step))
    steps = int(min(hi, max(lo, raw)))
    why = f"~{passes:g} passes{' (a fine-tune)' if finetune else ''} over {target_voxels / 1e6:.2f} M training voxels"
    why += f" in {batch} patches a step would be {raw}" if raw != steps else f" in {batch} patches a step"
    if raw < lo:
        why += f"; raised to the minimum {lo}"
    elif raw > hi:
        why += f"; capped at {hi} (--steps asks for more)"
    return steps, why


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
    init: UNet3D | None = None,
    keep_best: bool = False,
    patience: int = 0,
) -> TrainResult:
    """Fit a fresh network (or continue one, ``resume``); ``pairs`` are
    ``(brightfield (z,y,x), targets (s,z,y,x) or (s,y,x))``.

    With ``state_path`` the training state is saved every ``save_every`` steps (0: only
    at the end) and at the end; an interrupted run resumes from the last save (a state
    written mid-step would not be consistent, so Ctrl-C writes none).
    ``resume`` loads it and continues after its step; settings, architecture, data and
    initial network must be those it was saved with (ValueError naming the difference
    otherwise). A state written before best weights were saved resumes with the best
    tracked from the resumed step on.

    ``init``: fine-tune from this network (same architecture as ``config``; structures
    may differ, see `transfer_weights`); with validation pairs, it is validated first, as
    step 0, so the run reports where it started and ``keep_best`` never returns weights
    that validate worse than the initial network's.

    ``keep_best``: return the weights of the validation with the best mean Pearson r
    (over structures; ties keep the earlier) instead of the last step's.
    ``patience`` (validations; 0: off): stop when the mean validation r has not
    improved for that many validations in a row (``stopped_early_at``). A resumed run
    that had stopped early stays stopped unless ``patience`` now allows more.
    """
    s = settings or TrainSettings()
    if patience < 0:
        raise ValueError(f"patience must be at least 0 (0: no early stopping), got {patience}")
    norm = norm or PercentileNorm()
    device = torch.device(device)
    precision = resolve_precision(s.precision, device)
    torch.manual_seed(s.seed)
    rng = np.random.default_rng(s.seed)
    data = _prepare(train_pairs, norm, config)
    fg_index = [_foreground(y) for _, y in data]
    net = UNet3D(config).to(device)
    transfer = transfer_weights(net, init) if init is not None else None
    net.train()
    opt = torch.optim.Adam(net.parameters(), lr=s.lr)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=s.steps, eta_min=s.lr * 0.05)
    scaler = torch.amp.GradScaler("cuda", enabled=precision == "fp16")
    result = TrainResult(net=net, precision=precision, transfer=transfer)
    signature = data_signature(data)
    identity = {"settings": s.to_dict(), "config": config.to_dict(), "norm": norm.to_dict(), "data": signature}
    if init is not None:  # only then: states of runs from scratch stay resumable
        identity["init"] = _tensors_signature(init.state_dict())
    start = 0
    seconds_before = 0.0
    # the best validation so far: its step, mean r, weights (on the device), and the
    # validations since it that did not beat it (early stopping's count)
    best: dict[str, Any] = {"step": None, "score": None, "weights": None, "since": 0, "stopped": None}
    if resume:
        if state_path is None:
            raise ValueError("resume needs the path of a saved training state")
        state, tensors = load_training_state(state_path)
        for key in [*identity, *(["init"] if "init" in state and "init" not in identity else [])]:
            value = identity.get(key)  # a fine-tune's state resumed without its init: None
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
        saved_best = {k[len("best/"):]: v.to(device) for k, v in tensors.items() if k.startswith("best/")}
        if state.get("best_step") is not None and saved_best:
            best.update(step=int(state["best_step"]), score=float(state["best_score"]), weights=saved_best,
                        since=int(state.get("since_best", 0)), stopped=state.get("stopped_early_at"))

    def save_state(step: int) -> None:
        if state_path is None:
            return
        opt_meta, opt_tensors = _optimizer_to_flat(opt)
        tensors = {f"model/{k}": v for k, v in net.state_dict().items()}
        tensors.update(opt_tensors)
        tensors["rng/torch"] = torch.get_rng_state()
        if best["weights"] is not None:
            tensors.update({f"best/{k}": v for k, v in best["weights"].items()})
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
            "best_step": best["step"],
            "best_score": best["score"],
            "since_best": best["since"],
            "stopped_early_at": best["stopped"],
        }, tensors)

    def validate(step: int, loss: float | None) -> bool:
        """Validate at ``step``, track the best; True when patience has run out."""
        r = [float(v) for v in evaluate(net, val_pairs, norm)]
        result.history.append({"step": step, "loss": loss, "val_pearson": dict(zip(config.structures, r))})
        score = float(np.mean(r))
        if math.isfinite(score) and (best["score"] is None or score > best["score"]):  # a diverged net is never best
            weights = {k: v.detach().clone() for k, v in net.state_dict().items()}
            best.update(step=step, score=score, weights=weights, since=0)
        else:
            best["since"] += 1
        return bool(patience) and best["since"] >= patience

    autocast_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision, torch.bfloat16)
    if precision == "fp32":
        autocast_dtype = None
    t0 = time.perf_counter()
    end = s.steps
    if best["stopped"] is not None:
        if patience and best["since"] >= patience:
            end = start  # it stopped early and this patience would stop it again: nothing to run
        else:
            best["stopped"] = None  # more patience now: carry on
    if val_pairs and init is not None and start == 0:
        validate(0, None)  # where the fine-tune starts (its loss is not defined yet)
    last = start
    for step in range(start + 1, end + 1):
        batch = [_sample(rng, data, fg_index, s, config) for _ in range(s.batch)]
        xb = torch.from_numpy(np.stack([b[0] for b in batch])).to(device)
        yb = torch.from_numpy(np.stack([b[1] for b in batch])).to(device)
        with torch.autocast(device.type, dtype=autocast_dtype, enabled=autocast_dtype is not None):
            out = net(xb)
        loss = structure_loss(out.float(), yb, s.structure_weights)
        opt.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        scaler.step(opt)
        scaler.update()
        sched.step()
        value = float(loss.detach())
        result.losses.append(value)
        last = step
        if on_step is not None:
            on_step(step, value)
        if val_pairs and (step % val_every == 0 or step == s.steps):
            if validate(step, value) and step < s.steps:
                best["stopped"] = step
                break
        if save_every and step % save_every == 0 and step != s.steps:
            save_state(step)
    save_state(last)
    result.steps_run = last
    result.best_step, result.best_score, result.stopped_early_at = best["step"], best["score"], best["stopped"]
    if keep_best and best["weights"] is not None and best["step"] != last:
        net.load_state_dict(best["weights"])
        result.restored_best = True
    net.eval()
    result.seconds = seconds_before + time.perf_counter() - t0
    return result
