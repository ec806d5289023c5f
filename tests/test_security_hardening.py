"""Hardening against what a new user hit: readable secret keys, strangers posing as
workers on a loopback daemon, client keys in debug logs, and a connection flood that
locked out ``livestain status``."""

from __future__ import annotations

import logging
import socket
import stat
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import zmq

from livestain import wire
from livestain.acquisition.control import send_command
from livestain.acquisition.streaming import DaemonSockets
from livestain.security import (
    TOKEN_DIR_ENV,
    TOKEN_ENV,
    WorkerToken,
    apply_client,
    create_keys,
    token_path,
)
from _helpers import run_predictions


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


@pytest.fixture(autouse=True)
def private_token_dir(tmp_path, monkeypatch) -> Path:
    """Token files of these tests go to a folder of their own."""
    folder = tmp_path / "runtime" / "livestain"
    monkeypatch.setenv(TOKEN_DIR_ENV, str(folder))
    monkeypatch.delenv(TOKEN_ENV, raising=False)
    return folder


# -- 1. key files ---------------------------------------------------------------------

def test_secret_keys_are_0600_in_a_0700_folder(tmp_path) -> None:
    folder = create_keys(tmp_path / "keys")
    assert _mode(folder) == 0o700
    for name in ("server", "client"):
        assert _mode(folder / f"{name}.key_secret") == 0o600
        assert _mode(folder / f"{name}.key") == 0o644  # public: clients need it
    assert sorted(p.name for p in folder.iterdir()) == [
        "client.key", "client.key_secret", "server.key", "server.key_secret"]


def test_an_existing_key_folder_is_tightened_and_old_readable_secrets_too(tmp_path) -> None:
    folder = tmp_path / "made-by-hand"
    folder.mkdir(mode=0o755)
    folder.chmod(0o755)
    create_keys(folder)
    assert _mode(folder) == 0o700
    # a secret left readable (an older `livestain keys`): tightened when it is loaded
    secret = folder / "client.key_secret"
    secret.chmod(0o644)
    sock = zmq.Context.instance().socket(zmq.DEALER)
    try:
        apply_client(sock, folder)
    finally:
        sock.close(0)
    assert _mode(secret) == 0o600


# -- 2. only the workers a stack was handed to, and only with the token ---------------

STACK = wire.StackHeader(kind="stack", run_id="r", seq=0, t=0, shape=[1, 2, 2], dtype="uint8",
                         voxel_size_um=[1, 1, 1])


def _prediction(worker: str, seq: int = 0, token: str = "", model: str = "real@1",
                run_id: str = "r") -> list:
    header = wire.StackHeader(
        kind="prediction", run_id=run_id, seq=seq, t=0, shape=[1, 1, 2, 2], dtype="float32",
        voxel_size_um=[1, 1, 1], structures=["dna"], source_seq=seq, model=model, worker=worker,
        **({wire.TOKEN_FIELD: token} if token else {}))
    return wire.encode(header, np.ones((1, 1, 2, 2), np.float32))


@pytest.fixture
def sockets_and_peers(base_port):  # noqa: ANN201
    """Daemon sockets, a DEALER to ask for stacks and a PUSH to answer, as a worker's."""
    eps = wire.endpoints(base_port=base_port)
    daemon = DaemonSockets(eps)
    ctx = zmq.Context.instance()
    dealer, push = ctx.socket(zmq.DEALER), ctx.socket(zmq.PUSH)
    dealer.connect(eps["stacks"])
    push.connect(eps["results"])
    yield daemon, dealer, push
    dealer.close(0)
    push.close(0)
    daemon.close()


def _ask(daemon: DaemonSockets, dealer: zmq.Socket, name: str, token: str = "") -> list:
    """A ready message from ``name``; what pump hands out in the next half second."""
    dealer.send_multipart(wire.encode_ready(name, token=token))
    handed = []
    deadline = time.monotonic() + 0.5
    while time.monotonic() < deadline and not handed:
        if daemon.stacks.poll(50):
            daemon.receive_ready()
        handed = daemon.pump()
    return handed


def _results(daemon: DaemonSockets, n: int) -> list:
    """``receive_result`` of the next ``n`` messages on the results socket."""
    got = []
    deadline = time.monotonic() + 5
    while len(got) < n and time.monotonic() < deadline:
        if daemon.results.poll(50):
            got.append(daemon.receive_result())
    assert len(got) == n
    return got


def test_a_prediction_from_a_worker_never_handed_the_stack_is_dropped(sockets_and_peers) -> None:
    daemon, dealer, push = sockets_and_peers
    token = daemon.token.value
    daemon.offer(STACK, np.zeros((1, 2, 2), np.uint8))
    assert _ask(daemon, dealer, "real-worker", token) == [(0, "real-worker")]
    # a stranger who even knows the token, answering a stack it was never given
    push.send_multipart(_prediction("EVIL", token=token, model="EVIL@000"))
    push.send_multipart(_prediction("real-worker", token=token))
    evil, real = _results(daemon, 2)
    assert evil is None and daemon.counts.malformed_results == 1
    assert real is not None and real[0].model == "real@1" and real[0].worker == "real-worker"
    # the token goes no further than the check: not into files, not to viewers
    assert wire.TOKEN_FIELD not in real[0].model_dump(by_alias=True)


def test_hand_overs_are_forgotten_when_a_stack_is_done(sockets_and_peers) -> None:
    daemon, dealer, push = sockets_and_peers
    handovers = daemon.handovers
    handovers.FINISHED_MEMORY = 3
    for seq in range(10):
        handovers.hand(seq, b"id-w", "w")
        (daemon.release if seq % 2 else daemon.discard)(seq)
    assert handovers.handed == {} and list(handovers._finished) == [7, 8, 9]
    # a late answer of a stack just done is still the worker's (the daemon drops the
    # duplicate); one from long ago is a stranger's
    assert handovers.was_handed(9, "w") and not handovers.was_handed(0, "w")
    assert not handovers.was_handed(9, "someone-else")


def test_without_the_token_a_peer_gets_no_stack_and_its_predictions_are_dropped(
        sockets_and_peers) -> None:
    daemon, dealer, push = sockets_and_peers
    daemon.offer(STACK, np.zeros((1, 2, 2), np.uint8))
    assert _ask(daemon, dealer, "stranger") == []
    assert _ask(daemon, dealer, "stranger", token="0" * 64) == []
    assert not dealer.poll(200)  # stacks are private data: nothing reached it
    assert daemon.counts.unauthenticated == 2 and "stranger" not in daemon.worker_heartbeats()
    assert _ask(daemon, dealer, "real-worker", daemon.token.value) == [(0, "real-worker")]
    # the name of the worker that holds the stack is not enough: the token is needed
    push.send_multipart(_prediction("real-worker", model="EVIL@000"))
    push.send_multipart(_prediction("real-worker", token="f" * 64, model="EVIL@000"))
    assert _results(daemon, 2) == [None, None]
    assert daemon.counts.unauthenticated == 4 and daemon.counts.malformed_results == 4


def test_the_token_file_is_private_follows_restarts_and_goes_at_close(
        base_port, private_token_dir, monkeypatch) -> None:
    eps = wire.endpoints(base_port=base_port)
    worker_side = WorkerToken(eps["stacks"])
    assert worker_side.get() == ""  # no daemon yet
    first = DaemonSockets(eps)
    old = first.token.value
    path = token_path("127.0.0.1", base_port)
    try:
        assert path.parent == private_token_dir and path.is_file()
        assert _mode(path) == 0o600 and _mode(path.parent) == 0o700
        assert worker_side.get() == first.token.value == path.read_text().strip()
        # `localhost` is the same daemon
        assert WorkerToken(f"tcp://localhost:{base_port}").get() == first.token.value
    finally:
        first.close()
    assert not path.exists()
    path.write_text("left by a daemon killed with -9\n")
    second = DaemonSockets(eps)  # e.g. `--resume` after a crash: a new token
    try:
        assert second.token.value != old and _mode(path) == 0o600
        assert worker_side.get() == second.token.value  # the worker follows the new file
        monkeypatch.setenv(TOKEN_ENV, "given-by-hand")
        assert WorkerToken(eps["stacks"]).get() == "given-by-hand"
    finally:
        second.close()


def test_a_daemon_with_keys_needs_no_token(tmp_path, base_port) -> None:
    keys = create_keys(tmp_path / "keys")
    daemon = DaemonSockets(wire.endpoints(base_port=base_port), keys=keys)
    try:
        assert daemon.token is None and not token_path("127.0.0.1", base_port).exists()
    finally:
        daemon.close()


class _StubPredictor:
    """A model that answers at once (the test is about who may answer, not how)."""

    structures = ("dna",)
    device = "cpu"
    model = type("M", (), {"name": "stub@test"})()

    def predict(self, stack: np.ndarray, voxel_size_um=None, out: np.ndarray | None = None) -> np.ndarray:
        pred = np.zeros((1, *stack.shape), np.float32)
        if out is not None:
            out[...] = pred
            return out
        return pred


def test_a_local_process_cannot_write_official_predictions(tmp_path, base_port) -> None:
    """The issue's attack on a whole daemon: a process with no key and no token floods
    the results socket with predictions named after the real worker."""
    from livestain.acquisition.daemon import Daemon
    from livestain.acquisition.policies import Policies
    from livestain.devices.simulated import SimulatedScope, build_simulated_core
    from livestain.inference.worker import Worker
    from livestain.launch import demo_sequence

    eps = wire.endpoints(base_port=base_port)
    daemon = Daemon(build_simulated_core(SimulatedScope()), demo_sequence(3, 0.3), tmp_path / "run",
                    eps, Policies(drain_timeout_s=20.0), report=lambda line: None)
    worker = Worker(eps["stacks"], eps["results"], _StubPredictor())
    attacker = zmq.Context.instance().socket(zmq.PUSH)
    attacker.setsockopt(zmq.SNDTIMEO, 100)
    attacker.connect(eps["results"])
    stop = threading.Event()

    def attack() -> None:
        while not stop.is_set():
            for seq in range(3):
                try:
                    attacker.send_multipart(_prediction(worker.name, seq, model="EVIL@000",
                                                        run_id=daemon.run_id))  # as `status` tells
                except zmq.Again:
                    pass
            time.sleep(0.01)

    threads = [threading.Thread(target=worker.serve, daemon=True),
               threading.Thread(target=attack, daemon=True)]
    for thread in threads:
        thread.start()
    try:
        summary = daemon.run()
    finally:
        stop.set()
        worker.stop()
        for thread in threads:
            thread.join(10)
        worker.close()
        attacker.close(0)
    assert summary.predicted == 3
    for _, info in run_predictions(tmp_path / "run"):
        assert info["model"] == "stub@test" and wire.TOKEN_FIELD not in info
    assert daemon.sockets.counts.unauthenticated > 0


# -- 4. zmq.auth debug lines ----------------------------------------------------------

def test_client_keys_never_reach_the_console_at_debug_level(tmp_path, base_port, caplog) -> None:
    """``livestain -v`` sets the root logger to DEBUG; zmq.auth logs every client's
    public key there unless its loggers are kept at WARNING."""
    keys = create_keys(tmp_path / "keys")
    client_public = (keys / "client.key").read_text().split('public-key = "')[1].split('"')[0]
    caplog.set_level(logging.DEBUG)
    eps = wire.endpoints(base_port=base_port)
    daemon = DaemonSockets(eps, keys=keys)
    stop = threading.Event()

    def answer() -> None:
        while not stop.is_set():
            if daemon.control.poll(50):
                daemon.control.recv_multipart()
                daemon.control.send_multipart(wire.encode_reply(True))

    thread = threading.Thread(target=answer, daemon=True)
    thread.start()
    try:
        assert send_command(eps["control"], "status", timeout_s=5, keys=keys)["ok"]
    finally:
        stop.set()
        thread.join(5)
        daemon.close()
    assert client_public not in caplog.text
    assert not [r for r in caplog.records if r.name.startswith("zmq.auth") and r.levelno < logging.WARNING]


# -- 5. a connection flood ------------------------------------------------------------

DAEMON_SCRIPT = textwrap.dedent("""
    import resource, sys, time
    from livestain import wire
    from livestain.acquisition.streaming import DaemonSockets
    base, seconds = int(sys.argv[1]), float(sys.argv[2])
    daemon = DaemonSockets(wire.endpoints(base_port=base))
    print(resource.getrlimit(resource.RLIMIT_NOFILE)[0], flush=True)
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        if daemon.control.poll(50):
            daemon.control.recv_multipart()
            daemon.control.send_multipart(wire.encode_reply(True))
    daemon.close()
""")


def _daemon_process(base_port: int, soft: int, hard: int,
                    seconds: float = 60) -> tuple[subprocess.Popen, int]:
    """A daemon's sockets in a process limited to ``soft``/``hard`` open files (a
    desktop session starts at 1024); returns it and its soft limit once listening."""
    import resource

    def limit() -> None:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))

    proc = subprocess.Popen([sys.executable, "-c", DAEMON_SCRIPT, str(base_port), str(seconds)],
                            stdout=subprocess.PIPE, text=True, preexec_fn=limit)
    line = proc.stdout.readline()
    assert line.strip().isdigit(), f"daemon did not start: {line!r}"
    return proc, int(line)


def _flood(port: int, n: int) -> list[socket.socket]:
    """``n`` raw TCP connections that never speak ZeroMQ, left open."""
    socks = []
    for _ in range(n):
        s = socket.socket()
        s.setblocking(False)
        try:
            s.connect(("127.0.0.1", port))
        except BlockingIOError:
            pass
        socks.append(s)
    return socks


def test_status_answers_quickly_after_a_flood_of_raw_connections(base_port) -> None:
    """More stalled connections than the daemon has descriptors: it can accept no one
    until their handshakes time out (libzmq's default: 30 s; ours: 1 s)."""
    proc, _ = _daemon_process(base_port, 256, 256)  # a hard limit it cannot raise
    control = wire.endpoints(base_port=base_port)["control"]
    flood: list[socket.socket] = []
    try:
        assert send_command(control, "status", timeout_s=5)["ok"]
        flood = _flood(base_port + 3, 320)
        time.sleep(0.5)  # the daemon has taken what it can
        # before: no answer for 23-35 s (TimeoutError here); the client's timeout is the bound
        assert send_command(control, "status", timeout_s=5)["ok"]
    finally:
        for s in flood:
            s.close()
        proc.kill()
        proc.wait()


def test_the_daemon_raises_its_open_file_limit_when_it_may(base_port) -> None:
    proc, soft = _daemon_process(base_port, 256, 4096, seconds=0)
    proc.wait(30)
    assert soft == 4096


def test_a_worker_without_the_token_waits_for_it_instead_of_asking(base_port) -> None:
    """Started before its daemon (no token file yet), a worker asks for nothing: its
    requests would only be refused and counted as the run's malformed messages."""
    from livestain.inference.worker import Worker

    eps = wire.endpoints(base_port=base_port)
    router = zmq.Context.instance().socket(zmq.ROUTER)  # a daemon that has no token yet
    router.bind(eps["stacks"])
    worker = Worker(eps["stacks"], eps["results"], _StubPredictor())
    thread = threading.Thread(target=worker.serve, daemon=True)
    thread.start()
    try:
        assert not router.poll(1500)
        path = worker.token_path
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text("a-new-token\n")
        assert router.poll(5000)
        assert wire.decode_ready(router.recv_multipart()[1:])[wire.TOKEN_FIELD] == "a-new-token"
    finally:
        worker.stop()
        thread.join(10)
        worker.close()
        router.close(0)
