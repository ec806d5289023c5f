"""What the daemon calls out to: the worker supervisor, a viewer, a test.

One small dataclass instead of five callback arguments to `Daemon`: each hook has a
default that does nothing harmful, so a daemon whose workers run on other hosts needs
none of them.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .stack_writer import disk_free_bytes


@dataclass
class DaemonHooks:
    """How the daemon reaches what runs beside it (the worker supervisor, a viewer, a
    test): all optional, so a daemon with remote workers needs none of them."""

    #: called every turn of the loop (worker supervision, reaping a closed viewer)
    on_tick: Callable[[], None] = lambda: None
    #: called with the workers holding stacks that got no answer within resend_after_s
    on_hung_worker: Callable[[list[str]], None] = lambda holders: None
    #: more fields for the status reply (worker health; `RunStatus` declares them)
    extra_status: Callable[[], dict[str, Any]] = dict
    #: moves the workers to another model (adaptation); None: no local workers
    swap_model: Callable[[str | None], None] | None = None
    #: free bytes on a path's disk (a test fills the disk up)
    free_space: Callable[[Path], int] = disk_free_bytes
