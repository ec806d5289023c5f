"""Shared fixtures: free ports for real sockets, the shared data folder, Qt offscreen."""

from __future__ import annotations

import gc
import os
import random
import socket
from pathlib import Path

import pytest

os.environ.setdefault("QT_QPA_PLATFORM", "offscreen")

def pytest_collection_finish(session: pytest.Session) -> None:
    """Collect cyclic garbage on the main thread only, after each test.

    pyqtgraph items live in reference cycles, so only the cyclic collector frees them,
    and it runs in whichever thread happens to allocate. Finalised on a later test's
    daemon or publisher thread, a PySide6 object disconnects its signals there while
    the GUI thread connects others: twice a full suite run deadlocked inside PySide6
    (a futex wait that no timeout can interrupt). With automatic collection off and
    `_collect_on_the_main_thread` after every test, Qt objects die where they were
    made. What was imported by now (torch, Qt, the test modules) is frozen out of the
    collector's sight, so the per-test collection stays cheap.
    """
    gc.freeze()
    gc.disable()


@pytest.fixture(autouse=True)
def _collect_on_the_main_thread():
    yield
    gc.collect()


SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"


def _port_free(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


@pytest.fixture
def base_port() -> int:
    """A base port with the three ports after it free too (a daemon uses four)."""
    for _ in range(200):
        base = random.randrange(20000, 60000, 4)
        if all(_port_free(base + i) for i in range(4)):
            return base
    raise RuntimeError("no four consecutive free ports on 127.0.0.1")


@pytest.fixture
def shared_data() -> Path:
    """``../shared/data`` beside the project; tests that need it skip without it."""
    if not SHARED_DATA.is_dir():
        pytest.skip(f"real data folder {SHARED_DATA} is absent (only in the livestain dev setup)")
    return SHARED_DATA
