"""Shared fixtures: free ports for real sockets, the shared data folder, Qt offscreen."""

from __future__ import annotations

import os
import random
import socket
from pathlib import Path

import pytest

os.environ.setdefault("QT_QPA_PLATFORM", "offscreen")

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
