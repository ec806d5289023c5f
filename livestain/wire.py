"""The livestain wire protocol: the one contract between daemon, workers and viewers.

Every message is a ZeroMQ multipart message of exactly two frames::

    [ header: UTF-8 JSON object , payload: raw C-contiguous array bytes ]

The header describes the payload completely (``shape``, ``dtype``, byte order is
little-endian), so a client in any language can decode it without livestain. Control
messages (``kind`` = ``"command"`` / ``"reply"``) carry an empty payload.

Sockets and who calls whom (all bound by the daemon on 127.0.0.1 by default)::

    stacks   daemon ROUTER <--bind--> workers DEALER (connect) "ready" in, one stack out
    results  daemon PULL  <--bind--  workers PUSH  (connect)   predictions back
    display  daemon PUB   --bind-->  viewers SUB   (connect)   every stack and prediction
    control  daemon REP   <--bind--  clients REQ   (connect)   status / pause / resume / stop

Workers and viewers only connect, so any number of them may come and go (on this
host or, when the user binds elsewhere, another one) without the daemon noticing.

Work distribution: a worker asks for work with a ``ready`` message (``[b"", ready]``
from its DEALER; repeated every second while idle, which doubles as its heartbeat) and
the daemon answers with exactly one stack (``[b"", header, payload]``), the newest it
has. So no stack ever waits in a worker's queue while a newer one exists, and each
worker holds at most one stack at a time.

Headers (``kind``):

``stack``
    One raw z-stack from the microscope: ``shape`` = [z, y, x].
``prediction``
    One predicted stack: ``shape`` = [structure, z, y, x], ``structures`` names the
    channels, ``source_seq`` is the ``seq`` of the stack it was predicted from.

Who may be a worker: on a loopback daemon without CURVE keys, only peers that present
the daemon's per-run worker token (``token`` in ``ready`` and in every prediction
header; `livestain.security.DaemonToken`). With keys, CURVE authenticates them.

Failure semantics: a receiver that gets a message it cannot decode (`decode` raises
`WireError`) logs one line, counts it and drops it; it never crashes. The daemon never
blocks on a slow peer (non-blocking sends with bounded high-water marks); a worker
waits up to 10 s for the daemon to take a prediction, then drops it (the daemon will
ask again for that stack).
"""

from __future__ import annotations

import json
import math
import time
from typing import Any, Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from livestain.run_status import RunStatus  # noqa: F401 - part of the contract: the control reply's body

#: Bumped on any incompatible change; receivers reject other versions.
SCHEMA = "livestain.wire/1"

#: dtypes allowed on the wire (little-endian).
DTYPES = ("uint8", "uint16", "float32")

DEFAULT_HOST = "127.0.0.1"
DEFAULT_BASE_PORT = 5560
#: Port offsets from the base port, in the order of the socket table above.
PORT_OFFSETS = {"stacks": 0, "results": 1, "display": 2, "control": 3}

#: Largest payload a receiver accepts (4 GiB), so a corrupt header cannot ask for more.
MAX_PAYLOAD_BYTES = 4 * 1024**3
#: Largest size of any one dimension.
MAX_DIMENSION = 1 << 20
#: Largest header: headers are copied into files, so a peer must not make them huge.
MAX_HEADER_BYTES = 64 * 1024
#: Header field of ``ready`` messages and predictions that carries the worker token.
TOKEN_FIELD = "token"
#: A prediction's channel ``<structure>_uncertainty`` (after all the structures') holds that
#: structure's per-voxel uncertainty: the expected absolute error in z-score units
#: (workers started with ``--uncertainty``).
UNCERTAINTY_SUFFIX = "_uncertainty"


class WireError(ValueError):
    """A message that does not follow this protocol; receivers drop it and count it."""


def endpoints(host: str = DEFAULT_HOST, base_port: int = DEFAULT_BASE_PORT) -> dict[str, str]:
    """The four tcp endpoints of one daemon, by socket name."""
    return {name: f"tcp://{host}:{base_port + off}" for name, off in PORT_OFFSETS.items()}


class StackHeader(BaseModel):
    """Header of a ``stack`` or ``prediction`` message.

    Attributes
    ----------
    schema_ : str
        Always `SCHEMA` (JSON key ``schema``).
    kind : "stack" | "prediction"
        What the payload is.
    run_id : str
        The acquisition run the data belongs to.
    seq : int
        Sequence number of the stack in its run, from 0, in acquisition order.
    t, p : int
        Time point and stage position indices of the plan (the useq event index).
    channel : str
        Channel (config preset) of a raw stack, e.g. ``"Brightfield"``.
    shape : list[int]
        Payload shape: [z, y, x] for stacks, [structure, z, y, x] for predictions.
    dtype : str
        Payload dtype, one of `DTYPES`, little-endian, C order.
    voxel_size_um : list[float]
        [z, y, x] voxel size in micrometres.
    position_um : list[float]
        Stage [x, y, z] of the stack's first plane.
    acquired_start, acquired_end : float
        Unix time of the first and last plane.
    path : str
        Where the daemon wrote the stack on its host (informational).
    structures : list[str]
        Prediction only: the name of each output channel.
    source_seq : int
        Prediction only: ``seq`` of the source stack.
    model : str
        Prediction only: model name and fingerprint.
    worker : str
        Prediction only: which worker produced it.
    inference_s : float
        Prediction only: seconds the worker spent predicting (pre/post-processing included).
    sent_at : float
        Unix time the message was sent.
    shm : str
        Same-host fast path (`livestain.shm`): the name of the shared-memory segment
        holding the pixels; the payload frame is then empty. Only sent to a worker whose
        ready message offered it from the daemon's own host. On a prediction: the
        segment (the stack's ``result_shm``) the worker wrote the prediction into.
    result_shm : str
        Stack only, same-host fast path: a segment the daemon lends for this stack's
        prediction; a worker whose prediction fits writes it there and replies with
        ``shm`` set to this name and an empty payload.
    token : str
        Prediction only, an extra field (`TOKEN_FIELD`): the daemon's worker token (see
        `livestain.security.DaemonToken`). The daemon removes it (`pop_token`) before
        the header goes anywhere else: it is a secret, never written to a file.
    """

    model_config = ConfigDict(extra="allow", populate_by_name=True)

    schema_: str = Field(SCHEMA, alias="schema")
    kind: Literal["stack", "prediction"]
    run_id: str
    seq: int = Field(ge=0)
    t: int = Field(ge=0)
    p: int = Field(0, ge=0)
    channel: str = ""
    shape: list[int] = Field(min_length=1, max_length=4)
    dtype: str
    voxel_size_um: list[float] = Field(min_length=3, max_length=3)
    position_um: list[float] = Field(default_factory=lambda: [0.0, 0.0, 0.0])
    acquired_start: float = 0.0
    acquired_end: float = 0.0
    path: str = ""
    structures: list[str] = Field(default_factory=list)
    source_seq: int | None = None
    model: str = ""
    worker: str = ""
    inference_s: float = 0.0
    sent_at: float = 0.0
    shm: str = ""
    result_shm: str = ""

    @model_validator(mode="after")
    def _check(self) -> StackHeader:
        if self.schema_ != SCHEMA:
            raise ValueError(f"schema {self.schema_!r} is not {SCHEMA!r}")
        if self.dtype not in DTYPES:
            raise ValueError(f"dtype {self.dtype!r} is not one of {DTYPES}")
        want = 3 if self.kind == "stack" else 4
        if len(self.shape) != want or any(not 0 < n <= MAX_DIMENSION for n in self.shape):
            raise ValueError(f"a {self.kind} needs {want} positive dimensions, got {self.shape}")
        if self.kind == "prediction":
            if len(self.structures) != self.shape[0]:
                raise ValueError(
                    f"{len(self.structures)} structure names for {self.shape[0]} channels"
                )
            if self.source_seq is None:
                raise ValueError("a prediction must name its source_seq")
        if self.nbytes > MAX_PAYLOAD_BYTES:
            raise ValueError(f"payload of {self.nbytes} bytes exceeds {MAX_PAYLOAD_BYTES}")
        return self

    @property
    def nbytes(self) -> int:
        # Python ints: a hostile shape must not wrap around to a small number
        return math.prod(int(n) for n in self.shape) * np.dtype(self.dtype).itemsize

    def to_json(self) -> bytes:
        return self.model_dump_json(by_alias=True).encode()


def pop_token(header: StackHeader) -> str:
    """Remove the worker token from a received header and return it ("" if absent).

    Headers are copied into prediction files and published to viewers; the token must
    go no further than the check.
    """
    extra = header.model_extra
    token = extra.pop(TOKEN_FIELD, "") if extra is not None else ""
    return token if isinstance(token, str) else ""


def encode(header: StackHeader, array: np.ndarray) -> list[Any]:
    """Frames for ``socket.send_multipart(frames, copy=False)``: no copy of the pixels.

    The array must already match the header; it is made C-contiguous little-endian only
    if it is not (one copy, then).
    """
    arr = np.ascontiguousarray(array, dtype=np.dtype(header.dtype).newbyteorder("<"))
    if list(arr.shape) != list(header.shape):
        raise WireError(f"array shape {arr.shape} does not match header shape {header.shape}")
    header.sent_at = time.time()
    return [header.to_json(), arr]


def decode(frames: list[Any]) -> tuple[StackHeader, np.ndarray]:
    """Header and a zero-copy, read-only array view of a received message.

    ``frames`` may be `bytes` or `zmq.Frame` (from ``recv_multipart(copy=False)``).
    Raises `WireError` with the reason for anything that is not a valid message.
    """
    if len(frames) != 2:
        raise WireError(f"expected 2 frames (header, payload), got {len(frames)}")
    raw_header, payload = frames
    buf_header = getattr(raw_header, "bytes", raw_header)
    if len(buf_header) > MAX_HEADER_BYTES:
        raise WireError(f"header of {len(buf_header)} bytes exceeds {MAX_HEADER_BYTES}")
    try:
        data = json.loads(buf_header)
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise WireError(f"header is not JSON: {e}") from None
    if not isinstance(data, dict):
        raise WireError("header is not a JSON object")
    try:
        header = StackHeader.model_validate(data)
    except ValidationError as e:
        first = e.errors()[0]
        where = ".".join(str(x) for x in first["loc"]) or "header"
        raise WireError(f"invalid header field {where}: {first['msg']}") from None
    buffer = getattr(payload, "buffer", payload)
    nbytes = memoryview(buffer).nbytes
    if header.shm:
        if nbytes:
            raise WireError("a shared-memory stack must carry an empty payload")
        return header, np.empty(0, np.uint8)  # the pixels are in the segment (livestain.shm)
    if nbytes != header.nbytes:
        raise WireError(f"payload has {nbytes} bytes, header says {header.nbytes}")
    dtype = np.dtype(header.dtype).newbyteorder("<")
    try:
        array = np.frombuffer(buffer, dtype=dtype).reshape(header.shape)
    except (ValueError, OverflowError) as e:  # belt and braces: the checks above should catch it
        raise WireError(f"payload does not fit the header: {e}") from None
    array.setflags(write=False)  # a view on the frame: consumers must copy to modify
    return header, array


# -- a stack a worker could not predict ----------------------------------------------------

#: Longest error text a failure carries (it goes into the daemon's log and journal).
MAX_ERROR_CHARS = 2000


class FailureHeader(BaseModel):
    """A worker's answer for a stack it could not predict (on the results socket).

    Without it a worker that failed on one stack said nothing: the daemon presumed it
    hung, killed the healthy worker and sent the stack again, without limit. With it the
    daemon retries the stack once (from disk, maybe on another worker) and then records
    it as not predictable, with the worker's reason.
    """

    model_config = ConfigDict(extra="allow", populate_by_name=True)

    schema_: str = Field(SCHEMA, alias="schema")
    kind: Literal["failure"] = "failure"
    run_id: str
    source_seq: int = Field(ge=0)
    worker: str = ""
    model: str = ""
    error: str = Field("", max_length=MAX_ERROR_CHARS)
    sent_at: float = 0.0

    @model_validator(mode="after")
    def _check(self) -> FailureHeader:
        if self.schema_ != SCHEMA:
            raise ValueError(f"schema {self.schema_!r} is not {SCHEMA!r}")
        return self


def encode_failure(run_id: str, source_seq: int, worker: str, error: str, model: str = "",
                   token: str = "") -> list[bytes]:
    """``[failure header, empty payload]`` for the results socket."""
    header = FailureHeader(run_id=run_id, source_seq=source_seq, worker=worker, model=model,
                           error=error[:MAX_ERROR_CHARS], sent_at=time.time())
    data = json.loads(header.model_dump_json(by_alias=True))
    if token:
        data[TOKEN_FIELD] = token
    return [json.dumps(data).encode(), b""]


def decode_result(frames: list[Any]) -> tuple[StackHeader, np.ndarray] | tuple[FailureHeader, None]:
    """A message on the results socket: a prediction (`decode`) or a `FailureHeader`."""
    if len(frames) == 2:
        raw = getattr(frames[0], "bytes", frames[0])
        if len(raw) <= MAX_HEADER_BYTES and b'"failure"' in raw:
            try:
                data = json.loads(raw)
            except (UnicodeDecodeError, json.JSONDecodeError) as e:
                raise WireError(f"header is not JSON: {e}") from None
            if isinstance(data, dict) and data.get("kind") == "failure":
                if memoryview(getattr(frames[1], "buffer", frames[1])).nbytes:
                    raise WireError("a failure carries an empty payload")
                try:
                    return FailureHeader.model_validate(data), None
                except ValidationError as e:
                    first = e.errors()[0]
                    where = ".".join(str(x) for x in first["loc"]) or "header"
                    raise WireError(f"invalid failure field {where}: {first['msg']}") from None
    return decode(frames)


def pop_failure_token(header: FailureHeader) -> str:
    """`pop_token` for a failure header."""
    extra = header.model_extra
    token = extra.pop(TOKEN_FIELD, "") if extra is not None else ""
    return token if isinstance(token, str) else ""


# -- work requests ----------------------------------------------------------------------

def encode_ready(
    worker: str, model: str = "", received: int = 0, shm_host: str = "", out_channels: int = 0,
    token: str = "",
) -> list[bytes]:
    """A worker's request for one stack (and its heartbeat): DEALER frames ``[b"", ready]``.

    ``shm_host`` (the worker's host name) offers the shared-memory fast path;
    ``out_channels`` (the structures it predicts) sizes the segment the daemon lends
    for each prediction on that path; ``token`` is the daemon's worker token (a
    loopback daemon without keys gives stacks to no one else).
    """
    msg = {"schema": SCHEMA, "kind": "ready", "worker": worker, "model": model,
           "received": received, "shm_host": shm_host, "out_channels": out_channels}
    if token:
        msg[TOKEN_FIELD] = token
    return [b"", json.dumps(msg).encode()]


def decode_ready(frames: list[Any]) -> dict[str, Any]:
    """The body of a ``ready`` message as the daemon's ROUTER sees it, minus the identity.

    ``received`` counts the stacks the worker has received so far: a ready message
    sent before the worker got its last stack (still queued when that stack left)
    is then recognised as stale and counts only as a heartbeat.
    """
    if len(frames) != 2 or getattr(frames[0], "bytes", frames[0]) != b"":
        raise WireError("a ready message is [empty delimiter, JSON body]")
    return _decode_control([frames[1], b""], "ready")


# -- control --------------------------------------------------------------------------

COMMANDS = ("status", "pause", "resume", "stop")


def encode_command(command: str, **args: Any) -> list[bytes]:
    """A control request: ``{"schema", "kind": "command", "command", "args"}`` + empty payload."""
    msg = {"schema": SCHEMA, "kind": "command", "command": command, "args": args}
    return [json.dumps(msg).encode(), b""]


def decode_command(frames: list[Any]) -> tuple[str, dict[str, Any]]:
    """Command name and arguments of a control request; `WireError` if malformed."""
    data = _decode_control(frames, "command")
    command = data.get("command")
    if command not in COMMANDS:
        raise WireError(f"unknown command {command!r}; known: {', '.join(COMMANDS)}")
    args = data.get("args", {})
    if not isinstance(args, dict):
        raise WireError("command args must be a JSON object")
    return command, args


def encode_reply(ok: bool, **body: Any) -> list[bytes]:
    """A control reply: ``{"schema", "kind": "reply", "ok", ...body}`` + empty payload."""
    msg = {"schema": SCHEMA, "kind": "reply", "ok": ok, **body}
    return [json.dumps(msg, default=str).encode(), b""]


def decode_reply(frames: list[Any]) -> dict[str, Any]:
    """The JSON body of a control reply; `WireError` if malformed."""
    return _decode_control(frames, "reply")


def _decode_control(frames: list[Any], kind: str) -> dict[str, Any]:
    if len(frames) != 2:
        raise WireError(f"expected 2 frames (header, empty payload), got {len(frames)}")
    raw = getattr(frames[0], "bytes", frames[0])
    try:
        data = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise WireError(f"{kind} is not JSON: {e}") from None
    if not isinstance(data, dict) or data.get("schema") != SCHEMA or data.get("kind") != kind:
        raise WireError(f"not a {SCHEMA} {kind}")
    return data
