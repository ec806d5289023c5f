"""Silence pymmcore-plus's start-up search for a Micro-Manager installation.

With only Python devices, no Micro-Manager installation is needed at all, yet
``CMMCorePlus()`` logs "Could not find a compatible Micro-Manager installation" as an
error. A user running the simulator must not be told something is broken when nothing
is, so that one search runs with the pymmcore-plus logger raised above ERROR.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import contextmanager


@contextmanager
def quiet_unicore() -> Iterator[None]:
    logger = logging.getLogger("pymmcore-plus")
    previous = logger.level
    logger.setLevel(logging.CRITICAL)
    try:
        yield
    finally:
        logger.setLevel(previous)
