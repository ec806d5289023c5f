"""Runs on disk as the daemon writes them, and prediction sets written beside them.

A run folder (what ``acquisition.daemon`` writes; read here without importing it, since
batch prediction may run on a host with no microscope software)::

    RUN/run.json                          run id, plan, policies (streamed channels), model
    RUN/p000/t0000_brightfield.ome.tif    raw ZYX stack of a streamed channel
    RUN/p000/t0000_prediction.ome.tif     the live prediction, CZYX float32
    RUN/p000/t0000_dna.ome.tif            paired mode: real fluorescence, ZYX

or, stored as OME-Zarr (the default, `livestain.store`), ``RUN/p000/raw.ome.zarr`` and
``RUN/p000/prediction.ome.zarr``, whose stacks the run's journal lists; a stack's
``path`` is then its store reference (``...raw.ome.zarr#t=0&c=Brightfield``), which
`livestain.store.read_ref` reads like a file.

A prediction set is every stack of a run predicted again by one model with one set of
options, kept apart from the live predictions (never overwritten) and from the
``p???/`` folders (whose ``t*_<channel>`` files `inference.dataset` reads as channels)::

    RUN/predictions/<set>/set.json                  model, fingerprint, structures, options
    RUN/predictions/<set>/p000/t0000.ome.tif        CZYX float32, provenance in its header
    RUN/predictions/<set>/p000/t0001.failed.json    a stack that could not be predicted

The set's name starts with the model's ``name@fingerprint``, so two models (or two
versions of one) never share a set. A stack is written at most once: the prediction is
written to a private temporary file and then claimed under its final name with a hard
link, which fails if the name exists (`PredictionSet.claim`). A task repeated after a
worker died therefore finds the stack done and skips it, and the set is complete
exactly when every stack's file exists, which is what makes re-running resumable.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import re
import secrets
import time
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

try:
    import fcntl
except ImportError:  # Windows: no advisory locks; one call per set is then the user's to keep
    fcntl = None  # type: ignore[assignment]

from livestain.run_reader import RunReader
from livestain.stackio import fsync_dir, write_stack
from livestain.store import PREDICTION_IMAGE, RAW_IMAGE, is_zarr_ref, sibling_image, storage_of, zarr_channels

SUFFIX = ".ome.tif"
PREDICTIONS = "predictions"
SET_FILE = "set.json"
FAILED_SUFFIX = ".failed.json"
LOCK_FILE = ".lock"
#: the set name that means the daemon's own live predictions (``p000/t0000_prediction``)
LIVE = "live"
#: channel files that are not acquired channels
NOT_CHANNELS = {"prediction"}
_STACK_NAME = re.compile(r"^t(\d{4,})_(.+)\.ome\.tif$")
_POSITION_DIR = re.compile(r"^p(\d{3,})$")
_SET_NAME = re.compile(r"^[A-Za-z0-9._@+,=-]+$")


@dataclass(frozen=True)
class StackRef:
    """One acquired stack of a run: time point ``t``, position ``p``, its file."""

    run: Path
    t: int
    p: int
    path: Path
    #: the journal's sequence number and run id of the stack (a Zarr chunk carries no
    #: header of its own, so these travel with the reference; a TIFF has them inside)
    seq: int | None = None
    run_id: str | None = None

    @property
    def key(self) -> str:
        """``p000/t0000``: the stack's place, the same in the run and in every set."""
        return f"p{self.p:03d}/t{self.t:04d}"


def is_run(folder: Path) -> bool:
    """A folder the daemon wrote: a ``run.json``, or at least ``p???/t*_*.ome.tif`` files."""
    if (folder / "run.json").is_file():
        return True
    return any(_POSITION_DIR.match(d.name) and any(d.glob(f"t*_*{SUFFIX}")) for d in _subdirs(folder))


def find_runs(paths: Iterable[str | Path]) -> list[Path]:
    """The runs named: each path is a run folder, or an archive folder holding runs
    (any depth; ``predictions/`` folders are not searched). Sorted, no repeats."""
    runs: list[Path] = []
    for raw in paths:
        path = Path(raw).expanduser()
        if not path.is_dir():
            raise ValueError(f"{path} is not a folder; give a run folder (with run.json and p000/) "
                             "or a folder of runs")
        if is_run(path):
            found = [path]
        else:
            found = sorted(m.parent for m in path.rglob("run.json") if PREDICTIONS not in m.parts[len(path.parts):])
        if not found:
            raise ValueError(f"{path} holds no livestain run: no run.json and no p000/t0000_<channel>"
                             f"{SUFFIX} in it or below it; give the folder a run was written to")
        runs.extend(f.resolve() for f in found)
    return sorted(dict.fromkeys(runs))


def read_run_info(run: Path) -> dict[str, Any]:
    """``run.json`` (empty when the run has none, e.g. a copy of its stacks only)."""
    try:
        return json.loads((run / "run.json").read_text())
    except FileNotFoundError:
        return {}
    except (OSError, json.JSONDecodeError) as e:
        raise ValueError(f"{run / 'run.json'} cannot be read ({e}); copy it again from the "
                         "acquisition computer") from None


def run_channels(run: Path) -> dict[str, int]:
    """Acquired channels of a run (file names' channel part) with their number of stacks."""
    counts: dict[str, int] = {}
    for ref_channel in _stack_files(run):
        counts[ref_channel[1]] = counts.get(ref_channel[1], 0) + 1
    return counts


def input_channel(run: Path, requested: str | None = None) -> str:
    """The channel predicted from: ``requested``, else the run's streamed channel
    (``run.json`` policies), else ``brightfield``; it must have stacks in the run."""
    channels = run_channels(run)
    if requested:
        channel = requested.lower()
    else:
        streamed = read_run_info(run).get("policies", {}).get("stream_channels") or ["brightfield"]
        channel = str(streamed[0]).lower()
    if channel not in channels:
        have = ", ".join(f"{c} ({n})" for c, n in sorted(channels.items())) or "none"
        raise ValueError(f"run {run} has no {channel} stacks (p000/t0000_{channel}{SUFFIX}); it has: "
                         f"{have}. Pass --channel with one of those")
    return channel


def run_stacks(run: Path, channel: str) -> list[StackRef]:
    """Every stack of ``channel`` in a run, ordered by time point, then position."""
    refs = [StackRef(run, t, p, path, seq, run_id)
            for path, c, t, p, seq, run_id in _stack_files(run, with_index=True) if c == channel]
    return sorted(refs, key=lambda r: (r.t, r.p))


def live_prediction_path(ref: StackRef) -> Path:
    """The daemon's own prediction of a stack (``p000/t0000_prediction.ome.tif``, or its
    reference in ``p000/prediction.ome.zarr``)."""
    if is_zarr_ref(ref.path):
        return Path(f"{sibling_image(ref.path, PREDICTION_IMAGE)}#t={ref.t}")
    return ref.run / f"p{ref.p:03d}" / f"t{ref.t:04d}_prediction{SUFFIX}"


def channel_path(ref: StackRef, channel: str) -> Path:
    """Another channel of the same time point and position (paired fluorescence)."""
    if is_zarr_ref(ref.path):
        image = sibling_image(ref.path, RAW_IMAGE)
        names = {c.lower(): c for c in zarr_channels(image)}
        return Path(f"{image}#t={ref.t}&c={names.get(channel.lower(), channel)}")
    return ref.run / f"p{ref.p:03d}" / f"t{ref.t:04d}_{channel.lower()}{SUFFIX}"


def _subdirs(folder: Path) -> list[Path]:
    try:
        return [d for d in folder.iterdir() if d.is_dir()]
    except OSError:
        return []


def _stack_files(run: Path, with_index: bool = False) -> list[Any]:
    """(path or reference, channel in lower case[, t, p]) of every raw stack of a run."""
    out: list[Any] = []
    if storage_of(run) == "zarr":
        with RunReader(run) as reader:
            for e in reader.stacks():
                ref = Path(e.raw_ref)
                out.append((ref, e.channel.lower(), e.t, e.p, e.seq, e.info.get("run_id"))
                           if with_index else (ref, e.channel.lower()))
        return out
    for d in _subdirs(run):
        pm = _POSITION_DIR.match(d.name)
        if not pm:
            continue
        for f in d.iterdir():
            m = _STACK_NAME.match(f.name)
            if not m or m.group(2) in NOT_CHANNELS:
                continue
            if with_index:
                out.append((f, m.group(2), int(m.group(1)), int(pm.group(1)), None, None))
            else:
                out.append((f, m.group(2)))
    return out


# ---------------------------------------------------------------- prediction sets


@dataclass(frozen=True)
class SetSpec:
    """What a prediction set's numbers depend on: the model and the prediction options.

    Two calls with equal specs write the same set (and the second completes the first);
    a different spec gets another name, or is refused if it names an existing set.
    """

    model: str  # name@fingerprint
    fingerprint: str
    structures: tuple[str, ...]  # predicted and kept, in the file's channel order
    precision: str = "fast"  # "fast": the live worker's FastNet path; "exact": plain fp32
    tta: bool = False
    mode: str = "3d"
    target_2d: str = "plane"
    input_channel: str = "brightfield"
    model_structures: tuple[str, ...] = field(default=())

    def default_name(self) -> str:
        """``model@fingerprint`` plus what differs from the live defaults, e.g.
        ``bundled@41ee537acf28``, ``bundled@41ee537acf28+exact+tta+dna``."""
        parts = [self.model]
        if self.precision != "fast":
            parts.append(self.precision)
        if self.tta:
            parts.append("tta")
        if self.model_structures and tuple(self.structures) != tuple(self.model_structures):
            parts.append(",".join(self.structures))
        if self.input_channel != "brightfield":
            parts.append(f"from-{self.input_channel}")
        return "+".join(parts)

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["structures"] = list(self.structures)
        d["model_structures"] = list(self.model_structures)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> SetSpec:
        known = {k: d[k] for k in cls.__dataclass_fields__ if k in d}
        known["structures"] = tuple(known.get("structures", ()))
        known["model_structures"] = tuple(known.get("model_structures", ()))
        return cls(**known)


def check_set_name(name: str) -> str:
    if name == LIVE or not _SET_NAME.match(name) or name.startswith("."):
        raise ValueError(f"prediction set name {name!r} is not usable: use letters, digits and . _ @ + , = - "
                         f"only, not starting with a dot, and not {LIVE!r} (the live predictions)")
    return name


def list_sets(run: Path) -> list[str]:
    """Names of the prediction sets written in a run (folders with a set.json)."""
    folder = run / PREDICTIONS
    return sorted(d.name for d in _subdirs(folder) if (d / SET_FILE).is_file())


class PredictionSet:
    """One prediction set of one run: where each stack's prediction goes, and the
    exactly-once write that puts it there."""

    def __init__(self, run: str | Path, name: str) -> None:
        self.run = Path(run)
        self.name = check_set_name(name)
        self.folder = self.run / PREDICTIONS / name

    # ---------------------------------------------------- paths

    def path_for(self, ref: StackRef) -> Path:
        return self.folder / f"p{ref.p:03d}" / f"t{ref.t:04d}{SUFFIX}"

    def failure_path(self, ref: StackRef) -> Path:
        return self.folder / f"p{ref.p:03d}" / f"t{ref.t:04d}{FAILED_SUFFIX}"

    def is_done(self, ref: StackRef) -> bool:
        return self.path_for(ref).exists()

    # ---------------------------------------------------- the set's description

    def read_spec(self) -> SetSpec | None:
        try:
            return SetSpec.from_dict(json.loads((self.folder / SET_FILE).read_text())["spec"])
        except FileNotFoundError:
            return None
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise ValueError(f"{self.folder / SET_FILE} cannot be read ({e}); remove the set folder "
                             f"{self.folder} to predict it again, or pass --set with another name") from None

    def open(self, spec: SetSpec, extra: dict[str, Any] | None = None) -> None:
        """Create the set (or reopen it): an existing set must have been made with ``spec``;
        writing other numbers into it would make a set that is true of neither."""
        old = self.read_spec()
        if old is not None:
            if old != spec:
                diff = ", ".join(f"{k}: {getattr(old, k)!r} there, {getattr(spec, k)!r} now"
                                 for k in spec.__dataclass_fields__ if getattr(old, k) != getattr(spec, k))
                raise ValueError(f"prediction set {self.folder} was made with other settings ({diff}); "
                                 "pass --set with a new name, or remove that folder to redo it")
            return
        self.folder.mkdir(parents=True, exist_ok=True)
        doc = {"format": "livestain.prediction-set/1", "name": self.name, "spec": spec.to_dict(),
               "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"), **(extra or {})}
        _write_json_atomically(self.folder / SET_FILE, doc)

    # ---------------------------------------------------- writing

    def claim(
        self,
        ref: StackRef,
        array: np.ndarray,
        *,
        voxel_size_um: Sequence[float],
        info: dict[str, Any],
        channel_names: Sequence[str],
    ) -> bool:
        """Write a stack's prediction unless it exists; True if this call wrote it.

        The pixels go to a private temporary file first (written and fsynced by
        `write_stack`), which is then hard-linked to the final name: the link is atomic
        and fails if the name exists, so of two tasks predicting one stack (a worker
        thought dead, a second client) exactly one wins and the other's file is dropped.
        """
        final = self.path_for(ref)
        if final.exists():
            return False
        token = secrets.token_hex(4)  # names this write in the header: which attempt won
        tmp = final.with_name(f".{final.name}.{token}.tmp")
        write_stack(tmp, array, voxel_size_um=voxel_size_um, info={**info, "claim": token},
                    channel_names=list(channel_names))
        try:
            os.link(tmp, final)
        except FileExistsError:
            return False
        except OSError as e:
            if e.errno not in (errno.EPERM, errno.ENOTSUP, errno.EOPNOTSUPP, errno.EXDEV, errno.EMLINK):
                raise
            # a file system without hard links (some network shares, FAT): check, then
            # rename; two writers racing here leave one of two identical predictions
            if final.exists():
                return False
            os.replace(tmp, final)
        finally:
            tmp.unlink(missing_ok=True)
        fsync_dir(final.parent)
        self.failure_path(ref).unlink(missing_ok=True)
        return True

    def record_failure(self, ref: StackRef, reason: str, **details: Any) -> Path:
        """Say why a stack has no prediction (the next call tries it again). Not when
        another attempt has written it meanwhile: a stack is either done or failed."""
        path = self.failure_path(ref)
        if self.is_done(ref):
            return path
        path.parent.mkdir(parents=True, exist_ok=True)
        _write_json_atomically(path, {"t": ref.t, "p": ref.p, "source": str(ref.path), "reason": reason,
                                      "at": time.strftime("%Y-%m-%dT%H:%M:%S%z"), **details})
        return path

    def failures(self) -> list[dict[str, Any]]:
        """Every recorded failure of the set, by time point and position."""
        out = []
        for path in sorted(self.folder.glob(f"p*/t*{FAILED_SUFFIX}")):
            if path.with_name(path.name.replace(FAILED_SUFFIX, SUFFIX)).exists():
                continue  # written after all, by a later attempt
            try:
                out.append(json.loads(path.read_text()) | {"file": str(path)})
            except (OSError, json.JSONDecodeError):
                continue
        return sorted(out, key=lambda d: (d.get("t", 0), d.get("p", 0)))

    @contextlib.contextmanager
    def writing(self) -> Iterator[None]:
        """Hold the set's lock while a call predicts into it: two calls on one set would
        each clean up the other's temporary files (`clean_leftovers`)."""
        self.folder.mkdir(parents=True, exist_ok=True)
        fh = open(self.folder / LOCK_FILE, "a+")
        try:
            if fcntl is not None:
                try:
                    fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
                except BlockingIOError:
                    raise ValueError(f"another livestain predict-run is writing {self.folder}; wait for "
                                     "it to finish (or stop it), then run again to complete the set") from None
            yield
        finally:
            fh.close()  # closing releases the lock

    def clean_leftovers(self) -> int:
        """Remove temporary files of writes that were cut short (a killed worker); call
        only while no task of this set runs. Returns how many were removed."""
        n = 0
        for path in list(self.folder.glob("p*/.*.tmp")) + list(self.folder.glob("p*/.*.tmp.partial")):
            path.unlink(missing_ok=True)
            n += 1
        return n


def _write_json_atomically(path: Path, data: dict[str, Any]) -> None:
    tmp = path.with_name(f".{path.name}.{secrets.token_hex(4)}.tmp")
    try:
        tmp.write_text(json.dumps(data, indent=1, default=str))
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
