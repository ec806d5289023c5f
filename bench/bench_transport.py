"""Moving one stack from the daemon to a worker process, against a plain memcpy.

The daemon's real path: `livestain.wire.encode` -> PUSH ``send_multipart(copy=False)``
-> PULL ``recv_multipart(copy=False)`` in another process -> `livestain.wire.decode`
(a zero-copy array view), then a one-byte acknowledgement back. Timed per stack from
send to acknowledgement, over ``ipc://`` and ``tcp://127.0.0.1``; the baseline is
``np.copyto`` of the same buffer in one process (what any transport must at least do).
``shared memory`` is the same-host fast path (`livestain.shm`): one copy into a pooled
segment, the header over ZeroMQ, the worker maps the segment.

    .venv/bin/python bench/bench_transport.py [--sizes-mib 16,512] [--repeats 5]

`measure` returns the rows as plain dicts (``bench/run_all.py`` calls it too).
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import zmq

from livestain import wire
from livestain.shm import ShmPool, ShmReader


def receiver(endpoint: str, ack_endpoint: str, n: int) -> None:
    ctx = zmq.Context()
    pull = ctx.socket(zmq.PULL)
    pull.connect(endpoint)
    ack = ctx.socket(zmq.PUSH)
    ack.connect(ack_endpoint)
    reader = ShmReader()
    for _ in range(n):
        header, array = wire.decode(pull.recv_multipart(copy=False))
        if header.shm:  # the worker's side of the same-host fast path
            array = reader.view(header.shm, header.shape, header.dtype)
        ack.send(bytes([int(array.flat[-1]) & 0xFF]))
        del array
    reader.close()
    pull.close()
    ack.close()
    ctx.term()


def transport_seconds(endpoint: str, ack_endpoint: str, array: np.ndarray, repeats: int,
                      shm: bool = False) -> float:
    ctx = zmq.Context()
    push = ctx.socket(zmq.PUSH)
    push.bind(endpoint)
    ack = ctx.socket(zmq.PULL)
    ack.bind(ack_endpoint)
    # a separate interpreter, as a worker is (a multiprocessing child would share this
    # process's shared-memory bookkeeping)
    proc = subprocess.Popen([sys.executable, __file__, "--receiver", endpoint, ack_endpoint,
                             str(repeats + 1)])
    header = wire.StackHeader(kind="stack", run_id="bench", seq=0, t=0, shape=list(array.shape),
                              dtype=str(array.dtype), voxel_size_um=[1, 1, 1])
    pool = ShmPool() if shm else None
    times = []
    for i in range(repeats + 1):  # the first one also waits for the connection
        t0 = time.perf_counter()
        if pool is not None:  # the daemon's side of the same-host fast path
            name = pool.lend(i, array)
            push.send_multipart([header.model_copy(update={"shm": name}).to_json(), b""])
        else:
            push.send_multipart(wire.encode(header, array), copy=False)
        ack.recv()
        if pool is not None:
            pool.give_back(i)
        if i:
            times.append(time.perf_counter() - t0)
    proc.wait()
    if pool is not None:
        pool.close()
    push.close()
    ack.close()
    ctx.term()
    return statistics.median(times)


def memcpy_seconds(array: np.ndarray, repeats: int) -> float:
    dst = np.empty_like(array)
    np.copyto(dst, array)
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        np.copyto(dst, array)
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def measure(sizes_mib: list[int] = (16, 512), repeats: int = 5, port: int = 5800) -> list[dict]:
    """One row per size and path (``memcpy``, ``ipc``, ``tcp loopback``, ``shared memory``):
    median seconds per stack, GiB/s and the fraction of the memcpy speed."""
    rows = []
    tmp = tempfile.mkdtemp(prefix="livestain-bench-")
    for mib in (int(v) for v in sizes_mib):
        n = mib * 1024 * 1024 // 2
        array = np.arange(n, dtype=np.uint16).reshape(-1, 1024, 512)[: n // (1024 * 512)]
        array = np.ascontiguousarray(array)
        base = memcpy_seconds(array, repeats)
        rows.append({"size_mib": mib, "path": "memcpy", "seconds": base})
        for name, ep, ack, shm in (
            ("ipc", f"ipc://{tmp}/stacks-{mib}", f"ipc://{tmp}/ack-{mib}", False),
            ("tcp loopback", f"tcp://127.0.0.1:{port}", f"tcp://127.0.0.1:{port + 1}", False),
            ("shared memory", f"ipc://{tmp}/shm-{mib}", f"ipc://{tmp}/shm-ack-{mib}", True),
        ):
            rows.append({"size_mib": mib, "path": name,
                         "seconds": transport_seconds(ep, ack, array, repeats, shm)})
        for r in rows:
            if r["size_mib"] == mib:
                r["gib_per_s"] = round(mib / 1024 / r["seconds"], 2)
                r["fraction_of_memcpy"] = round(base / r["seconds"], 3)
        del array
    shutil.rmtree(tmp, ignore_errors=True)
    return rows


def print_table(rows: list[dict]) -> None:
    print(f"{'size':>8} {'path':<14}{'ms':>10}{'GiB/s':>8}{'x memcpy':>10}")
    for r in rows:
        print(f"{r['size_mib']:>5} MiB {r['path']:<14}{r['seconds'] * 1e3:>10.1f}{r['gib_per_s']:>8.2f}"
              f"{r['fraction_of_memcpy']:>10.3f}")


def main() -> None:
    if len(sys.argv) == 5 and sys.argv[1] == "--receiver":
        receiver(sys.argv[2], sys.argv[3], int(sys.argv[4]))
        return
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes-mib", default="16,512")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--port", type=int, default=5800)
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args()
    rows = measure([int(v) for v in args.sizes_mib.split(",")], args.repeats, args.port)
    print_table(rows)
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
