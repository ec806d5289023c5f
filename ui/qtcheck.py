"""Checks that keep Qt from aborting the viewer: no usable display, and a leaky binding.

No display: on Linux, Qt aborts the whole process (SIGABRT, exit 134) when it cannot open
its windowing platform, with a misleading hint about reinstalling or libxcb-cursor0.
`display_problem` finds the usual causes first (no ``DISPLAY``/``WAYLAND_DISPLAY``, an
X server that does not answer, a missing X11 library) so `require_display` can say what
to do in one line instead.

A leaky binding:

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
import os
import sys
import threading
from collections.abc import Callable, Mapping

from PySide6 import QtCore

ADVICE = ("this Qt binding (PySide6 {version}, Python {python}) loses a reference on every "
          "signal, so the viewer will abort within minutes ('Fatal Python error: none_dealloc'). "
          "Install PySide6-Essentials<6.12 (pip install 'PySide6-Essentials<6.12') or use "
          "Python 3.12 or newer.")


#: What a user without a window can do instead (the end of every no-display message).
NO_WINDOW_ALTERNATIVES = ("run it on a machine with a screen or over `ssh -X`, or save a picture with "
                          "`QT_QPA_PLATFORM=offscreen livestain view --screenshot FILE`, or see the "
                          "run as text with `livestain status`")

#: xcb_connection_has_error() codes worth naming (others: "no X server answers there").
_XCB_ERRORS = {5: "not a valid display name", 6: "that screen does not exist"}


class NoDisplayError(OSError):
    """Qt could not open a window here; the message says why and what to do instead
    (an OSError, so the command line prints it as one line and exits 2)."""


def require_display(env: Mapping[str, str] | None = None) -> None:
    """Raise `NoDisplayError` where creating a QApplication would abort the process.

    Call it before the first QApplication only: Qt's own failure is a SIGABRT that no
    Python code can catch or explain.
    """
    problem = display_problem(env)
    if problem is not None:
        raise NoDisplayError(problem)


def display_problem(
    env: Mapping[str, str] | None = None,
    platform: str | None = None,
    load: Callable[[str], object] = ctypes.CDLL,
) -> str | None:
    """Why Qt could not open a window here, or None if it can (or we cannot tell).

    Only the window systems of Linux and the BSDs are checked; Windows and macOS always
    have one. A ``QT_QPA_PLATFORM`` that needs no display (``offscreen``, ``vnc``,
    ``eglfs``...) is trusted as is: that is how tests and ``--screenshot`` run headless.
    """
    env = os.environ if env is None else env
    platform = sys.platform if platform is None else platform
    if platform in ("win32", "darwin", "cygwin"):
        return None
    requested = [p.split(":")[0].strip() for p in env.get("QT_QPA_PLATFORM", "").split(";") if p.strip()]
    if any(not _is_windowed(p) for p in requested):
        return None
    x_display, wayland = env.get("DISPLAY", ""), env.get("WAYLAND_DISPLAY", "")
    can_x = bool(x_display) and (not requested or "xcb" in requested)
    can_wayland = bool(wayland) and (not requested or any(p.startswith("wayland") for p in requested))
    if not (can_x or can_wayland):
        return f"no display found ({_missing(requested)}): {NO_WINDOW_ALTERNATIVES}"
    if can_x and not can_wayland:  # X11 is Qt's only way to a window: check it as Qt will
        return _xcb_problem(x_display, load)
    return None


def _is_windowed(platform_name: str) -> bool:
    """Qt platforms that need a display server (X11 or Wayland)."""
    return platform_name == "xcb" or platform_name.startswith("wayland")


def _missing(requested: list[str]) -> str:
    """Which environment variable the requested platform(s) would have needed."""
    names = [name for name, needed in (("DISPLAY", not requested or "xcb" in requested),
                                       ("WAYLAND_DISPLAY", not requested or any(p != "xcb" for p in requested)))
             if needed]
    unset = " and ".join(names) + (" is unset" if len(names) == 1 else " are unset")
    return f"QT_QPA_PLATFORM={';'.join(requested)} but {unset}" if requested else unset


def _xcb_problem(display: str, load: Callable[[str], object]) -> str | None:
    """What keeps Qt's X11 plugin from starting: a library or the X server itself.

    Qt 6.5+ needs libxcb-cursor, often missing on fresh installs, and blames it even
    when the X server is the problem; so connect as Qt would (xcb_connect, a few ms)
    and name the actual cause.
    """
    try:
        xcb = load("libxcb.so.1")
        load("libxcb-cursor.so.0")
    except OSError as e:
        return (f"cannot open X11 windows: a library Qt needs is missing ({e}); install the X11 "
                f"client libraries (e.g. `sudo apt install libxcb1 libxcb-cursor0`), or "
                f"{NO_WINDOW_ALTERNATIVES}")
    error = _xcb_connect_error(xcb, display)
    if not error:
        return None
    reason = _XCB_ERRORS.get(error, "no X server answers there, or it refuses this user")
    return f"cannot open a window on the X display DISPLAY={display} ({reason}): {NO_WINDOW_ALTERNATIVES}"


def _xcb_connect_error(xcb: object, display: str) -> int:
    """xcb_connection_has_error() of a test connection to ``display`` (0: it works)."""
    try:
        connect = xcb.xcb_connect  # type: ignore[attr-defined]
        has_error = xcb.xcb_connection_has_error  # type: ignore[attr-defined]
        disconnect = xcb.xcb_disconnect  # type: ignore[attr-defined]
    except AttributeError:
        return 0  # not libxcb after all: let Qt try
    connect.restype = ctypes.c_void_p
    connect.argtypes = [ctypes.c_char_p, ctypes.POINTER(ctypes.c_int)]
    has_error.argtypes = [ctypes.c_void_p]
    has_error.restype = ctypes.c_int
    disconnect.argtypes = [ctypes.c_void_p]
    conn = connect(display.encode(), None)
    if not conn:
        return 1
    try:
        return int(has_error(conn))
    finally:
        disconnect(conn)  # also frees the static error connection safely


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
