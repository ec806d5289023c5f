"""The inference worker over real sockets: predicts valid stacks, survives junk."""

from __future__ import annotations

import threading
import time

import numpy as np
import pytest
import zmq

from livestain import wire
from livestain.acquisition.streaming import DaemonSockets
from livestain.inference.predict import Predictor
from livestain.inference.worker import Worker
from livestain.shm import ShmPool, ShmReader


def test_worker_predicts_stacks_and_drops_malformed_messages(base_port) -> None:
    eps = wire.endpoints(base_port=base_port)
    daemon = DaemonSockets(eps)
    worker = Worker(eps["stacks"], eps["results"], Predictor(None, "cpu"))
    thread = threading.Thread(target=worker.serve, kwargs={"max_stacks": 1}, daemon=True)
    thread.start()
    try:
        for _ in range(100):  # the worker asks for work as soon as it is up
            if daemon.stacks.poll(100):
                break
        identity, *rest = daemon.stacks.recv_multipart()
        assert wire.decode_ready(rest)["worker"] == worker.name
        junk = [[b"not json", b"x"], [b"{}", b""], [b"a", b"b", b"c"]]
        for frames in junk:  # straight to the worker, as a broken daemon would
            daemon.stacks.send_multipart([identity, b"", *frames])
        stack = np.random.default_rng(0).integers(2900, 3300, (8, 32, 32)).astype(np.uint16)
        header = wire.StackHeader(kind="stack", run_id="r", seq=7, t=3, p=1, shape=[8, 32, 32],
                                  dtype="uint16", voxel_size_um=[1.0, 0.325, 0.325])
        daemon.offer(header, stack)
        result = None
        for _ in range(300):
            daemon.receive_ready()
            daemon.pump()
            if daemon.results.poll(100):
                result = daemon.receive_result()
                break
        thread.join(timeout=30)
    finally:
        worker.close()
        daemon.close()
    assert result is not None
    out, pred = result
    assert (out.kind, out.source_seq, out.t, out.p, out.run_id) == ("prediction", 7, 3, 1, "r")
    assert pred.shape == (3, 8, 32, 32) and np.isfinite(pred).all()
    assert out.structures == ["dna", "membrane", "mitochondria"]
    assert worker.counts.malformed == 3 and worker.counts.predicted == 1


def test_newest_stack_goes_first_and_one_at_a_time(base_port) -> None:
    eps = wire.endpoints(base_port=base_port)
    daemon = DaemonSockets(eps)
    dealer = zmq.Context.instance().socket(zmq.DEALER)
    dealer.connect(eps["stacks"])
    try:
        for seq in range(3):
            header = wire.StackHeader(kind="stack", run_id="r", seq=seq, t=seq, shape=[1, 2, 2],
                                      dtype="uint8", voxel_size_um=[1, 1, 1])
            daemon.offer(header, np.full((1, 2, 2), seq, np.uint8))
        assert daemon.pump() == []  # nobody asked yet: nothing leaves
        got = []

        def ask(received: int) -> list:
            dealer.send_multipart(wire.encode_ready("w1", received=received, token=daemon.token.value))
            for _ in range(100):
                if daemon.stacks.poll(50):
                    break
            daemon.receive_ready()
            return daemon.pump()

        for received in range(2):
            sent = ask(received)
            assert [name for _, name in sent] == ["w1"]  # one ready, one stack
            frames = dealer.recv_multipart(copy=False)
            header, _ = wire.decode(frames[1:])
            got.append(header.seq)
        assert got == [2, 1]  # newest first
        # a ready sent before the worker got its last stack is a heartbeat, not a request
        assert ask(received=1) == [] and len(daemon.backlog) == 1
        assert "w1" in daemon.worker_heartbeats()
    finally:
        dealer.close(0)
        daemon.close()


@pytest.fixture
def daemon_and_results_push(base_port):  # noqa: ANN201
    """Daemon sockets and a PUSH connected to their results socket, as a worker's is."""
    eps = wire.endpoints(base_port=base_port)
    daemon = DaemonSockets(eps)
    push = zmq.Context.instance().socket(zmq.PUSH)
    push.connect(eps["results"])
    yield daemon, push
    push.close(linger=0)
    daemon.close()


def test_daemon_counts_and_drops_malformed_results(daemon_and_results_push) -> None:
    daemon, push = daemon_and_results_push
    bad_kind = wire.StackHeader(kind="stack", run_id="r", seq=0, t=0, shape=[1, 2, 2],
                                dtype="uint8", voxel_size_um=[1, 1, 1])
    push.send_multipart([b"garbage", b""])
    push.send_multipart(wire.encode(bad_kind, np.zeros((1, 2, 2), np.uint8)))
    got = []
    for _ in range(100):
        if daemon.results.poll(50):
            got.append(daemon.receive_result())
        if daemon.counts.malformed_results == 2:
            break
    assert got == [None, None]
    assert daemon.counts.malformed_results == 2


def test_a_second_daemon_on_the_same_ports_gets_a_clear_error(base_port) -> None:
    eps = wire.endpoints(base_port=base_port)
    first = DaemonSockets(eps)
    try:
        try:
            DaemonSockets(eps)
        except OSError as e:
            message = str(e)
        else:
            message = ""
    finally:
        first.close()
    assert "Another livestain daemon may be running" in message


def test_several_workers_share_the_load(base_port) -> None:
    eps = wire.endpoints(base_port=base_port)
    daemon = DaemonSockets(eps, backlog=16)
    predictor = Predictor(None, "cpu")
    workers = [Worker(eps["stacks"], eps["results"], predictor) for _ in range(2)]
    for i, w in enumerate(workers):
        w.name = f"worker-{i}"
    threads = [threading.Thread(target=w.serve, daemon=True) for w in workers]
    for t in threads:
        t.start()
    rng = np.random.default_rng(0)
    try:
        for seq in range(6):
            header = wire.StackHeader(kind="stack", run_id="r", seq=seq, t=seq, shape=[4, 32, 32],
                                      dtype="uint16", voxel_size_um=[1.0, 0.325, 0.325])
            daemon.offer(header, rng.integers(2900, 3300, (4, 32, 32)).astype(np.uint16))
        results = []
        for _ in range(600):
            daemon.receive_ready()
            daemon.pump()
            if daemon.results.poll(50):
                results.append(daemon.receive_result()[0])
            if len(results) == 6:
                break
    finally:
        for w in workers:
            w.stop()
        for t in threads:
            t.join(10)
        for w in workers:
            w.close()
        daemon.close()
    assert sorted(h.source_seq for h in results) == list(range(6))
    by_worker = {h.worker for h in results}
    assert by_worker == {"worker-0", "worker-1"}


def test_big_stacks_to_a_worker_on_this_host_travel_through_shared_memory(base_port) -> None:
    eps = wire.endpoints(base_port=base_port)
    daemon = DaemonSockets(eps)
    predictor = Predictor(None, "cpu")
    worker = Worker(eps["stacks"], eps["results"], predictor)
    thread = threading.Thread(target=worker.serve, kwargs={"max_stacks": 1}, daemon=True)
    thread.start()
    stack = np.random.default_rng(0).integers(2900, 3300, (16, 512, 512)).astype(np.uint16)  # 8 MiB
    header = wire.StackHeader(kind="stack", run_id="r", seq=5, t=0, shape=list(stack.shape),
                              dtype="uint16", voxel_size_um=[1.0, 0.325, 0.325])
    offered_at = time.time()
    try:
        daemon.offer(header, stack)
        result, handed = None, []
        for _ in range(600):
            daemon.receive_ready()
            handed += daemon.pump()
            if daemon.results.poll(100):
                result = daemon.receive_result()
                break
        assert handed == [(5, worker.name)]
        # the pixels went by one segment, the prediction came back in a second one
        assert daemon.pool is not None and daemon.pool.lent == 2
        assert result is not None
        out, pred = result
        assert out.shm and out.source_seq == 5 and pred.shape == (3, 16, 512, 512)
        # stage times stay meaningful on this path: stack sent, received, prediction sent
        extra = out.model_extra
        assert offered_at <= extra["stack_sent_at"] <= extra["received_at"] <= out.sent_at
        np.testing.assert_allclose(pred, predictor.predict(stack, [1.0, 0.325, 0.325]), atol=1e-5)
        daemon.release(5)
        assert daemon.pool.lent == 0
        thread.join(30)
    finally:
        worker.close()
        daemon.close()


def test_a_shared_memory_header_without_the_offer_is_refused() -> None:
    header = wire.StackHeader(kind="stack", run_id="r", seq=0, t=0, shape=[1, 2, 2], dtype="uint8",
                              voxel_size_um=[1, 1, 1], shm="psm_nonexistent")
    decoded, array = wire.decode([header.to_json(), b""])
    assert decoded.shm == "psm_nonexistent" and array.size == 0
    import pytest

    with pytest.raises(wire.WireError, match="empty payload"):
        wire.decode([header.to_json(), b"\0" * 4])


def test_the_pool_lends_pixels_and_room_for_the_prediction_and_refuses_strangers() -> None:
    pool = ShmPool(max_segments=4)
    try:
        stack = np.arange(2 * 3 * 4, dtype=np.uint16).reshape(2, 3, 4)
        name = pool.lend(7, stack)
        room = pool.reserve(7, 3 * stack.size * 4)
        assert name and room and name != room and pool.lent == 2
        reader = ShmReader()
        np.testing.assert_array_equal(reader.view(name, [2, 3, 4], "uint16"), stack)
        written = np.full((3, 2, 3, 4), 1.5, np.float32)
        np.copyto(reader.writable(room, [3, 2, 3, 4], "float32"), written)
        np.testing.assert_array_equal(pool.view(7, room, [3, 2, 3, 4], "float32"), written)
        with pytest.raises(ValueError, match="not lent to stack 8"):
            pool.view(8, room, [3, 2, 3, 4], "float32")  # another stack's answer
        with pytest.raises(ValueError, match="holds"):
            pool.view(7, room, [4, 2, 3, 4], "float32")  # bigger than the room lent
        reader.close()
        pool.give_back(7)
        assert pool.lent == 0
        # reused (no new segment) for the next stack of the same size
        assert pool.lend(8, stack) in {name, room}
    finally:
        pool.close()


def test_segments_of_a_re_sent_stack_are_destroyed_not_reused() -> None:
    """A hung worker may wake and write into what it was lent: never into another stack's."""
    from multiprocessing import shared_memory

    pool = ShmPool(max_segments=6)
    try:
        stack = np.zeros((4, 64, 64), np.uint16)
        first = pool.lend(3, stack)
        again = pool.lend(3, stack)  # re-sent to a second worker after a hang
        pool.give_back(3)
        assert pool.lent == 0
        for name in (first, again):
            with pytest.raises(FileNotFoundError):
                shared_memory.SharedMemory(name=name)
    finally:
        pool.close()


def test_segments_of_a_stack_whose_worker_hung_are_never_reused() -> None:
    """Re-sent over ZeroMQ (nothing lent twice), the hung worker's room must still go."""
    from multiprocessing import shared_memory

    pool = ShmPool()
    try:
        room = pool.reserve(5, 8 << 20)
        pool.taint(5)  # presumed hung: it may still write into `room`
        pool.give_back(5)  # predicted at last, by another worker
        assert pool.reserve(6, 8 << 20) != room
        with pytest.raises(FileNotFoundError):
            shared_memory.SharedMemory(name=room)
    finally:
        pool.close()


def test_a_failed_send_gives_its_segments_back(base_port) -> None:
    eps = wire.endpoints(base_port=base_port)
    daemon = DaemonSockets(eps)
    try:
        stack = np.zeros((16, 512, 512), np.uint16)  # 8 MiB: pixels and room both by segment
        header = wire.StackHeader(kind="stack", run_id="r", seq=1, t=0, shape=list(stack.shape),
                                  dtype="uint16", voxel_size_um=[1, 1, 1])
        daemon.offer(header, stack)
        daemon.idle[b"gone"] = ("gone-worker", time.monotonic(), 3)  # asked, then vanished
        assert daemon.pump() == []
        assert daemon.pool is not None and daemon.pool.lent == 0
        assert [h.seq for h, _ in daemon.backlog] == [1]  # still waiting for a live worker
    finally:
        daemon.close()


def test_the_worker_unmaps_segments_only_between_stacks_and_drops_destroyed_ones() -> None:
    pool = ShmPool(max_segments=20)
    reader = ShmReader(max_cached=2)
    try:
        names = [pool.reserve(seq, 4096) for seq in range(4)]
        views = [reader.writable(n, [1024], "float32") for n in names]  # more than max_cached
        for i, v in enumerate(views):
            v[:] = i  # all still mapped: nothing was unmapped under a live view
        del views, v
        reader.trim()
        assert list(reader._maps) == names[2:]  # the least recently used went
        reader.view(names[2], [1024], "float32")  # a hit makes it the most recent
        pool.taint(3)
        pool.give_back(3)  # destroyed by its owner
        reader.trim()
        assert list(reader._maps) == [names[2]]
    finally:
        reader.close()
        pool.close()


def test_a_late_answer_for_a_finished_stack_is_dropped_but_not_called_malformed(
        daemon_and_results_push) -> None:
    daemon, push = daemon_and_results_push
    assert daemon.pool is not None and daemon.token is not None
    room = daemon.pool.reserve(4, 3 * 8 * 4)
    daemon.handovers.hand(4, b"id-slow", "slow-worker")  # as pump records it
    daemon.release(4)  # predicted meanwhile by another worker
    late = wire.StackHeader(kind="prediction", run_id="r", seq=4, t=0, shape=[3, 1, 2, 4],
                            dtype="float32", voxel_size_um=[1, 1, 1], structures=["a", "b", "c"],
                            source_seq=4, shm=room, worker="slow-worker", token=daemon.token.value)
    push.send_multipart([late.to_json(), b""])
    assert daemon.results.poll(5000)
    assert daemon.receive_result() is None
    assert daemon.counts.malformed_results == 0
    foreign = late.model_copy(update={"source_seq": 9, "seq": 9, "shm": "psm_not_ours"})
    daemon.pool.reserve(9, 64)
    daemon.handovers.hand(9, b"id-slow", "slow-worker")
    push.send_multipart([foreign.to_json(), b""])  # a segment never lent to stack 9
    assert daemon.results.poll(5000)
    assert daemon.receive_result() is None
    assert daemon.counts.malformed_results == 1
