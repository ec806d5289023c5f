"""Predict structures from one brightfield stack with a loaded model.

The stack is normalised as in training, resampled from the microscope's voxel size to
the model's training voxel size when they differ (a model trained at 1 um z-steps sees
0.5 um data as twice as thick otherwise), run through the network in one pass for all
structures, and resampled back, so the prediction lines up voxel for voxel with the
raw stack it came from. Stacks too large for the device's memory are predicted in
blended tiles (`tiling`); small ones still go through the network in one pass.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F

from .checkpoint import LoadedModel, load_checkpoint
from .tiling import predict_volume


def pick_device(requested: str | None = None) -> str:
    """``cuda`` when a GPU is present (or requested), else ``cpu``."""
    if requested:
        return requested
    return "cuda" if torch.cuda.is_available() else "cpu"


class Predictor:
    """Holds a model on a device and turns ``(z, y, x)`` stacks into ``(s, z, y, x)``."""

    def __init__(self, model: LoadedModel | str | None = None, device: str | None = None) -> None:
        self.device = pick_device(device)
        self.model = model if isinstance(model, LoadedModel) else load_checkpoint(model, self.device)
        self.model.net.to(self.device).eval()

    @property
    def structures(self) -> tuple[str, ...]:
        return self.model.meta.config.structures

    def predict(
        self,
        stack: np.ndarray,
        voxel_size_um: Sequence[float] | None = None,
        tile: Sequence[int] | None = None,
        tta: bool = False,
        overlap: Sequence[int] | int | None = None,
    ) -> np.ndarray:
        """Prediction in z-score units, float32, shape ``(len(structures), *stack.shape)``.

        ``tile`` (z, y, x, in the model's voxels) forces tiled prediction with that tile
        size; without it the stack is tiled only when it exceeds the tile the device's
        free memory allows (`tiling.default_tile`). ``tta`` averages the predictions of
        the four y/x flips (4x the time, slightly smoother).
        """
        if stack.ndim != 3:
            raise ValueError(
                f"expected a (z, y, x) brightfield stack, got shape {stack.shape}; "
                "pass one channel of one time point and position"
            )
        x = self.model.meta.norm(stack)
        t = torch.from_numpy(x)[None, None].to(self.device)
        scale = self._scale(voxel_size_um)
        with torch.inference_mode():
            if scale is not None:
                size = [max(1, round(n * s)) for n, s in zip(stack.shape, scale)]
                t = F.interpolate(t, size=size, mode="trilinear", align_corners=False)
            y = predict_volume(self.model.net, t, tile=tile, overlap=overlap, tta=tta, device=self.device)
            if scale is not None:
                y = F.interpolate(y, size=list(stack.shape), mode="trilinear", align_corners=False)
        return y[0].float().cpu().numpy()

    def _scale(self, voxel_size_um: Sequence[float] | None) -> tuple[float, ...] | None:
        """Per-axis zoom from the data's voxels to the model's, or None if they match."""
        if voxel_size_um is None:
            return None
        scale = tuple(float(d) / m for d, m in zip(voxel_size_um, self.model.meta.voxel_size_um))
        return None if np.allclose(scale, 1.0, rtol=0.02) else scale
