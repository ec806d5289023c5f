"""A trained model's own uncertainty scale, fitted on the validation fields it was not
trained on, so its uncertainty reads in its own error units and its confidence halves
where its own stacks go wrong.

Why: the constants that turn the copies' spread into an expected absolute error
(`uncertainty.ERROR_PER_STD`, `uncertainty.ERROR_CURVE`) and the levels at which the
confidence halves (`ood.U_HALF`) were measured on the bundled model, keyed by structure
name. A user's model (``livestain train``, from scratch or fine-tuned) predicting
``dna`` would get the bundled model's ``dna`` scale, which says nothing about how its
copies spread. So `livestain train` calls `calibrate` on its validation fields and
stores the result in the checkpoint (`uncertainty.CALIBRATION_KEY`):

- ``error_per_std``: median absolute error / median spread over the validation voxels,
  per structure (the scale alone, no curve: a curve needs more voxels than one or two
  validation strips give; the median voxel reads right);
- ``u_half``: `U_HALF_PER_MEAN` x the mean scaled uncertainty of the validation stacks,
  the bundled models' own rule (`ood.U_HALF`), so a typical validation stack scores
  ~0.84.

`uncertainty.predict_with_uncertainty` and the confidence use them whenever a checkpoint
carries them; the bundled models carry none and keep the constants.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

import numpy as np

from .evaluate import slides, truth_like_prediction
from .normalize import zscore
from .ood import mean_uncertainty
from .structures import match
from .uncertainty import DEFAULT_METHOD, DEFAULT_PASSES, predict_with_uncertainty

#: ``u_half`` per mean uncertainty of the validation stacks: the bundled models' rule
#: (`ood.U_HALF`: 2.35x their mean in-focus uncertainty), so 2 ** -(1 / 2.35) ** 2 = 0.88
#: for a stack of exactly the mean.
U_HALF_PER_MEAN = 2.35


def calibrate(predictor: Any, fields: Iterable[Any], method: str = DEFAULT_METHOD,
              passes: int = DEFAULT_PASSES) -> dict[str, Any]:
    """The model's own uncertainty scale on ``fields`` (objects with ``brightfield``,
    ``targets``, ``structures``, ``voxel_size_um``: `dataset.Field` s it was not trained
    on), as stored in a checkpoint under `uncertainty.CALIBRATION_KEY`.

    Raises ValueError when no field shares a structure with the model.
    """
    names: Sequence[str] = tuple(predictor.structures)
    cfg = predictor.model.meta.config
    errors: dict[str, list[np.ndarray]] = {s: [] for s in names}
    spreads: dict[str, list[np.ndarray]] = {s: [] for s in names}
    stack_means: dict[str, list[float]] = {s: [] for s in names}
    count = 0
    for field in fields:
        truth = np.asarray(field.targets)
        on_field = match(names, tuple(field.structures))
        if not on_field:
            continue
        mean, spread = predict_with_uncertainty(predictor, np.asarray(field.brightfield), field.voxel_size_um,
                                                method=method, passes=passes, calibration={},
                                                slide=slides(cfg, truth))
        truth = truth_like_prediction(cfg, truth)
        per_stack = mean_uncertainty(spread)
        for s, theirs in on_field.items():
            i = names.index(s)
            t = zscore(truth[tuple(field.structures).index(theirs)])
            errors[s].append(np.abs(mean[i] - t).ravel())
            spreads[s].append(spread[i].ravel())
            stack_means[s].append(float(per_stack[i]))
        count += 1
    if not count:
        raise ValueError(f"no validation field has any of the model's structures {tuple(names)}")
    scale, u_half, median_error = {}, {}, {}
    for s in names:
        if not errors[s]:
            continue
        err, u = np.concatenate(errors[s]), np.concatenate(spreads[s])
        median_u = float(np.median(u))
        k = float(np.median(err)) / median_u if median_u > 0 else 1.0
        scale[s] = round(k, 4)
        median_error[s] = round(float(np.median(err)), 4)
        half = U_HALF_PER_MEAN * k * float(np.mean(stack_means[s]))
        if half > 0:  # a model whose copies never disagree keeps the bundled level
            u_half[s] = round(half, 5)
    return {"method": method, "passes": passes, "fields": count, "error_per_std": scale,
            "u_half": u_half, "median_error": median_error}
