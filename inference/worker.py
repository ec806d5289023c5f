"""The inference worker: stacks in, predictions out, on its own process (or host).

``livestain worker`` connects to a daemon's ``stacks`` socket (DEALER: it asks for one
stack at a time) and ``results`` socket (PUSH); it binds nothing, so any number of workers can share one daemon. Each
stack is decoded without copying (a read-only view on the ZeroMQ frame), predicted by
`Predictor`, and sent back with a header that names the source stack. Malformed
messages are logged, counted and dropped; the worker never dies of bad input.

A loopback daemon without CURVE keys serves only workers that present its per-run
token (`livestain.security.WorkerToken`: ``$LIVESTAIN_WORKER_TOKEN``, else the token
file of the daemon at the endpoint connected to, read again when it changes).

This module must not import pymmcore: a worker may run on a GPU host with no
microscope software.
"""

from __future__ import annotations

import logging
import os
import signal
import socket
import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import zmq

from livestain import wire
from livestain.security import TOKEN_ENV, WorkerToken, apply_client
from livestain.shm import ShmReader

from .ood import StackReport, check_stack, model_expectations, stack_confidence
from .predict import Predictor
from .signature import Likeness, check_likeness
from .uncertainty import own_u_half

log = logging.getLogger(__name__)


@dataclass
class WorkerCounts:
    received: int = 0
    predicted: int = 0
    malformed: int = 0
    failed: int = 0  # stacks it could not predict (each reported to the daemon)


class Worker:
    """Pulls stacks from a daemon and pushes predictions back.

    Parameters
    ----------
    stacks_endpoint, results_endpoint : str
        The daemon's ``stacks`` and ``results`` endpoints.
    predictor : Predictor
        The loaded model on its device.
    keys : str
        CURVE key folder; with keys the daemon knows us by key and no token is sent.
    token : str
        The daemon's worker token; None: `WorkerToken` finds it (environment, token file).
    """

    #: While idle, repeat the request for work this often (it is also the heartbeat).
    READY_EVERY_S = 1.0

    def __init__(
        self,
        stacks_endpoint: str,
        results_endpoint: str,
        predictor: Predictor,
        ctx: zmq.Context | None = None,
        keys: str | None = None,
        shm: bool = True,
        token: str | None = None,
        input_checks: bool = True,
        uncertainty: bool = False,
    ) -> None:
        self.predictor = predictor
        self.input_checks = input_checks
        #: predict with the per-voxel uncertainty (`inference.uncertainty`: 8 passes, 8x
        #: the time), sent as ``<structure>_uncertainty`` channels after the structures'
        self.uncertainty = uncertainty
        # with keys, CURVE authenticates us; without, the daemon wants its token
        self._token: WorkerToken | None = None if keys or token is not None else WorkerToken(stacks_endpoint)
        self._fixed_token = token or ""
        self.hostname = socket.gethostname()
        self.name = f"{self.hostname}:{os.getpid()}"
        # offer the same-host fast path; the daemon uses it only if it runs on this host
        self.shm = ShmReader() if shm else None
        self.ctx = ctx or zmq.Context.instance()
        # DEALER: ask for one stack at a time (see livestain.wire, "Work distribution")
        self.pull = self.ctx.socket(zmq.DEALER)
        self.pull.setsockopt(zmq.LINGER, 0)
        apply_client(self.pull, keys)
        self.pull.connect(stacks_endpoint)
        self.push = self.ctx.socket(zmq.PUSH)
        self.push.setsockopt(zmq.SNDHWM, 8)
        self.push.setsockopt(zmq.LINGER, 2000)
        self.push.setsockopt(zmq.SNDTIMEO, 10_000)
        apply_client(self.push, keys)
        self.push.connect(results_endpoint)
        self.counts = WorkerCounts()
        self._checker: ThreadPoolExecutor | None = None
        self._likeness: tuple[Any, Likeness | None] | None = None
        self._running = True
        self._waiting_logged = False

    def stop(self) -> None:
        self._running = False

    @property
    def token(self) -> str:
        """The worker token to present now ("" with keys, or while there is none)."""
        return self._token.get() if self._token is not None else self._fixed_token

    @property
    def token_path(self) -> Path | None:
        """The daemon's token file this worker reads (None: keys, or a token given)."""
        return self._token.path if self._token is not None else None

    def _may_ask(self) -> bool:
        """False while this worker needs the daemon's token and has none: a ready
        message without it would only be refused (and counted against the run)."""
        if self._token is None or self.token:
            self._waiting_logged = False
            return True
        if not self._waiting_logged:
            log.warning("no worker token yet (%s, or $%s): the daemon gives stacks only to "
                        "workers that present it; waiting for it", self._token.path, TOKEN_ENV)
            self._waiting_logged = True
        return False

    def serve(self, max_stacks: int | None = None, parent_pid: int | None = None) -> WorkerCounts:
        """Predict until `stop()` (or SIGTERM/SIGINT via `run_worker`).

        Asks the daemon for a stack, predicts it, asks again; while idle the request is
        repeated every second (the daemon's heartbeat of this worker). With
        ``parent_pid``, also stops when that process is gone: a worker the daemon
        spawned must not outlive a daemon that was killed.
        """
        last_ready = 0.0
        while self._running and (max_stacks is None or self.counts.predicted < max_stacks):
            if parent_pid is not None and os.getppid() != parent_pid:
                log.warning("daemon (pid %d) is gone; worker exits", parent_pid)
                break
            if time.monotonic() - last_ready > self.READY_EVERY_S and self._may_ask():
                self.pull.send_multipart(wire.encode_ready(
                    self.name, self.predictor.model.name, self.counts.received,
                    shm_host=self.hostname if self.shm is not None else "",
                    out_channels=len(self.predictor.structures), token=self.token))
                last_ready = time.monotonic()
            if not self.pull.poll(200):
                continue
            frames = self.pull.recv_multipart(copy=False)
            self.counts.received += 1
            last_ready = 0.0  # ask for the next one right after this one
            try:
                if len(frames) != 3 or frames[0].bytes != b"":
                    raise wire.WireError(f"expected [empty, header, payload], got {len(frames)} frames")
                header, stack = wire.decode(frames[1:])
                if header.kind != "stack":
                    raise wire.WireError(f"expected a stack, got a {header.kind}")
                if header.shm:
                    if self.shm is None:
                        raise wire.WireError("a shared-memory stack, but this worker did not offer it")
                    stack = self.shm.view(header.shm, header.shape, header.dtype)
            except (wire.WireError, OSError, ValueError) as e:  # OSError: no such segment
                self.counts.malformed += 1
                log.warning("dropped malformed message #%d: %s", self.counts.malformed, e)
                continue
            self.handle(header, stack)
            del stack  # no view of a segment outlives its stack: trim may unmap it
            if self.shm is not None:
                self.shm.trim()
        return self.counts

    def _send_failure(self, header: wire.StackHeader, error: str) -> None:
        """Tell the daemon this stack cannot be predicted here, so it neither waits for
        it nor takes this (healthy) worker for a hung one."""
        self.counts.failed += 1
        try:
            self.push.send_multipart(wire.encode_failure(
                header.run_id, header.seq, self.name, error, model=self.predictor.model.name,
                token=self.token or ""), flags=zmq.NOBLOCK)
        except zmq.Again:
            log.error("daemon not taking results; the failure of seq %d was not reported", header.seq)

    def _start_checks(self, header: wire.StackHeader, stack: np.ndarray) -> Future | None:
        """The input checks (`ood.check_stack`: blank, saturated, fluorescence, empty, out of
        focus, too thin for a 3D model, voxel size; `signature.check_likeness`: unlike a
        user model's training fields) on a thread beside the network: numpy
        releases the GIL, so on the live path they cost the prediction's latency next to
        nothing.

        They compare the stack with the current model (`ood.model_expectations`), read
        before the prediction routes it: the bundled brightfield and phase models expect
        the same (tests/test_uncertainty.py says so), so the routing cannot change them.
        Everything runs inside the submitted call, so a failing check lands in the future
        (`_confidence` logs it) and never costs the prediction."""
        if not self.input_checks:
            return None
        model, windowed = self.predictor.model, bool(getattr(self.predictor, "focus_window", False))

        def run_checks() -> StackReport:
            report = check_stack(stack, header.voxel_size_um,
                                 **model_expectations(getattr(model, "meta", None), windowed))
            check_likeness(report, self._likeness_of(model), stack, header.voxel_size_um)
            return report

        if self._checker is None:
            self._checker = ThreadPoolExecutor(1, thread_name_prefix="livestain-checks")
        return self._checker.submit(run_checks)

    def _likeness_of(self, model: Any) -> Likeness | None:
        """`signature.Likeness` of the current model, made once per model (a CPU copy of its
        first block: the check never shares the predicting network across threads)."""
        if self._likeness is None or self._likeness[0] is not model:
            self._likeness = (model, Likeness.of(model))
        return self._likeness[1]

    def _confidence(self, checks: Future | None, uncertainty: np.ndarray | None = None) -> dict:
        """The per-stack confidence and flags for the prediction header (empty if the
        checks failed: a check must never cost a prediction); with the uncertainty when
        it was predicted."""
        if checks is None and uncertainty is None:
            return {}
        try:
            report = checks.result() if checks is not None else None
            return stack_confidence(uncertainty, tuple(self.predictor.structures), report,
                                    u_half=own_u_half(getattr(self.predictor.model, "meta", None))).to_dict()
        except Exception as e:  # noqa: BLE001 - any failure of a check is logged, not fatal
            log.warning("input checks failed: %s", e)
            return {}

    def _modality(self) -> dict[str, str]:
        """What the predictor took the stack for, when it picks the bundled model by it."""
        est = getattr(self.predictor, "last_modality", None)
        return {"modality": est.modality, "modality_reason": est.reason} if est is not None else {}

    def handle(self, header: wire.StackHeader, stack) -> None:  # noqa: ANN001
        received_at = time.time()
        t0 = time.perf_counter()
        # the daemon's segment is sized for the structures alone: with the uncertainty the
        # prediction (twice the channels) goes over ZeroMQ
        segment = None if self.uncertainty else self._segment_for(header)
        checks = self._start_checks(header, stack)
        structures = list(self.predictor.structures)
        uncertainty = None
        try:
            if self.uncertainty:
                mean, uncertainty = self.predictor.predict_with_uncertainty(stack, header.voxel_size_um)
                pred = np.concatenate([mean, uncertainty])
                structures += [f"{s}{wire.UNCERTAINTY_SUFFIX}" for s in self.predictor.structures]
            else:
                pred = self.predictor.predict(stack, header.voxel_size_um, out=segment)
        except (ValueError, RuntimeError, MemoryError) as e:  # RuntimeError: e.g. out of GPU memory
            log.error("could not predict stack seq %d (t=%d p=%d): %s", header.seq, header.t, header.p, e)
            self._confidence(checks)  # the stack's view must outlive the thread reading it
            self._send_failure(header, f"{type(e).__name__}: {e}")
            return
        trust = self._confidence(checks, uncertainty)
        out = wire.StackHeader(
            kind="prediction",
            run_id=header.run_id,
            seq=header.seq,
            t=header.t,
            p=header.p,
            channel="prediction",
            shape=list(pred.shape),
            dtype="float32",
            voxel_size_um=header.voxel_size_um,
            position_um=header.position_um,
            acquired_start=header.acquired_start,
            acquired_end=header.acquired_end,
            structures=structures,
            source_seq=header.seq,
            model=self.predictor.model.name,
            worker=self.name,
            inference_s=time.perf_counter() - t0,
            **{k: round(v, 6) for k, v in getattr(self.predictor, "last_timing", {}).items()},
            torch=torch.__version__,
            device=self.predictor.device,
            stack_sent_at=header.sent_at,  # with received_at: the transport time
            received_at=received_at,
            **trust,  # confidence, confidence_per_structure, flags, flag_reasons
            **self._modality(),
            **({wire.TOKEN_FIELD: token} if (token := self.token) else {}),
        )
        if segment is not None:  # the pixels are in the daemon's segment already
            out.shm, out.sent_at = header.result_shm, time.time()
            frames = [out.to_json(), b""]
        else:
            frames = wire.encode(out, pred)
        try:
            self.push.send_multipart(frames, copy=False)
        except zmq.Again:
            log.error("daemon not taking results; prediction of seq %d dropped", header.seq)
            return
        self.counts.predicted += 1

    def _segment_for(self, header: wire.StackHeader) -> np.ndarray | None:
        """The daemon's lent segment as this stack's prediction array, or None when there
        is none or it is too small (then the prediction goes over ZeroMQ)."""
        if not header.result_shm or self.shm is None:
            return None
        output_shape = getattr(self.predictor, "output_shape", None)
        shape = list(output_shape(header.shape)) if output_shape else [len(self.predictor.structures), *header.shape]
        try:
            return self.shm.writable(header.result_shm, shape, "float32")
        except (OSError, ValueError) as e:  # gone, or smaller than this prediction
            log.info("prediction of seq %d goes over ZeroMQ: %s", header.seq, e)
            return None

    def close(self) -> None:
        self.pull.close(linger=0)
        self.push.close()
        if self._checker is not None:
            self._checker.shutdown(wait=True)
        if self.shm is not None:
            self.shm.close()


def run_worker(
    stacks_endpoint: str,
    results_endpoint: str,
    model: str | None = None,
    device: str | None = None,
    max_stacks: int | None = None,
    parent_pid: int | None = None,
    keys: str | None = None,
    exact: bool = False,
    compile: bool = False,
    uncertainty: bool = False,
) -> int:
    """Entry point of ``livestain worker``; returns the process exit code.

    The live path is `FastNet` (bf16 where the hardware has it); ``exact`` keeps the
    plain fp32 network, e.g. to compare against offline ``livestain predict``. Without
    ``keys`` the worker presents the daemon's token (`Worker`), from
    ``$LIVESTAIN_WORKER_TOKEN`` or the daemon's token file for the stacks endpoint.
    """
    predictor = Predictor(model, device, fast=True, bf16=False if exact else None, compile=compile)
    worker = Worker(stacks_endpoint, results_endpoint, predictor, keys=keys, uncertainty=uncertainty)

    def _stop(signum: int, _frame: object) -> None:
        worker.stop()

    signal.signal(signal.SIGTERM, _stop)
    signal.signal(signal.SIGINT, _stop)
    log.info(
        "worker %s ready: model %s on %s, asking %s for stacks",
        worker.name, predictor.model.name, predictor.device, stacks_endpoint,
    )
    try:
        worker.serve(max_stacks, parent_pid)
    finally:
        worker.close()
    return 0
