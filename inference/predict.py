"""Predict structures from one brightfield stack with a loaded model.

The stack is normalised as in training, resampled from the microscope's voxel size to
the model's training voxel size when they differ (a model trained at 1 um z-steps sees
0.5 um data as twice as thick otherwise), run through the network in one pass for all
structures, and resampled back, so the prediction lines up voxel for voxel with the
raw stack it came from. Stacks too large for the device's memory are predicted in
blended tiles (`tiling`); small ones still go through the network in one pass.

2.5D models (`UNetConfig.mode` ``"2.5d"``) see ``z_window`` planes and predict one
plane. By default the window is centred in the stack (``z_centre``: another plane) and
the result is one plane per structure, shape ``(s, 1, y, x)``: what the model was
trained to give (the target plane at the window's centre, or a projection).
``slide=True`` instead predicts every plane from the window centred on it (planes past
the stack's ends repeat the edge plane), an ``(s, z, y, x)`` stack like a 3D model's;
that is meaningful for models trained on per-plane targets (``target_2d="plane"``),
not for projections. Either way the result is 4-D, as the wire protocol's predictions
are, so the worker and the daemon handle 2.5D models unchanged.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from livestain.stackio import MIN_YX

from livestain.focus import FocusEstimate, estimate_focus, locate_cells, plane_contrast
from livestain.modality import MODALITIES, ModalityEstimate, detect_modality

from . import zwindow
from .checkpoint import LoadedModel, bundled_model_path, load_checkpoint
from .model import window_indices
from .fast import FastNet
from .staging import InputStaging
from .tiling import predict_volume

log = logging.getLogger(__name__)


def pick_device(requested: str | None = None) -> str:
    """``cuda`` when a GPU is present (or requested), else ``cpu``."""
    if requested:
        return requested
    return "cuda" if torch.cuda.is_available() else "cpu"


class Predictor:
    """Holds a model on a device and turns ``(z, y, x)`` stacks into ``(s, z, y, x)``
    (2.5D models: ``(s, 1, y, x)``, or ``(s, z, y, x)`` with ``slide=True``)."""

    def __init__(
        self,
        model: LoadedModel | str | None = None,
        device: str | None = None,
        fast: bool = False,
        bf16: bool | None = None,
        compile: bool = False,
        focus_window: bool = True,
        modality: str | None = None,
    ) -> None:
        """``fast`` predicts with `FastNet` (BatchNorm folded, channels-last, bf16 where
        native unless ``bf16=False``, ``torch.compile`` if ``compile``): the live
        worker's path. 3D models only.

        ``focus_window`` (default on) predicts 3D models from the z window they were
        trained on, centred on the cells' focal plane found in the brightfield
        (`inference.zwindow`), and 2.5D models from the window at that plane.

        ``modality`` applies to the bundled models (``model`` None): ``"auto"`` (their
        default) predicts each stack with the one made for what it shows, brightfield or
        phase contrast (`livestain.modality.detect_modality`); ``"brightfield"`` or
        ``"phase"`` pins one. A model of your own is used for every stack."""
        self.device = pick_device(device)
        if modality not in (None, "auto", *MODALITIES):
            raise ValueError(f"modality must be auto, {' or '.join(MODALITIES)}; got {modality!r}")
        if model is not None and modality not in (None, "auto"):
            raise ValueError("modality chooses between the bundled models: leave it out with a model of your own")
        #: per stack, pick the bundled model for its modality (`_route`)
        self.routes_modality = model is None and modality in (None, "auto")
        self._fast = (fast, bf16, compile)
        self._loaded: dict[str, tuple[LoadedModel, torch.nn.Module, InputStaging]] = {}
        #: what the last `predict` took the stack for (None: not routed)
        self.last_modality: ModalityEstimate | None = None
        if model is None:
            model = bundled_model_path(modality if modality in MODALITIES else "brightfield")
        self.model = model if isinstance(model, LoadedModel) else load_checkpoint(model, self.device)
        self.model.net.to(self.device).eval()
        self.net = self.model.net
        self.staging = InputStaging(self.device, self.model.meta.norm)
        #: seconds of the last `predict`: normalising and resampling in, the network, and
        #: resampling back and copying out (the worker reports them per stack)
        self.last_timing: dict[str, float] = {}
        self.focus_window = focus_window
        #: where the last `predict` found the cells (None: not looked for)
        self.last_focus: FocusEstimate | None = None
        if fast and not self.is_2_5d:
            self.net = FastNet(self.model.net, self.device, bf16=bf16, compile=compile)
        self._loaded["brightfield" if modality in (None, "auto") else str(modality)] = (
            self.model, self.net, self.staging)

    @property
    def structures(self) -> tuple[str, ...]:
        return self.model.meta.config.structures

    @property
    def is_2_5d(self) -> bool:
        return self.model.meta.config.mode == "2.5d"

    @property
    def min_yx(self) -> int:
        """Fewest pixels in y and x worth predicting from: the network's down-sampling
        factor (``2**depth``; below it the coarsest level sees less than one pixel), and
        at least `livestain.stackio.MIN_YX`."""
        return max(MIN_YX, 2 ** int(self.model.meta.config.depth))

    def predict(
        self,
        stack: np.ndarray,
        voxel_size_um: Sequence[float] | None = None,
        tile: Sequence[int] | None = None,
        tta: bool = False,
        overlap: Sequence[int] | int | None = None,
        slide: bool = False,
        z_centre: int | None = None,
        out: np.ndarray | None = None,
        on_tile: Callable[[int, int], None] | None = None,
        focus_window: bool | None = None,
    ) -> np.ndarray:
        """Prediction in z-score units, by the model for the stack's modality when the
        predictor routes (`_route`); see `_predict` for the arguments."""
        contrast = self._route(stack, voxel_size_um) if self.routes_modality and np.ndim(stack) == 3 else None
        return self._predict(stack, voxel_size_um, tile, tta, overlap, slide, z_centre, out, on_tile,
                             focus_window, contrast)

    def _route(self, stack: np.ndarray, voxel_size_um: Sequence[float] | None) -> np.ndarray:
        """Make the bundled model for ``stack``'s modality the current one (loaded once),
        and return the planes' contrast, which the z window reuses. Without the model's
        file (a trimmed install) the brightfield model stays, and says so."""
        contrast = plane_contrast(stack)[0]
        dz = zwindow.z_step_of(voxel_size_um, self.model.meta.voxel_size_um)
        self.last_modality = est = detect_modality(stack, dz, contrast)
        if est.modality not in self._loaded:
            try:
                model = load_checkpoint(bundled_model_path(est.modality), self.device)
            except (OSError, ValueError) as e:
                log.warning("no bundled model for %s stacks (%s): using %s", est.modality, e, self.model.name)
                self._loaded[est.modality] = self._loaded["brightfield"]
            else:
                model.net.to(self.device).eval()
                fast, bf16, compile = self._fast
                net = FastNet(model.net, self.device, bf16=bf16, compile=compile) if fast else model.net
                self._loaded[est.modality] = (model, net, InputStaging(self.device, model.meta.norm))
        self.model, self.net, self.staging = self._loaded[est.modality]
        return contrast

    def _predict(
        self,
        stack: np.ndarray,
        voxel_size_um: Sequence[float] | None = None,
        tile: Sequence[int] | None = None,
        tta: bool = False,
        overlap: Sequence[int] | int | None = None,
        slide: bool = False,
        z_centre: int | None = None,
        out: np.ndarray | None = None,
        on_tile: Callable[[int, int], None] | None = None,
        focus_window: bool | None = None,
        contrast: np.ndarray | None = None,
    ) -> np.ndarray:
        """Prediction in z-score units, float32, shape ``(len(structures), *stack.shape)``
        (2.5D: ``(len(structures), 1, y, x)`` unless ``slide``); written into ``out``
        (and returned) when given, e.g. a shared-memory segment, saving a copy.

        ``tile`` (z, y, x, in the model's voxels; 2.5D: (y, x)) forces tiled prediction
        with that tile size (2.5D: a (z, y, x) tile's z is ignored); without it the stack
        is tiled only when it exceeds the tile the device's free memory allows
        (`tiling.default_tile`). ``tta`` averages the
        predictions of the four y/x flips (4x the time, slightly smoother). ``slide``
        and ``z_centre`` (a plane of ``stack``) only apply to 2.5D models.
        ``on_tile(done, total)`` reports the progress of a tiled prediction, after each
        tile (2.5D with ``slide``: tiles of all planes together); one-pass predictions
        do not call it. ``focus_window`` overrides the predictor's own setting for
        this call; ``contrast`` is the stack's `plane_contrast` when the caller has it
        (`predict` computed it to route), so the z window does not recompute it.
        """
        if stack.ndim != 3:
            raise ValueError(
                f"expected a (z, y, x) brightfield stack, got shape {stack.shape}; "
                "pass one channel of one time point and position"
            )
        if z_centre is not None and not 0 <= z_centre < stack.shape[0]:
            raise ValueError(f"z_centre {z_centre} is outside the stack's {stack.shape[0]} planes")
        if out is not None:
            want = self.output_shape(stack.shape, slide)
            if tuple(out.shape) != want or out.dtype != np.float32:
                raise ValueError(f"out must be float32 {want}, got {out.dtype} {tuple(out.shape)}")
        t0 = time.perf_counter()
        self.last_focus = None
        if self.focus_window if focus_window is None else focus_window:
            if self.is_2_5d:
                # a window as tall as the stack is centred already: a focus elsewhere would
                # repeat edge planes the model never saw repeated
                if z_centre is None and not slide and self.model.meta.config.z_window < stack.shape[0]:
                    self.last_focus = estimate_focus(stack, zwindow.z_step_of(voxel_size_um, self.model.meta.voxel_size_um))
                    if self.last_focus.plane is not None:
                        z_centre = int(round(self.last_focus.plane))
            else:
                windowed = self._predict_window(stack, voxel_size_um, tile, tta, overlap, out, on_tile, contrast)
                if windowed is not None:
                    return windowed
        t = self.staging(stack)  # normalised, on the device; reused by the next call
        scale = self._scale(voxel_size_um)
        with torch.inference_mode():
            if scale is not None:
                size = [max(1, round(n * s)) for n, s in zip(stack.shape, scale)]
                t = F.interpolate(t, size=size, mode="trilinear", align_corners=False)
            t1 = self._clock()
            if self.is_2_5d:
                y = self._predict_2_5d(t, stack.shape[0], tile, overlap, tta, slide, z_centre, on_tile)
            else:
                y = predict_volume(self.net, t, tile=tile, overlap=overlap, tta=tta, device=self.device,
                                   on_tile=on_tile)
            t2 = self._clock()
            if scale is not None:
                back = [y.shape[2] if self.is_2_5d and not slide else stack.shape[0], *stack.shape[1:]]
                y = F.interpolate(y, size=back, mode="trilinear", align_corners=False)
            if out is not None:
                torch.from_numpy(out).copy_(y[0])  # straight from the device into the caller's memory
                result = out
            else:
                result = y[0].float().cpu().numpy()
        self.last_timing = {"preprocess_s": t1 - t0, "network_s": t2 - t1,
                            "postprocess_s": time.perf_counter() - t2}
        return result

    def _predict_window(self, stack: np.ndarray, voxel_size_um: Sequence[float] | None,
                        tile: Sequence[int] | None, tta: bool, overlap: Sequence[int] | int | None,
                        out: np.ndarray | None, on_tile: Callable[[int, int], None] | None,
                        contrast: np.ndarray | None = None) -> np.ndarray | None:
        """A 3D model's prediction from its training z window centred on the cells, or
        None when the whole stack is what it should see (`zwindow.plan_window`)."""
        t0 = time.perf_counter()
        meta = self.model.meta
        dz = zwindow.z_step_of(voxel_size_um, meta.voxel_size_um)
        focus = locate_cells(stack, dz, self.last_modality.modality if self.last_modality else None, contrast)
        self.last_focus = focus
        extent_um, focus_offset_um = zwindow.model_window_um(meta)
        window = zwindow.plan_window(stack, dz, extent_um, focus, focus_offset_um)
        if window is None:
            return None
        t1 = time.perf_counter()
        part = self._predict(zwindow.window_planes(stack, window, dz), voxel_size_um, tile, tta, overlap,
                             on_tile=on_tile, focus_window=False)
        full = zwindow.place(part, window, stack.shape[0])
        self.last_focus = focus
        self.last_timing["focus_s"] = t1 - t0
        if out is None:
            return full
        out[...] = full
        return out

    def predict_with_uncertainty(
        self,
        stack: np.ndarray,
        voxel_size_um: Sequence[float] | None = None,
        method: str | None = None,
        passes: int | None = None,
        **predict_kw: object,
    ) -> tuple[np.ndarray, np.ndarray]:
        """(mean, uncertainty), both float32 shaped like `predict`'s result: the mean of
        ``passes`` predictions of transformed copies of the stack and their spread as an
        expected absolute error in z-score units (`uncertainty.predict_with_uncertainty`;
        ``method`` default `uncertainty.DEFAULT_METHOD`). Costs ``passes`` predictions;
        `predict` itself is untouched by it."""
        from . import uncertainty

        return uncertainty.predict_with_uncertainty(
            self, stack, voxel_size_um,
            method=method or uncertainty.DEFAULT_METHOD,
            passes=passes or uncertainty.DEFAULT_PASSES,
            **predict_kw,
        )

    def output_shape(self, stack_shape: Sequence[int], slide: bool = False) -> tuple[int, ...]:
        """Shape of `predict`'s result for a ``(z, y, x)`` stack."""
        z, y, x = (int(n) for n in stack_shape)
        return (len(self.structures), 1 if self.is_2_5d and not slide else z, y, x)

    def _clock(self) -> float:
        """Now, after the device has finished what was queued (CUDA runs asynchronously)."""
        if self.device.startswith("cuda"):
            torch.cuda.synchronize(self.device)
        return time.perf_counter()

    def _predict_2_5d(
        self,
        t: torch.Tensor,
        n_planes: int,
        tile: Sequence[int] | None,
        overlap: Sequence[int] | int | None,
        tta: bool,
        slide: bool,
        z_centre: int | None,
        on_tile: Callable[[int, int], None] | None = None,
    ) -> torch.Tensor:
        """(1, S, 1 or Z, Y, X) from the (1, 1, Z, Y, X) normalised (resampled) stack ``t``."""
        cfg = self.model.meta.config
        nz = t.shape[2]
        if tile is not None and len(tile) == 3:
            tile = tuple(tile)[1:]  # a (z, y, x) tile: a 2.5D model tiles in y, x only
        if slide:
            centres = list(range(nz))
        else:
            # z_centre is a plane of the original stack; map it onto the resampled one
            c = nz // 2 if z_centre is None else min(nz - 1, int(z_centre * nz / n_planes))
            centres = [c]
        planes = []
        for i, c in enumerate(centres):
            window = t[0, :, torch.from_numpy(window_indices(nz, cfg.z_window, c)).to(t.device)]
            window = window.reshape(1, cfg.net_in_channels, *t.shape[-2:])  # (1, C*z_window, Y, X)
            report = None
            if on_tile is not None:  # every plane has as many tiles: count them all together
                def report(done: int, total: int, i: int = i) -> None:
                    on_tile(i * total + done, len(centres) * total)
            planes.append(predict_volume(self.model.net, window, tile=tile, overlap=overlap, tta=tta,
                                         device=self.device, on_tile=report))
        return torch.stack(planes, dim=2)

    def _scale(self, voxel_size_um: Sequence[float] | None) -> tuple[float, ...] | None:
        """Per-axis zoom from the data's voxels to the model's, or None if they match."""
        if voxel_size_um is None:
            return None
        scale = tuple(float(d) / m for d, m in zip(voxel_size_um, self.model.meta.voxel_size_um))
        return None if np.allclose(scale, 1.0, rtol=0.02) else scale
