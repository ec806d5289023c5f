"""Model checkpoints: one safetensors file, weights plus livestain's JSON metadata.

safetensors holds only tensors and a string header, so loading a checkpoint can never
run code (unlike pickle-based ``torch.save``). livestain's metadata (architecture,
structures, normalisation, voxel size, metrics, versions) rides in that header under
the key ``"livestain"``, so a model is one file that cannot lose its description.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from .model import UNet3D, UNetConfig
from .normalize import PercentileNorm

META_KEY = "livestain"
FORMAT = "livestain.checkpoint/1"
BUNDLED_NAME = "bundled"
#: The bundled model made for each transmitted-light modality (`livestain.modality`).
BUNDLED_NAMES = {"brightfield": BUNDLED_NAME, "phase": "bundled-phase"}


class CheckpointError(ValueError):
    """A model file that cannot be used, with what is wrong and what to do."""


@dataclass
class ModelMeta:
    """Everything besides the weights that predicting with a model needs.

    Attributes
    ----------
    config : UNetConfig
        Architecture and structure names.
    norm : PercentileNorm
        Input normalisation used in training.
    voxel_size_um : tuple[float, float, float]
        (z, y, x) voxel size of the training data.
    extra : dict
        Free-form provenance: training command, data fingerprint, metrics, versions.
    """

    config: UNetConfig
    norm: PercentileNorm = field(default_factory=PercentileNorm)
    voxel_size_um: tuple[float, float, float] = (1.0, 0.325, 0.325)
    extra: dict[str, Any] = field(default_factory=dict)

    def to_json(self) -> str:
        return json.dumps(
            {
                "format": FORMAT,
                "config": self.config.to_dict(),
                "normalization": self.norm.to_dict(),
                "voxel_size_um": list(self.voxel_size_um),
                "extra": self.extra,
                "versions": {"torch": torch.__version__},
            }
        )

    @classmethod
    def from_json(cls, text: str) -> ModelMeta:
        d = json.loads(text)
        if d.get("format") != FORMAT:
            raise ValueError(f"format {d.get('format')!r}, expected {FORMAT!r}")
        return cls(
            config=UNetConfig.from_dict(d["config"]),
            norm=PercentileNorm.from_dict(d["normalization"]),
            voxel_size_um=tuple(float(v) for v in d["voxel_size_um"]),  # type: ignore[arg-type]
            extra=d.get("extra", {}),
        )


@dataclass
class LoadedModel:
    """A model ready to predict, with its metadata and a short content fingerprint."""

    net: UNet3D
    meta: ModelMeta
    path: Path
    fingerprint: str

    @property
    def name(self) -> str:
        return f"{self.path.stem}@{self.fingerprint}"


def save_checkpoint(path: str | Path, net: UNet3D, meta: ModelMeta) -> Path:
    """Write weights and metadata to one ``.safetensors`` file."""
    path = Path(path).with_suffix(".safetensors")
    path.parent.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().cpu().contiguous() for k, v in net.state_dict().items()}
    save_file(state, str(path), metadata={META_KEY: meta.to_json()})
    return path


def bundled_model_path(modality: str = "brightfield") -> Path:
    """The small model shipped in the package for stacks of ``modality``: ``bundled``
    for brightfield (what ``livestain demo`` uses), ``bundled-phase`` for phase contrast
    (`livestain.modality`; the worker picks between them per stack)."""
    if modality not in BUNDLED_NAMES:
        raise ValueError(f"no bundled model for {modality!r}: choose one of {', '.join(BUNDLED_NAMES)}")
    return Path(str(resources.files("livestain.inference") / "models" / f"{BUNDLED_NAMES[modality]}.safetensors"))


def load_checkpoint(path: str | Path | None = None, device: str = "cpu") -> LoadedModel:
    """Load a checkpoint (the bundled model when ``path`` is None) without unpickling.

    Raises `CheckpointError` naming the file, the problem and the fix.
    """
    path = Path(path) if path is not None else bundled_model_path()
    if not path.is_file():
        raise CheckpointError(
            f"Model file {path} does not exist. Give the path of a .safetensors model "
            f"written by `livestain train`, or omit it to use the bundled model."
        )
    raw = path.read_bytes()
    try:
        from safetensors import safe_open

        with safe_open(str(path), framework="pt") as f:
            header = f.metadata() or {}
        meta = ModelMeta.from_json(header[META_KEY])
        state = load_file(str(path))
    except (SafetensorError, KeyError, ValueError, json.JSONDecodeError, OSError) as e:
        raise CheckpointError(
            f"Model file {path} is not a usable livestain checkpoint ({e}). It may be "
            f"truncated or from another tool: copy it again, or retrain with `livestain train`."
        ) from None
    net = UNet3D(meta.config)
    try:
        net.load_state_dict(state, strict=True)
    except RuntimeError as e:
        raise CheckpointError(
            f"Model file {path} does not match its own architecture description "
            f"({str(e).splitlines()[0]}); the file is damaged: copy or retrain it."
        ) from None
    net.eval().to(device)
    fingerprint = hashlib.sha256(raw).hexdigest()[:12]
    return LoadedModel(net=net, meta=meta, path=path, fingerprint=fingerprint)
