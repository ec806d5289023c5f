"""The wire protocol: round trips without copies, and every malformed message refused."""

from __future__ import annotations

import json

import numpy as np
import pytest
import zmq

from livestain import wire


def _header(**kw) -> wire.StackHeader:
    base = dict(kind="stack", run_id="r1", seq=3, t=2, p=1, channel="Brightfield",
                shape=[4, 5, 6], dtype="uint16", voxel_size_um=[1.0, 0.325, 0.325])
    return wire.StackHeader(**(base | kw))


def test_round_trip_over_a_real_socket_is_exact_and_zero_copy() -> None:
    ctx = zmq.Context.instance()
    a, b = ctx.socket(zmq.PAIR), ctx.socket(zmq.PAIR)
    port = a.bind_to_random_port("tcp://127.0.0.1")
    b.connect(f"tcp://127.0.0.1:{port}")
    arr = np.arange(4 * 5 * 6, dtype=np.uint16).reshape(4, 5, 6) * 7
    # large enough that pyzmq really sends it without copying
    big = np.random.default_rng(0).integers(0, 4000, (8, 128, 128), dtype=np.uint16)
    try:
        a.send_multipart(wire.encode(_header(), arr), copy=False)
        a.send_multipart(wire.encode(_header(shape=list(big.shape), seq=4), big), copy=False)
        h1, got1 = wire.decode(b.recv_multipart(copy=False))
        h2, got2 = wire.decode(b.recv_multipart(copy=False))
    finally:
        a.close(0)
        b.close(0)
    assert (h1.t, h1.p, h1.seq, h1.channel) == (2, 1, 3, "Brightfield")
    np.testing.assert_array_equal(got1, arr)
    np.testing.assert_array_equal(got2, big)
    assert h2.seq == 4 and h2.sent_at > 0
    # a view on the received frame, not a copy: read-only and not owning its data
    assert not got2.flags.writeable and not got2.flags.owndata


def test_prediction_header_must_name_structures_and_source() -> None:
    ok = _header(kind="prediction", shape=[2, 4, 5, 6], dtype="float32",
                 structures=["dna", "membrane"], source_seq=3)
    assert ok.source_seq == 3
    with pytest.raises(ValueError, match="structure names"):
        _header(kind="prediction", shape=[2, 4, 5, 6], dtype="float32", structures=["dna"], source_seq=3)
    with pytest.raises(ValueError, match="source_seq"):
        _header(kind="prediction", shape=[1, 4, 5, 6], dtype="float32", structures=["dna"])


def _frames(header: dict, payload: bytes) -> list[bytes]:
    return [json.dumps(header).encode(), payload]


GOOD = _header().model_dump(by_alias=True)


@pytest.mark.parametrize(
    ("frames", "reason"),
    [
        ([b"only one frame"], "expected 2 frames"),
        ([b"\xff\xfe not utf8", b""], "not JSON"),
        ([b"[1, 2]", b""], "not a JSON object"),
        (_frames(GOOD | {"schema": "other/9"}, b"\0" * 240), "schema"),
        (_frames(GOOD | {"dtype": "object"}, b"\0" * 240), "dtype"),
        (_frames(GOOD | {"shape": [4, 5]}, b"\0" * 240), "3 positive dimensions"),
        (_frames(GOOD | {"shape": [4, -5, 6]}, b"\0" * 240), "positive"),
        (_frames(GOOD, b"\0" * 239), "payload has 239 bytes"),
        (_frames({k: v for k, v in GOOD.items() if k != "run_id"}, b"\0" * 240), "run_id"),
        (_frames(GOOD | {"shape": [100000, 100000, 100000]}, b""), "exceeds"),
        (_frames(GOOD | {"shape": [2**32, 2**32, 1]}, b""), "positive dimensions"),
        (_frames(GOOD | {"shape": [2**70, 1, 1]}, b""), "positive dimensions"),
        (_frames(GOOD | {"shape": [2**19, 2**19, 2**19]}, b""), "exceeds"),
        (_frames(GOOD | {"note": "x" * 70_000}, b"\0" * 240), "header of"),
    ],
)
def test_malformed_messages_raise_wire_error_with_reason(frames, reason) -> None:
    with pytest.raises(wire.WireError, match=reason):
        wire.decode(frames)


def test_control_messages_round_trip_and_unknown_commands_are_refused() -> None:
    assert wire.decode_command(wire.encode_command("pause")) == ("pause", {})
    reply = wire.decode_reply(wire.encode_reply(True, run_id="r", stacks_acquired=2))
    assert reply["ok"] is True and reply["stacks_acquired"] == 2
    with pytest.raises(wire.WireError, match="unknown command"):
        wire.decode_command(wire.encode_command("format_disk"))
    with pytest.raises(wire.WireError):
        wire.decode_command([b"{}", b""])


def test_endpoints_default_to_loopback() -> None:
    eps = wire.endpoints()
    assert set(eps) == {"stacks", "results", "display", "control"}
    assert all(e.startswith("tcp://127.0.0.1:") for e in eps.values())
    assert len({e for e in eps.values()}) == 4
