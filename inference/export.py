"""Export a livestain model to ONNX or to a bioimage.io model package.

Both carry the whole prediction of a stack, not only the network: the exported graph
takes the raw brightfield (float32, any intensity scale), normalises it exactly as
`PercentileNorm` does (median and percentiles computed in the graph, including the
strided subsample above 1e6 voxels), pads it to the network's multiple, runs the
network and crops back. So any ONNX runtime, and any bioimage.io consumer (which has
no preprocessing step for a median-centred percentile scaling), gets what livestain's
`Predictor` gives, without livestain.

Shapes: batch 1 (the normalisation statistics are over the whole input tensor).
3D models: input ``(1, 1, Z, Y, X)``, output ``(1, S, Z, Y, X)``. 2.5D models: input
``(1, z_window, Y, X)`` (the planes of one window), output ``(1, S, Y, X)``. Z, Y and X
are dynamic: any size of at least ``2**depth`` (the reflection padding needs that)
works, checked by running a second, odd shape. Not exported: resampling to the model's
voxel size (the model's voxel size is in the metadata; resample before) and tiling
(a consumer that tiles should overlap tiles by `tiling.default_overlap`).

ONNX uses torch's TorchScript-based exporter (``dynamo=False``; the dynamo exporter
needs the extra ``onnxscript`` package), opset 17. `check_onnx` runs the file with
onnxruntime and reports the largest absolute difference to livestain's own prediction.
"""

from __future__ import annotations

import datetime
import hashlib
import json
import shutil
import warnings
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from .checkpoint import LoadedModel, load_checkpoint
from .normalize import PercentileNorm

OPSET = 17
#: Voxels above which `PercentileNorm` takes its percentiles from a strided subsample.
NORM_SAMPLE = 1_000_000
INPUT_NAME = "brightfield"
OUTPUT_NAME = "prediction"
FNET_CITATION = {
    "text": "Ounkomol et al. Label-free prediction of three-dimensional fluorescence images from "
    "transmitted-light microscopy. Nature Methods 2018.",
    "doi": "10.1038/s41592-018-0111-2",
}


class ExportError(ValueError):
    """An export that could not be done or checked, with what to do (the CLI prints it as one line)."""


class NormalizedNet(nn.Module):
    """Raw input -> percentile normalisation -> pad -> network -> crop, traceable with
    dynamic spatial sizes (every size-dependent step is a tensor operation)."""

    def __init__(self, net: nn.Module, norm: PercentileNorm) -> None:
        super().__init__()
        self.net = net
        self.p = (float(norm.p_low), 50.0, float(norm.p_high))
        self.min_range = float(norm.min_range)

    def normalize(self, x: torch.Tensor) -> torch.Tensor:
        x = x.float()
        flat = x.reshape(-1)
        n = torch._shape_as_tensor(flat)[0]
        step = torch.clamp(torch.div(n, NORM_SAMPLE, rounding_mode="floor"), min=1)
        sample = torch.sort(flat[torch.arange(0, n, step)]).values
        last = torch._shape_as_tensor(sample)[0] - 1
        qs = []
        for p in self.p:  # numpy's default (linear) percentile, in float64 as numpy does
            pos = torch.tensor(p / 100.0, dtype=torch.float64) * last.double()
            lo = torch.floor(pos)
            i = lo.long()
            j = torch.clamp(i + 1, max=last)
            a, b = sample[i].double(), sample[j].double()
            qs.append(a + (b - a) * (pos - lo))
        lo_q, med, hi_q = qs
        scale = torch.maximum(hi_q - lo_q, self.min_range * torch.clamp(med.abs(), min=1.0))
        return (x - med.float()) / scale.float()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.normalize(x)
        m = self.net.multiple
        size = x.shape[2:]
        spec: list[Any] = []
        for s in reversed(size):
            spec += [0, (m - s % m) % m]
        y = self.net.core(F.pad(x, spec, mode="reflect"))
        return y[(Ellipsis, *(slice(0, s) for s in size))]


def _load(model: LoadedModel | str | Path | None) -> LoadedModel:
    return model if isinstance(model, LoadedModel) else load_checkpoint(model, "cpu")


def input_shape(model: LoadedModel, spatial: tuple[int, ...] | None = None) -> tuple[int, ...]:
    """The model's input tensor shape for ``spatial`` (3D: (z, y, x); 2.5D: (y, x))."""
    cfg = model.meta.config
    m = 2**cfg.depth
    if cfg.mode == "3d":
        z, y, x = spatial if spatial is not None else (max(16, m), 64, 64)
        return (1, cfg.in_channels, z, y, x)
    y, x = spatial[-2:] if spatial is not None else (64, 64)
    return (1, cfg.net_in_channels, y, x)


def example_input(model: LoadedModel, spatial: tuple[int, ...] | None = None, seed: int = 0) -> np.ndarray:
    """A brightfield-like float32 input (smooth structure on a camera offset, with noise)."""
    from scipy import ndimage

    shape = input_shape(model, spatial)
    rng = np.random.default_rng(seed)
    smooth = ndimage.gaussian_filter(rng.normal(size=shape[1:]), 2.0)
    x = 3000 + 400 * smooth / max(float(smooth.std()), 1e-6) + rng.normal(0, 20, shape[1:])
    return x.astype(np.float32)[None]


def reference_output(model: LoadedModel, x: np.ndarray) -> np.ndarray:
    """livestain's own prediction for an export-shaped raw input: normalise in numpy, run the net."""
    net = model.net.cpu().eval()
    with torch.inference_mode():
        return net(torch.from_numpy(model.meta.norm(x))).numpy()


def _onnx_available() -> None:
    try:
        import onnx  # noqa: F401
        import onnxruntime  # noqa: F401
    except ImportError as e:
        raise ExportError(
            f"ONNX export needs the onnx and onnxruntime packages ({e}); install them with "
            "`pip install onnx onnxruntime` (or the `export` extra)"
        ) from None


def export_onnx(model: LoadedModel | str | Path | None, out: str | Path,
                spatial: tuple[int, ...] | None = None, opset: int = OPSET) -> Path:
    """Write ``out`` (.onnx): normalisation + network with dynamic spatial axes."""
    _onnx_available()
    model = _load(model)
    wrapper = NormalizedNet(model.net.cpu().eval(), model.meta.norm).eval()
    x = torch.from_numpy(example_input(model, spatial))
    names = {2: "z", 3: "y", 4: "x"} if x.ndim == 5 else {2: "y", 3: "x"}
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # tracer and deprecation warnings: checked by check_onnx instead
        torch.onnx.export(
            wrapper, (x,), str(out), dynamo=False, opset_version=opset,
            input_names=[INPUT_NAME], output_names=[OUTPUT_NAME],
            dynamic_axes={INPUT_NAME: names, OUTPUT_NAME: names},
        )
    return out


@dataclass
class OnnxCheck:
    """What `check_onnx` found: per input shape the largest absolute difference."""

    path: str
    max_abs_diff: float
    output_std: float
    shapes: dict[str, float] = field(default_factory=dict)
    onnxruntime: str = ""

    def to_dict(self) -> dict[str, Any]:
        return {"path": self.path, "max_abs_diff": self.max_abs_diff, "output_std": self.output_std,
                "shapes": self.shapes, "onnxruntime": self.onnxruntime}


def check_onnx(model: LoadedModel | str | Path | None, onnx_path: str | Path,
               shapes: list[tuple[int, ...]] | None = None) -> OnnxCheck:
    """Run ``onnx_path`` with onnxruntime on inputs of several spatial shapes and compare
    with livestain's prediction (`reference_output`). Default shapes: the export's and an
    odd one that needs padding (so the dynamic axes are exercised)."""
    _onnx_available()
    import onnx
    import onnxruntime as ort

    model = _load(model)
    onnx.checker.check_model(str(onnx_path))
    m = 2**model.meta.config.depth
    if shapes is None:
        base = input_shape(model)[2:]
        shapes = [tuple(base), tuple(max(m, s - m // 2 - 1) for s in base)]  # odd: padded inside
    session = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    diffs: dict[str, float] = {}
    std = 0.0
    for i, spatial in enumerate(shapes):
        x = example_input(model, tuple(spatial), seed=i)
        got = session.run(None, {INPUT_NAME: x})[0]
        ref = reference_output(model, x)
        if got.shape != ref.shape:
            raise ExportError(f"ONNX output shape {got.shape} differs from torch's {ref.shape} for input {x.shape}")
        diffs["x".join(map(str, x.shape))] = float(np.abs(got - ref).max())
        std = max(std, float(ref.std()))
    return OnnxCheck(str(onnx_path), max(diffs.values()), std, diffs, ort.__version__)


# ------------------------------------------------------------------ bioimage.io


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _axes(model: LoadedModel, output: bool) -> list[dict[str, Any]]:
    cfg = model.meta.config
    m = 2**cfg.depth
    spatial = ("z", "y", "x") if cfg.mode == "3d" else ("y", "x")
    vox = dict(zip(("z", "y", "x"), model.meta.voxel_size_um))
    if output:
        channels = list(cfg.structures)
    elif cfg.mode == "3d":
        channels = ["brightfield"]
    else:
        channels = [f"brightfield_plane{i}" for i in range(cfg.z_window)]
    axes: list[dict[str, Any]] = [{"type": "batch", "size": 1}, {"type": "channel", "channel_names": channels}]
    for a in spatial:
        size: Any = {"tensor_id": "brightfield", "axis_id": a} if output else {"min": m, "step": 1}
        axes.append({"type": "space", "id": a, "size": size, "unit": "micrometer", "scale": float(vox[a])})
    return axes


def _cover(path: Path, x: np.ndarray, y: np.ndarray, structures: tuple[str, ...]) -> Path:
    from .evaluate import agg_figure

    fig = agg_figure()
    n = 1 + len(structures)
    fig.set_size_inches(2.6 * n, 2.8)
    axes = fig.subplots(1, n, squeeze=False)[0]
    xi = x[0, 0, x.shape[2] // 2] if x.ndim == 5 else x[0, x.shape[1] // 2]
    panels = [(xi, "brightfield")]
    for i, s in enumerate(structures):
        panels.append((y[0, i, y.shape[2] // 2] if y.ndim == 5 else y[0, i], s))
    for ax, (img, title) in zip(axes, panels):
        ax.imshow(img, cmap="gray")
        ax.set_title(title, fontsize=9)
        ax.set_axis_off()
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    return path


def build_bioimageio(model: LoadedModel | str | Path | None, out: str | Path,
                     sample: np.ndarray | None = None, authors: list[str] | None = None,
                     license: str = "BSD-3-Clause") -> dict[str, Any]:
    """Write a bioimage.io model package (format 0.5) to ``out`` (a folder, or a .zip,
    which is built in the folder of the same name without .zip, kept beside it).

    Contents: ``rdf.yaml``, ``weights.onnx`` (`export_onnx`: normalisation included, so
    no preprocessing is declared), ``test_input.npy`` / ``test_output.npy`` (``sample``,
    a raw input of the export's shape, or a synthetic brightfield-like one; the output
    from livestain's torch model) and the same as ``sample_*.tif``, ``cover.png`` and
    ``README.md``. Then checks that onnxruntime reproduces the test output
    (`check_onnx`) and validates the package (`validate_bioimageio`). Returns
    ``{"folder", "onnx": OnnxCheck dict, "validation": dict, "zip"?}``.
    """
    import yaml

    model = _load(model)
    cfg = model.meta.config
    out = Path(out)
    folder = out.with_suffix("") if out.suffix == ".zip" else out
    if folder.exists() and any(folder.iterdir()):
        if not (folder / "rdf.yaml").is_file():
            raise ExportError(f"{folder} exists and is not a bioimage.io package; choose an empty or new folder")
        shutil.rmtree(folder)  # an earlier export of a package: replaced
    folder.mkdir(parents=True, exist_ok=True)
    weights = export_onnx(model, folder / "weights.onnx")
    x = example_input(model) if sample is None else np.asarray(sample, np.float32)
    if x.shape[:2] != input_shape(model)[:2] or x.ndim != len(input_shape(model)):
        raise ExportError(f"sample of shape {x.shape} does not fit the model's input {input_shape(model)}")
    y = reference_output(model, x)
    np.save(folder / "test_input.npy", x)
    np.save(folder / "test_output.npy", y)
    import tifffile

    tifffile.imwrite(folder / "sample_input.tif", x)
    tifffile.imwrite(folder / "sample_output.tif", y)
    onnx_check = check_onnx(model, weights, shapes=[tuple(x.shape[2:])])
    _cover(folder / "cover.png", x, y, cfg.structures)
    metrics = model.meta.extra.get("val_pearson") or {}
    (folder / "README.md").write_text(
        f"# {model.path.stem} (livestain)\n\n"
        f"Label-free prediction of {', '.join(cfg.structures)} from brightfield "
        f"({cfg.mode.upper()} U-Net, depth {cfg.depth}, {cfg.base_channels} base channels"
        + (f", {cfg.z_window}-plane window, output: {cfg.target_2d}" if cfg.mode == "2.5d" else "")
        + ").\n\nThe input is the raw brightfield (float32); percentile normalisation "
        f"(median centred, scaled by the {model.meta.norm.p_low}-{model.meta.norm.p_high} percentile "
        "range over the whole input) is part of the ONNX graph, so no preprocessing is declared. "
        "Outputs are in z-score units of each structure.\n\n"
        f"Training voxel size (z, y, x): {tuple(model.meta.voxel_size_um)} um; resample other data to it.\n\n"
        + (f"Validation Pearson r: {json.dumps(metrics)}\n\n" if metrics else "")
        + f"Exported by livestain from {model.name}.\n\n"
        "# Validation\n\n"
        "`test_input.npy` -> `test_output.npy` is livestain's own (torch) prediction; the ONNX "
        f"weights reproduce it to a largest absolute difference of {onnx_check.max_abs_diff:.2e} "
        "(onnxruntime, at export). Model quality: see the validation Pearson r above and the "
        "livestain README.\n"
    )
    rdf = {
        "type": "model",
        "format_version": "0.5.4",
        "name": f"livestain {model.path.stem}",
        "description": f"Label-free prediction of {', '.join(cfg.structures)} from brightfield "
        f"({cfg.mode} U-Net, livestain).",
        "authors": [{"name": a} for a in (authors or ["livestain"])],
        "cite": [FNET_CITATION],
        "license": license,
        "tags": ["label-free", "virtual-staining", "brightfield", "unet", cfg.mode, *cfg.structures],
        "documentation": "README.md",
        "covers": ["cover.png"],
        "timestamp": datetime.datetime.now(datetime.timezone.utc).replace(microsecond=0).isoformat(),
        "inputs": [{
            "id": "brightfield",
            "description": "raw brightfield" + (" stack" if cfg.mode == "3d" else f", {cfg.z_window} planes"),
            "axes": _axes(model, output=False),
            "test_tensor": {"source": "test_input.npy", "sha256": _sha256(folder / "test_input.npy")},
            "sample_tensor": {"source": "sample_input.tif", "sha256": _sha256(folder / "sample_input.tif")},
            "data": {"type": "float32"},
        }],
        "outputs": [{
            "id": "prediction",
            "description": "predicted structures, z-score units",
            "axes": _axes(model, output=True),
            "test_tensor": {"source": "test_output.npy", "sha256": _sha256(folder / "test_output.npy")},
            "sample_tensor": {"source": "sample_output.tif", "sha256": _sha256(folder / "sample_output.tif")},
            "data": {"type": "float32"},
        }],
        "weights": {"onnx": {"source": "weights.onnx", "sha256": _sha256(weights), "opset_version": OPSET}},
        "config": {
            "livestain": {"model": model.name, "config": cfg.to_dict(), "normalization": model.meta.norm.to_dict(),
                          "voxel_size_um": list(model.meta.voxel_size_um)},
            "bioimageio": {"reproducibility_tolerance": [
                {"relative_tolerance": 1e-3, "absolute_tolerance": 1e-3, "mismatched_elements_per_million": 0}
            ]},
        },
    }
    (folder / "rdf.yaml").write_text(yaml.safe_dump(rdf, sort_keys=False))
    report: dict[str, Any] = {"folder": str(folder), "onnx": onnx_check.to_dict(),
                              "validation": validate_bioimageio(folder / "rdf.yaml")}
    if out.suffix == ".zip":
        with zipfile.ZipFile(out, "w", zipfile.ZIP_DEFLATED) as z:
            for p in sorted(folder.iterdir()):
                z.write(p, p.name)
        report["zip"] = str(out)
    return report


def validate_bioimageio(rdf_path: str | Path, run_model: bool = True) -> dict[str, Any]:
    """Validate a package with the bioimage.io tools that are installed.

    With ``bioimageio.core`` (and ``run_model``): its ``test_model``, which validates the
    format and runs the ONNX weights on the test input (and on larger inputs) against
    the test output. With only ``bioimageio.spec``: format validation, with the
    package's files read and their sha256 checked. Returns ``{"tool", "status",
    "checks": [name: status], "errors": [...], "warnings": [...]}``; status ``passed``
    (model test), ``valid-format`` (format only), ``failed`` or ``skipped`` (neither
    installed).
    """
    rdf_path = Path(rdf_path)
    summary = None
    tool = ""
    if run_model:
        try:
            from bioimageio.core import __version__ as core_version
            from bioimageio.core import test_model
        except Exception:  # noqa: BLE001 - missing, or broken by incompatible versions
            pass
        else:
            summary = test_model(rdf_path)
            tool = f"bioimageio.core {core_version} test_model"
    if summary is None:
        try:
            from bioimageio.spec import ValidationContext, load_description
            from bioimageio.spec import __version__ as spec_version
        except ImportError as e:
            return {"tool": "", "status": "skipped", "checks": [], "warnings": [],
                    "errors": [f"bioimageio.spec is not installed ({e}); pip install bioimageio.spec"]}
        with ValidationContext(root=rdf_path.parent, perform_io_checks=True):
            summary = load_description(rdf_path).validation_summary
        tool = f"bioimageio.spec {spec_version} format validation"
    return {
        "tool": tool,
        "status": str(summary.status),
        "checks": [f"{d.name}: {d.status}" for d in summary.details],
        "errors": [_short(f"{'.'.join(map(str, e.loc))}: {e.msg}") for d in summary.details for e in d.errors],
        "warnings": [_short(f"{'.'.join(map(str, w.loc))}: {w.msg}") for d in summary.details for w in d.warnings],
    }


def _short(text: str, limit: int = 400) -> str:
    """One validation message, cut (a bad licence lists every SPDX identifier)."""
    return text if len(text) <= limit else text[: limit - 3] + "..."
