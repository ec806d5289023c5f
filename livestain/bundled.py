"""The recipe of the bundled model: simulate paired fields, train, save.

``livestain train-bundled`` runs this; the shipped ``inference/models/bundled.safetensors``
is its output, so anyone can reproduce (or improve) the model ``livestain demo`` uses.
"""

from __future__ import annotations

from pathlib import Path

import torch

from livestain.devices.pairs import simulate_pairs
from livestain.inference.checkpoint import ModelMeta, save_checkpoint
from livestain.inference.commands import Progress
from livestain.inference.model import UNetConfig
from livestain.inference.normalize import PercentileNorm
from livestain.inference.train import TrainSettings, evaluate, train
from livestain.inference.zwindow import training_geometry

TRAIN_TILES = [(i, j) for i in range(3) for j in range(3)]
VAL_TILES = [(40, 40), (40, 41), (41, 40)]  # far from the demo's tiles: unseen cells


def train_bundled(out: Path, steps: int = 600, seed: int = 0) -> dict:
    """Train the demo model on simulated fields and write it to ``out``."""
    torch.manual_seed(seed)
    cfg = UNetConfig(depth=2, base_channels=8)
    settings = TrainSettings(steps=steps, seed=seed)
    print(f"simulating {len(TRAIN_TILES)} training + {len(VAL_TILES)} validation fields ...")
    train_pairs = [(p.brightfield, p.targets) for p in simulate_pairs(TRAIN_TILES, seed=101)]
    val = list(simulate_pairs(VAL_TILES, seed=202))
    val_pairs = [(p.brightfield, p.targets) for p in val]
    result = train(train_pairs, val_pairs, cfg, settings, PercentileNorm(), on_step=Progress(steps))
    r = evaluate(result.net, val_pairs, PercentileNorm())
    metrics = {s: round(float(v), 4) for s, v in zip(cfg.structures, r)}
    meta = ModelMeta(
        config=cfg,
        norm=PercentileNorm(),
        voxel_size_um=val[0].voxel_size_um,
        extra={
            "recipe": "livestain train-bundled",
            "settings": {**settings.__dict__, "patch": list(settings.patch)},
            "train_tiles": TRAIN_TILES,
            "val_tiles": VAL_TILES,
            "val_pearson": metrics,
            "train_seconds": round(result.seconds, 1),
            "history": result.history,
            # the z window the worker predicts from (inference.zwindow)
            **training_geometry([b for b, _ in train_pairs], val[0].voxel_size_um[0]),
        },
    )
    path = save_checkpoint(out, result.net, meta)
    print(f"wrote {path} ({path.stat().st_size / 1e6:.2f} MB); validation Pearson r: {metrics}")
    return metrics
