"""The recipe of the bundled model: simulate paired fields, train, save.

``livestain train-bundled`` runs this; the shipped ``inference/models/bundled.safetensors``
is its output, so anyone can reproduce (or improve) the model ``livestain demo`` uses.
"""

from __future__ import annotations

from dataclasses import replace
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


def robust_ranges(p_phase: float | None = None):  # -> randomize.Ranges
    """What the robust recipe varies: everything but the z geometry and the pixel size.

    The worker predicts from the model's own z window centred on the cells
    (`inference.zwindow`) and resamples to its voxel size, so those are the model's
    canonical geometry (16 planes 1 um apart, the cells 0.6 um below the centre,
    0.325 um pixels); optics, camera and samples vary as `livestain simulate
    --randomize` draws them.
    """
    from livestain.devices.randomize import Ranges

    ranges = Ranges(focus_offset_um=(-0.4, 1.6), z_range_um=(15.0, 15.0), z_step_um=(1.0, 1.0),
                    pixel_um=(0.325, 0.325))
    if p_phase is not None:
        ranges = replace(ranges, p_phase=p_phase)
    return ranges


def train_robust(out: Path, steps: int = 1500, fields: int = 32, val_fields: int = 8, seed: int = 0,
                 size: int = 192, p_phase: float | None = None, init: Path | None = None) -> dict:
    """Fine-tune the bundled model on randomized optics, cameras and samples (see
    `robust_ranges`), keeping the weights that validate best on held-out random fields.

    ``p_phase`` 1.0 is the recipe of the bundled phase-contrast model
    (``livestain train-bundled --phase``: 1200 steps, 597 s on 2 CPU cores, from the
    brightfield model of `train_bundled`): every field phase contrast, ring amplitude
    0.3-0.7. ``init``: the model to start from (default: the shipped bundled one)."""
    import numpy as np

    from livestain.devices import randomize
    from livestain.inference.checkpoint import load_checkpoint

    rng = np.random.default_rng(seed)
    ranges = robust_ranges(p_phase)

    def fields_of(n: int, first_seed: int) -> list[tuple[np.ndarray, np.ndarray]]:
        pairs = []
        for i in range(n):
            pair, _ = randomize.render(randomize.draw(rng, ranges), first_seed + i, (0, 0), size)
            pairs.append((pair.brightfield, pair.targets))
        return pairs

    print(f"rendering {fields} training + {val_fields} validation random fields of {size} px ...")
    train_pairs, val_pairs = fields_of(fields, 5000), fields_of(val_fields, 9000)
    base = load_checkpoint(init, "cpu")
    torch.manual_seed(seed)
    settings = TrainSettings(steps=steps, seed=seed, lr=1e-3, intensity=0.1, gamma=0.2, noise=0.03)
    result = train(train_pairs, val_pairs, base.meta.config, settings, PercentileNorm(),
                   on_step=Progress(steps), val_every=max(50, steps // 10), init=base.net, keep_best=True)
    metrics = {s: round(float(v), 4) for s, v in zip(base.meta.config.structures,
                                                      evaluate(result.net, val_pairs, PercentileNorm()))}
    meta = ModelMeta(config=base.meta.config, norm=PercentileNorm(), voxel_size_um=base.meta.voxel_size_um,
                     extra={"recipe": "livestain train-bundled " + ("--phase" if p_phase == 1.0 else "--robust"),
                            "init": base.name, "p_phase": ranges.p_phase,
                            "settings": {**settings.__dict__, "patch": list(settings.patch)},
                            "fields": fields, "val_fields": val_fields, "size": size,
                            "val_pearson": metrics, "train_seconds": round(result.seconds, 1),
                            "best_step": result.best_step, "history": result.history,
                            **{k: base.meta.extra[k] for k in ("train_extent_um", "train_focus_offset_um")
                               if k in base.meta.extra}})
    path = save_checkpoint(out, result.net, meta)
    print(f"wrote {path} ({path.stat().st_size / 1e6:.2f} MB); validation Pearson r on random fields: {metrics}")
    return metrics


def dense_colony(rng) -> dict:
    """A dense colony's population parameters (`devices.randomize`): cells touching,
    18-30 per 10^4 um^2, the bundled model's worst brightfield condition before it
    trained on them."""
    return {"kind": "dense", "density_per_1e4um2": float(rng.uniform(18.0, 30.0)), "body_xy_um": [6.0, 10.0],
            "body_z_um": [2.5, 4.5], "max_overlap": 0.35, "attempts_per_cell": 10}


def load_base(init: Path | None, widen_to: int | None = None, modality: str = "brightfield"):
    """The model a recipe fine-tunes (``init``, default the shipped one of ``modality``),
    widened to ``widen_to`` base channels first when given (`inference.widen`: the same
    predictions, room for more): how the shipped models grew past 8 base channels
    without re-running their whole recipe chain."""
    from dataclasses import replace as replace_meta

    from livestain.inference.checkpoint import LoadedModel, bundled_model_path, load_checkpoint
    from livestain.inference.widen import widen

    base = load_checkpoint(init or bundled_model_path(modality), "cpu")
    if widen_to is None or widen_to == base.meta.config.base_channels:
        return base
    net = widen(base.net, widen_to, noise=WIDEN_NOISE)
    meta = replace_meta(base.meta, config=net.config,
                        extra={**base.meta.extra, "widened_from": base.meta.config.base_channels})
    return LoadedModel(net=net, meta=meta, path=base.path, fingerprint=base.fingerprint)


def tuning_flags(structures, structure_weights: tuple[float, ...], widen_to: int | None) -> str:
    """The ``--widen`` and ``--weight`` options of a fine-tune, as the recipe recorded in
    the checkpoint's provenance spells them (weights of 1 left out)."""
    flags = f" --widen {widen_to}" if widen_to else ""
    for name, weight in zip(structures, structure_weights):
        if weight != 1:
            flags += f" --weight {name}={weight:g}"
    return flags


#: `inference.widen`'s noise for the recipes: enough for the copied channels to drift
#: apart, small against the prediction (max |change| ~0.04 on the shipped model's output).
WIDEN_NOISE = 0.005


def _fine_tune(out: Path, base, train_pairs: list, val_pairs: list, steps: int, seed: int, lr: float,
               extra: dict, structure_weights: tuple[float, ...] = ()) -> dict:
    """Fine-tune ``base`` (a loaded checkpoint) on the pairs, keep the weights that
    validate best, and save them to ``out`` with ``base``'s provenance updated by
    ``extra``: the common tail of `train_dense_mix` and `train_phase_mix`."""
    torch.manual_seed(seed)
    settings = TrainSettings(steps=steps, seed=seed, lr=lr, structure_weights=tuple(structure_weights))
    result = train(train_pairs, val_pairs, base.meta.config, settings, PercentileNorm(),
                   on_step=Progress(steps), val_every=max(50, steps // 10), init=base.net, keep_best=True)
    metrics = {s: round(float(v), 4) for s, v in zip(base.meta.config.structures,
                                                      evaluate(result.net, val_pairs, PercentileNorm()))}
    meta = ModelMeta(config=base.meta.config, norm=PercentileNorm(), voxel_size_um=base.meta.voxel_size_um,
                     extra={**base.meta.extra, **extra, "init": base.name,
                            "settings": {**settings.__dict__, "patch": list(settings.patch)},
                            "val_pearson": metrics, "train_seconds": round(result.seconds, 1),
                            "best_step": result.best_step, "history": result.history})
    path = save_checkpoint(out, result.net, meta)
    print(f"wrote {path} ({path.stat().st_size / 1e6:.2f} MB); validation Pearson r: {metrics}")
    return metrics


#: Planes of the tall stacks edge windows are cut from (`edge_pairs`): room for a 16-plane
#: stack up to `EDGE_OFFSETS_UM`'s far end off the cells, and for the window around them.
EDGE_TALL_PLANES = 40
#: How far (um, either way) the stacks of `edge_pairs` sit off the cells: from where the
#: window first needs planes beyond the stack to where the cells are at its very end.
EDGE_OFFSETS_UM = (3, 10)


def edge_pairs(n: int, first_seed: int, rng, size: int = 192, per_field: int = 2,
               extent_um: float = 16.0, focus_offset_um: float = 0.0) -> list:
    """(window, truth) pairs of stacks that end at or near the cells: what the worker
    feeds the model when focus drift has moved the stack off them.

    The worker cuts the model's window around the cells (`inference.zwindow`), and where
    the stack ends first it makes the missing planes from the ones it has
    (`zwindow.window_planes`). A model trained only on whole stacks never saw such
    planes: 8 um off the cells it scored DNA r 0.80 where the true planes give 0.98
    (bench/robustness.py's seeds). Each pair here is that window, made by the worker's
    own code from a 16-plane stack cut out of a tall rendering, and the tall stack's true
    fluorescence at the window's planes.
    """
    import numpy as np

    from livestain.devices import randomize
    from livestain.focus import locate_cells
    from livestain.inference import zwindow

    params = randomize.training_default()
    params["n_planes"], params["z_range_um"] = EDGE_TALL_PLANES, float(EDGE_TALL_PLANES - 1)
    dz = float(params["z_step_um"])
    n_stack = int(randomize.training_default()["n_planes"])
    centred = (EDGE_TALL_PLANES - n_stack) // 2  # the tall stack's planes of a stack on the cells
    pairs = []
    for i in range(n):
        pair, _ = randomize.render(params, first_seed + i, (0, 0), size)
        for k in range(per_field):
            offset = (1 if k % 2 else -1) * int(rng.integers(EDGE_OFFSETS_UM[0], EDGE_OFFSETS_UM[1] + 1))
            first = centred + int(round(offset / dz))
            stack = pair.brightfield[first:first + n_stack]
            window = zwindow.plan_window(stack, dz, extent_um, locate_cells(stack, dz, "brightfield"),
                                         focus_offset_um)
            if window is None:
                continue
            planes = np.arange(window.first, window.first + window.size) + first
            if planes[0] < 0 or planes[-1] >= EDGE_TALL_PLANES:
                continue  # the focus was misplaced beyond the tall stack: no truth for it
            pairs.append((zwindow.window_planes(stack, window, dz), pair.targets[:, planes]))
    return pairs


#: Ranges of the uneven illumination `shaded` draws: a lamp tilted by up to 10 % across
#: the field, a vignette darkening the corners by up to 20 %, up to two dust shadows.
SHADING_TILT = (0.0, 0.1)
SHADING_VIGNETTE = (0.0, 0.2)


def shaded(stack, rng, offset_adu: float):
    """``stack`` as the camera would see it under uneven illumination: the light above the
    camera's offset times a field drawn from `SHADING_TILT`, `SHADING_VIGNETTE` and dust
    (`devices.randomize.illumination`, the simulator's own model of it).

    Measured on the edge-trained model (bench fields, 192 px): a 5 % tilt took DNA r from
    0.96 to -0.01, two dust shadows to 0.24; dividing by a smoothed background did not
    bring it back (DNA lives in the same low frequencies), so the model learns it.
    """
    import numpy as np

    from livestain.devices import randomize

    size = stack.shape[-1]
    params = {"illumination_tilt": float(rng.uniform(*SHADING_TILT)),
              "illumination_angle_rad": float(rng.uniform(0, 2 * np.pi)),
              "illumination_vignette": float(rng.uniform(*SHADING_VIGNETTE)),
              "dust": [[float(rng.uniform()), float(rng.uniform()), float(rng.uniform(3, 15)),
                        float(rng.uniform(0.05, 0.3))] for _ in range(int(rng.integers(0, 3)))]}
    pixel_um = float(randomize.training_default()["pixel_um"])  # the recipe's fields' (dust sizes in um)
    field = randomize.illumination(params, size, pixel_um)[: stack.shape[-2], :size]
    out = offset_adu + (stack.astype(np.float32) - offset_adu) * field[None]
    return out.astype(np.float32)


#: Exposure (as a fraction of the field's own) the shaded copies are thinned to, half of
#: them (`dimmed`): the shading fine-tune alone lost low light (0.25x exposure DNA r
#: 0.97 -> 0.36), learning to read fine detail that camera noise buries.
DIM_RANGE = (0.2, 1.0)


def dimmed(stack, rng, offset_adu: float, keep: float):
    """``stack`` as a ``keep`` times shorter exposure would have recorded it: each
    photoelectron above the camera offset (the simulator's gain: 1 e-/ADU) kept with
    probability ``keep`` (thinning a Poisson count gives the Poisson count of the
    shorter exposure), then scaled back to the original brightness."""
    import numpy as np

    electrons = np.clip(np.rint(stack.astype(np.float64) - offset_adu), 0, None).astype(np.int64)
    return (offset_adu + rng.binomial(electrons, keep) / keep).astype(np.float32)


#: Objective NA of `other_na`'s fields, and their condenser NA as a fraction of it.
NA_RANGE = (0.3, 1.2)
CONDENSER_FRACTION = (0.4, 0.75)


def other_na(n: int, first_seed: int, rng, size: int = 192) -> list:
    """Fields of the bundled acquisition through other objectives (NA drawn from
    `NA_RANGE`, condenser a `CONDENSER_FRACTION` of it, at most 0.9): trained at NA 0.5
    only, the model read NA 0.3 / 0.8 / 1.2 at DNA r 0.79 / 0.92 / 0.85, mitochondria
    0.37-0.56 (bench/robustness.py)."""
    from livestain.devices import randomize

    pairs = []
    for i in range(n):
        p = randomize.training_default()
        na = float(rng.uniform(*NA_RANGE))
        p["na_objective"] = round(na, 3)
        p["na_condenser"] = round(min(0.9, na * float(rng.uniform(*CONDENSER_FRACTION))), 3)
        pair, _ = randomize.render(p, first_seed + i, (0, 0), size)
        pairs.append((pair.brightfield, pair.targets))
    return pairs


def train_dense_mix(out: Path, steps: int = 1200, dense_fields: int = 12, seed: int = 0, size: int = 192,
                    lr: float = 5e-4, init: Path | None = None, edge_fields: int = 0,
                    shading: bool = False, na_fields: int = 0,
                    structure_weights: tuple[float, ...] = (), widen_to: int | None = None) -> dict:
    """Fine-tune the bundled model on its own training fields plus dense colonies (cells
    touching, 18-30 per 10^4 um^2), same optics and geometry: the dense colony is the
    bundled model's worst brightfield condition (DNA r 0.74), and the randomized
    fine-tune, which also varies optics, lost the canonical conditions. The shipped
    bundled model is this fine-tune (533 s on 2 CPU cores) of `train_bundled`'s output
    (``init``; default: the shipped bundled model)."""
    import numpy as np

    from livestain.devices import randomize

    rng = np.random.default_rng(seed)

    def dense(n: int, first_seed: int) -> list[tuple[np.ndarray, np.ndarray]]:
        pairs = []
        for i in range(n):
            p = randomize.training_default()
            p["population"] = dense_colony(rng)
            pair, _ = randomize.render(p, first_seed + i, (0, 0), size)
            pairs.append((pair.brightfield, pair.targets))
        return pairs

    print(f"simulating {len(TRAIN_TILES)} canonical + {dense_fields} dense training fields ...")
    canonical = [(p.brightfield, p.targets) for p in simulate_pairs(TRAIN_TILES, seed=101)]
    val_canonical = [(p.brightfield, p.targets) for p in simulate_pairs(VAL_TILES, seed=202)]
    train_pairs = canonical + dense(dense_fields, 6000)
    val_pairs = val_canonical + dense(3, 6100)
    base = load_base(init, widen_to)
    if edge_fields:
        from livestain.inference.zwindow import model_window_um

        extent_um, focus_offset_um = model_window_um(base.meta)
        print(f"simulating {edge_fields} + 3 tall fields for stacks that end near the cells ...")
        window = {"extent_um": extent_um, "focus_offset_um": focus_offset_um}
        train_pairs += edge_pairs(edge_fields, 6200, rng, size, **window)
        val_pairs += edge_pairs(3, 6300, rng, size, **window)
    if na_fields:
        print(f"simulating {na_fields} + 3 fields through objectives of NA {NA_RANGE[0]}-{NA_RANGE[1]} ...")
        train_pairs += other_na(na_fields, 7100, rng, size)
        val_pairs += other_na(3, 7200, rng, size)
    if shading:  # every field once more under uneven illumination (`shaded`)
        from livestain.devices.optics import OpticsConfig

        offset = OpticsConfig().offset_adu
        print("adding a copy of every field under uneven illumination (half of them dimmed) ...")

        def shaded_copy(b):
            b = shaded(b, rng, offset)
            return dimmed(b, rng, offset, float(rng.uniform(*DIM_RANGE))) if rng.uniform() < 0.5 else b

        train_pairs += [(shaded_copy(b), t) for b, t in list(train_pairs)]
        val_pairs += [(shaded_copy(b), t) for b, t in list(val_pairs)]
    recipe = "livestain train-bundled --dense" + " --edge" * bool(edge_fields) + " --shading" * shading \
        + " --other-na" * bool(na_fields) + f" --edge-fields {edge_fields}" * (edge_fields not in (0, 12)) \
        + f" --na-fields {na_fields}" * (na_fields not in (0, 12)) \
        + tuning_flags(base.meta.config.structures, structure_weights, widen_to)
    return _fine_tune(out, base, train_pairs, val_pairs, steps, seed, lr,
                      {"recipe": recipe, "dense_fields": dense_fields, "edge_fields": edge_fields,
                       "shading": shading, "na_fields": na_fields, "size": size}, structure_weights)


def train_phase_mix(out: Path, steps: int = 1200, fields: int = 16, dense_fields: int = 6, seed: int = 0,
                    size: int = 192, lr: float = 5e-4, init: Path | None = None, random_fields: int = 16,
                    structure_weights: tuple[float, ...] = (), widen_to: int | None = None) -> dict:
    """Fine-tune the phase-contrast model at the bundled acquisition (16 planes 1 um
    apart on the cells, NA 0.5, 0.325 um pixels), ring amplitude 0.3-0.7, sparse and
    dense samples: what `train_dense_mix` did for brightfield. The randomized recipe
    (`train_robust` with ``p_phase`` 1) spread the phase model over optics and cameras
    and left mitochondria its weakest structure (r 0.45 at the bundled acquisition,
    bench/robustness.py). ``random_fields`` fields of the randomized recipe's own
    (optics, cameras, samples drawn from `robust_ranges`) keep what it learned there:
    without them, DNA r on random phase fields fell 0.80 -> 0.63 while the bundled
    acquisition's mitochondria rose 0.43 -> 0.66. ``init``: default the shipped phase model."""
    import numpy as np

    from livestain.devices import randomize

    rng = np.random.default_rng(seed)

    def phase(n: int, first_seed: int, dense: bool) -> list[tuple[np.ndarray, np.ndarray]]:
        pairs = []
        for i in range(n):
            p = randomize.training_default()
            p["modality"] = "phase"
            p["phase_ring_amplitude"] = round(float(rng.uniform(0.3, 0.7)), 4)
            if dense:
                p["population"] = dense_colony(rng)
            pair, _ = randomize.render(p, first_seed + i, (0, 0), size)
            pairs.append((pair.brightfield, pair.targets))
        return pairs

    print(f"simulating {fields} sparse + {dense_fields} dense phase-contrast training fields ...")
    train_pairs = phase(fields, 6400, False) + phase(dense_fields, 6500, True)
    val_pairs = phase(3, 6600, False) + phase(2, 6700, True)
    if random_fields:
        print(f"rendering {random_fields} + 3 randomized phase-contrast fields ...")
        for n, first, into in ((random_fields, 6800, train_pairs), (3, 6900, val_pairs)):
            for i in range(n):
                pair, _ = randomize.render(randomize.draw(rng, robust_ranges(1.0)), first + i, (0, 0), size)
                into.append((pair.brightfield, pair.targets))
    base = load_base(init, widen_to, "phase")
    return _fine_tune(out, base, train_pairs, val_pairs, steps, seed, lr,
                      {"recipe": "livestain train-bundled --phase --canonical"
                       + tuning_flags(base.meta.config.structures, structure_weights, widen_to), "fields": fields,
                       "dense_fields": dense_fields, "random_fields": random_fields, "size": size},
                      structure_weights)
