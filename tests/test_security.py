"""Daemons listen on loopback only, unless CURVE keys encrypt and authenticate peers."""

from __future__ import annotations

import threading

import numpy as np
import pytest
import zmq

from livestain import wire
from livestain.acquisition.control import send_command
from livestain.acquisition.streaming import DaemonSockets
from livestain.security import SecurityError, create_keys, is_loopback


def test_loopback_detection() -> None:
    assert is_loopback("127.0.0.1") and is_loopback("127.3.2.1") and is_loopback("::1")
    assert is_loopback("localhost")
    assert not is_loopback("0.0.0.0") and not is_loopback("192.168.1.20")
    assert not is_loopback("scope-pc.lab.example")


def test_listening_beyond_loopback_without_keys_is_refused(base_port) -> None:
    with pytest.raises(SecurityError, match="livestain keys"):
        DaemonSockets(wire.endpoints("0.0.0.0", base_port))
    # nothing was left bound: the same ports work on loopback
    DaemonSockets(wire.endpoints(base_port=base_port)).close()


def test_keys_are_not_overwritten(tmp_path) -> None:
    create_keys(tmp_path / "k")
    secret = (tmp_path / "k" / "server.key_secret").read_bytes()
    with pytest.raises(SecurityError, match="not overwriting"):
        create_keys(tmp_path / "k")
    assert (tmp_path / "k" / "server.key_secret").read_bytes() == secret


def _answer_control(daemon: DaemonSockets, stop: threading.Event) -> None:
    while not stop.is_set():
        if daemon.control.poll(50):
            command, _ = wire.decode_command(daemon.control.recv_multipart())
            daemon.control.send_multipart(wire.encode_reply(True, run_id="secure", echo=command))


def test_with_keys_only_key_holders_are_answered(tmp_path, base_port) -> None:
    keys = create_keys(tmp_path / "keys")
    strangers = create_keys(tmp_path / "other")  # valid keys, but not this daemon's
    eps = wire.endpoints(base_port=base_port)
    daemon = DaemonSockets(eps, keys=keys)
    stop = threading.Event()
    thread = threading.Thread(target=_answer_control, args=(daemon, stop), daemon=True)
    thread.start()
    try:
        reply = send_command(eps["control"], "status", timeout_s=5, keys=keys)
        assert reply["ok"] and reply["echo"] == "status"
        with pytest.raises(TimeoutError):
            send_command(eps["control"], "status", timeout_s=1)  # plain-text client
        with pytest.raises(TimeoutError):
            send_command(eps["control"], "status", timeout_s=1, keys=strangers)
        # the stack stream is encrypted too: a key holder receives it
        dealer = zmq.Context.instance().socket(zmq.DEALER)
        from livestain.security import apply_client

        apply_client(dealer, keys)
        dealer.connect(eps["stacks"])
        header = wire.StackHeader(kind="stack", run_id="r", seq=0, t=0, shape=[1, 4, 4],
                                  dtype="uint16", voxel_size_um=[1, 1, 1])
        daemon.offer(header, np.ones((1, 4, 4), np.uint16))
        dealer.send_multipart(wire.encode_ready("secure-worker"))
        for _ in range(100):
            daemon.receive_ready()
            daemon.pump()
            if dealer.poll(50):
                break
        got_header, got = wire.decode(dealer.recv_multipart(copy=False)[1:])
        dealer.close(0)
        assert got_header.run_id == "r" and int(got.sum()) == 16
    finally:
        stop.set()
        thread.join(5)
        daemon.close()
