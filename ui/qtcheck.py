"""Detects a Qt binding that loses a reference on every signal, before it crashes the viewer.

PySide6 6.12.0 on Python 3.11 (where ``True`` and ``None`` are not yet immortal) drops
one reference to ``True`` on every ``Signal.emit()`` from Python and one to a slot's
return value (``None``) on every C++ signal delivered to a Python slot. A live viewer
makes hundreds of such calls a second, so the interpreter aborts with "Fatal Python
error: none_dealloc" within a minute or so (and a short-lived process at exit).
PySide6 6.11 and Python 3.12+ are fine. Rather than trust a version list,
`signal_reference_leak` measures it.

The fix is a binding without the bug. Until then `ReferenceGuard` keeps the viewer
alive: a small thread tops the reference counts of ``None``, ``True`` and ``False`` back
up (``Py_IncRef``) a few times a second and at exit. Extra references to these
singletons are harmless (they are never freed anyway); missing ones are fatal. It only
covers these three objects, which is what this bug loses when every slot returns None
or a bool, as the viewer's do.
"""

from __future__ import annotations

import atexit
import ctypes
import logging
import sys
import threading

from PySide6 import QtCore

ADVICE = ("this Qt binding (PySide6 {version}, Python {python}) loses a reference on every "
          "signal, so the viewer will abort within minutes ('Fatal Python error: none_dealloc'). "
          "Install PySide6-Essentials<6.12 (pip install 'PySide6-Essentials<6.12') or use "
          "Python 3.12 or newer.")


class _Probe(QtCore.QObject):
    fired = QtCore.Signal(int)


def signal_reference_leak(n: int = 50) -> bool:
    """True if emitting a signal to a Python slot loses references (see module doc)."""
    if sys.version_info >= (3, 12):  # True/None are immortal: the lost references are harmless
        return False
    probe = _Probe()
    probe.fired.connect(_noop)
    before = sys.getrefcount(True)
    for _ in range(n):
        probe.fired.emit(1)
    lost = before - sys.getrefcount(True)
    probe.fired.disconnect(_noop)
    return lost >= n // 2


log = logging.getLogger(__name__)

_SINGLETONS = (None, True, False)


class ReferenceGuard:
    """Keeps ``None``/``True``/``False`` at least ``margin`` references above their count
    at start, topping up every ``period_s`` in a daemon thread and once more at exit."""

    def __init__(self, margin: int = 20_000, period_s: float = 0.2) -> None:
        self.period_s = period_s
        self._floor = [sys.getrefcount(o) + margin for o in _SINGLETONS]
        self._stop = threading.Event()
        #: References added so far (what the binding lost, plus the margin).
        self.added = 0
        self.top_up()
        self._thread = threading.Thread(target=self._run, name="qt-reference-guard", daemon=True)
        self._thread.start()
        atexit.register(self.top_up)

    def top_up(self) -> None:
        incref = ctypes.pythonapi.Py_IncRef  # PyDLL: called with the GIL held
        for obj, floor in zip(_SINGLETONS, self._floor):
            missing = floor - sys.getrefcount(obj)
            if missing > 0:
                ref = ctypes.py_object(obj)
                for _ in range(missing):
                    incref(ref)
                self.added += missing

    def stop(self) -> None:
        self._stop.set()

    def _run(self) -> None:
        while not self._stop.wait(self.period_s):
            self.top_up()


_guard: ReferenceGuard | None = None


def guard_if_needed() -> ReferenceGuard | None:
    """Start the (single, process-wide) guard if this binding leaks; log why once."""
    global _guard
    if _guard is None and signal_reference_leak():
        log.warning("%s Working around it for now.", advice())
        _guard = ReferenceGuard()
    return _guard


def advice() -> str:
    import PySide6

    return ADVICE.format(version=PySide6.__version__, python=sys.version.split()[0])


def _noop(_: int) -> None:
    return None
