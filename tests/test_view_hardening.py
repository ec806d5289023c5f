"""`livestain view` under the faults and bad input a new user meets, as real processes.

Each case runs the command line (or, where the command line's 30 s screenshot wait
would make a test slow, `run_viewer` in a child process with a shorter wait) with an
environment the test controls, against a stand-in daemon (a control REP socket and a
display PUB socket on free 127.0.0.1 ports) or nothing at all, and checks the exit
code, the one-line message and whether a screenshot was written. The rules behind them
are also tested directly (`decide`, `display_problem`, `check_endpoint`).
"""

from __future__ import annotations

import os

os.environ.setdefault("QT_QPA_PLATFORM", "offscreen")

import ctypes
import pathlib
import socket
import subprocess
import sys
import threading
import time
from typing import Any

import numpy as np
import pytest
import zmq

from livestain import wire
from livestain.ui.endpoints import check_endpoint, listening, split_tcp
from livestain.ui.qtcheck import NO_WINDOW_ALTERNATIVES, display_problem
from livestain.ui.screenshot import Seen, decide, describe_daemon
from livestain.wire import StackHeader, encode

from _helpers import real_status

linux_only = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="X11/Wayland checks are Linux's")

NZ, NY, NX = 4, 48, 64


# -- helpers ---------------------------------------------------------------------------


def clean_env(**extra: str) -> dict[str, str]:
    """This process's environment without any display, plus ``extra``."""
    env = {k: v for k, v in os.environ.items()
           if k not in ("DISPLAY", "WAYLAND_DISPLAY", "QT_QPA_PLATFORM")}
    env.update(extra)
    return env


def view(args: list[str], env: dict[str, str], cwd: pathlib.Path, timeout: float = 60) -> subprocess.CompletedProcess:
    """``livestain view ARGS`` in a child process."""
    return subprocess.run([sys.executable, "-m", "livestain.cli", "view", *args], env=env, cwd=cwd,
                          capture_output=True, text=True, timeout=timeout)


#: run_viewer with a short screenshot wait (the command line waits 2 x 30 s for a prediction).
VIEWER_SCRIPT = """
import logging, pathlib, sys
logging.basicConfig(level=logging.INFO, format="%(levelname)s %(message)s")
from livestain.ui.app import run_viewer
sys.exit(run_viewer(sys.argv[1], screenshot=pathlib.Path(sys.argv[2]), screenshot_after_s=float(sys.argv[3]),
                    wait_for_prediction=False, daemon_timeout_s=float(sys.argv[4])))
"""


def viewer_child(display: str, shot: pathlib.Path, after_s: float, daemon_timeout_s: float,
                 cwd: pathlib.Path) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-c", VIEWER_SCRIPT, display, str(shot), str(after_s), str(daemon_timeout_s)],
        env=clean_env(QT_QPA_PLATFORM="offscreen"), cwd=cwd, capture_output=True, text=True, timeout=90,
    )


def header(kind: str, seq: int = 0) -> StackHeader:
    pred = kind == "prediction"
    return StackHeader(
        kind=kind, run_id="run-H", seq=seq, t=seq, p=0,
        shape=[2, NZ, NY, NX] if pred else [NZ, NY, NX], dtype="float32" if pred else "uint16",
        voxel_size_um=[1.0, 0.5, 0.5], structures=["dna", "membrane"] if pred else [],
        source_seq=seq if pred else None, acquired_end=time.time(),
    )


def payload(kind: str) -> np.ndarray:
    if kind == "prediction":
        pred = np.zeros((2, NZ, NY, NX), np.float32)
        pred[0, :, 10:30, 10:40] = 5.0
        return pred
    return (np.arange(NZ * NY * NX) % 4000 + 1000).astype(np.uint16).reshape(NZ, NY, NX)


class StandInDaemon:
    """The daemon's control (REP) and display (PUB) sockets at ``base_port`` + 3 / + 2.

    It answers every command with ``status`` and publishes the ``publish`` kinds
    (``"stack"``, ``"prediction"``) every 50 ms; `close` makes it go away.
    """

    def __init__(self, base_port: int, publish: tuple[str, ...] = ("stack", "prediction"),
                 **status: Any) -> None:
        eps = wire.endpoints("127.0.0.1", base_port)
        self.control, self.display = eps["control"], eps["display"]
        self.publish = publish
        self.status = real_status() | {"run_id": "run-H", "state": "acquiring", "stacks_acquired": 3,
                       "stacks_predicted": 0, "backlog": 0, "stacks_in_flight": 0,
                       "worker_heartbeats_s": {}, "error": None} | status
        self.commands: list[str] = []
        self._stop = threading.Event()
        self._ready = threading.Barrier(3, timeout=5)
        self._threads = [threading.Thread(target=t, daemon=True) for t in (self._answer, self._send)]
        for t in self._threads:
            t.start()
        self._ready.wait()

    def _answer(self) -> None:
        ctx = zmq.Context()
        rep = ctx.socket(zmq.REP)
        rep.setsockopt(zmq.LINGER, 0)
        rep.bind(self.control)
        self._ready.wait()
        try:
            while not self._stop.is_set():
                if rep.poll(20):
                    command, _ = wire.decode_command(rep.recv_multipart())
                    self.commands.append(command)
                    rep.send_multipart(wire.encode_reply(True, **self.status))
        finally:
            rep.close(linger=0)
            ctx.term()

    def _send(self) -> None:
        ctx = zmq.Context()
        pub = ctx.socket(zmq.PUB)
        pub.setsockopt(zmq.LINGER, 0)
        pub.bind(self.display)
        self._ready.wait()
        try:
            seq = 0
            while not self._stop.wait(0.05):
                for kind in self.publish:
                    pub.send_multipart(encode(header(kind, seq), payload(kind)), copy=False)
                seq += 1
        finally:
            pub.close(linger=0)
            ctx.term()

    def close(self) -> None:
        self._stop.set()
        for t in self._threads:
            t.join(5)


@pytest.fixture
def daemon_factory(base_port: int):
    made: list[StandInDaemon] = []

    def make(**kwargs: Any) -> StandInDaemon:
        made.append(StandInDaemon(base_port, **kwargs))
        return made[-1]

    yield make
    for d in made:
        d.close()


def one_line(stderr: str) -> str:
    """The ``livestain view: ...`` line of the command line's stderr."""
    lines = [line for line in stderr.splitlines() if line.startswith("livestain view: ")]
    assert len(lines) == 1, stderr
    return lines[0]


def xcb_loadable() -> bool:
    try:
        ctypes.CDLL("libxcb.so.1")
        ctypes.CDLL("libxcb-cursor.so.0")
        return True
    except OSError:
        return False


# -- 1. no display ---------------------------------------------------------------------


@linux_only
def test_view_without_a_display_exits_2_with_what_to_do(tmp_path: pathlib.Path, base_port: int) -> None:
    """Was: Qt aborted the process (SIGABRT, exit 134) with a hint about reinstalling."""
    proc = view(["--port", str(base_port)], clean_env(), tmp_path, timeout=30)
    assert proc.returncode == 2, proc.stderr[-2000:]
    line = one_line(proc.stderr)
    assert "no display found (DISPLAY and WAYLAND_DISPLAY are unset)" in line
    for hint in ("ssh -X", "QT_QPA_PLATFORM=offscreen livestain view --screenshot FILE", "livestain status"):
        assert hint in line
    assert "Traceback" not in proc.stderr and "Aborted" not in proc.stderr


@linux_only
def test_view_on_an_x_display_nobody_serves_exits_2(tmp_path: pathlib.Path, base_port: int) -> None:
    """A DISPLAY left over from a closed ``ssh -X`` session: Qt aborted, blaming libxcb-cursor0."""
    proc = view(["--port", str(base_port)], clean_env(DISPLAY=":4731"), tmp_path, timeout=30)
    assert proc.returncode == 2, proc.stderr[-2000:]
    line = one_line(proc.stderr)
    assert "livestain status" in line
    if xcb_loadable():
        assert "cannot open a window on the X display DISPLAY=:4731 (no X server answers there" in line


@linux_only
def test_offscreen_screenshot_works_without_a_display(tmp_path: pathlib.Path, base_port: int,
                                                     daemon_factory) -> None:
    """The way out the message offers (and how tests run) still works: saved, exit 0."""
    daemon = daemon_factory()
    shot = tmp_path / "shot.png"
    proc = view(["--port", str(base_port), "--screenshot", str(shot)],
                clean_env(QT_QPA_PLATFORM="offscreen"), tmp_path)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert shot.stat().st_size > 5_000
    assert "status" in daemon.commands


# -- 2. screenshot without a daemon ------------------------------------------------------


def test_screenshot_without_a_daemon_gives_up_with_exit_2(tmp_path: pathlib.Path, base_port: int) -> None:
    """Was: waited 60 s, then saved a picture of an empty window and exited 0."""
    shot = tmp_path / "shot.png"
    proc = view(["--port", str(base_port), "--screenshot", str(shot)],
                clean_env(QT_QPA_PLATFORM="offscreen"), tmp_path, timeout=40)
    assert proc.returncode == 2, proc.stderr[-2000:]
    line = one_line(proc.stderr)
    control = f"tcp://127.0.0.1:{base_port + 3}"
    assert f"no livestain daemon answered on {control} within 10 s (nothing listens on that port)" in line
    assert "Check --connect/--port" in line and "no screenshot written" in line
    assert not shot.exists()


def test_screenshot_where_another_program_listens_says_so(tmp_path: pathlib.Path, base_port: int) -> None:
    """A busy port (or a daemon with other --keys): something accepts, nothing answers."""
    shot = tmp_path / "shot.png"
    with socket.socket() as other:
        other.bind(("127.0.0.1", base_port + 3))
        other.listen(8)
        proc = view(["--port", str(base_port), "--screenshot", str(shot), "--keys", str(make_keys(tmp_path))],
                    clean_env(QT_QPA_PLATFORM="offscreen"), tmp_path, timeout=40)
    assert proc.returncode == 2, proc.stderr[-2000:]
    line = one_line(proc.stderr)
    assert "something listens on that port but does not answer as a livestain daemon" in line
    assert "the daemon uses the same --keys folder" in line
    assert not shot.exists()


def make_keys(tmp_path: pathlib.Path) -> pathlib.Path:
    from livestain.security import create_keys

    return create_keys(tmp_path / "keys")


# -- daemon there, no prediction -----------------------------------------------------------


def test_screenshot_without_a_prediction_saves_the_stack_and_says_why(tmp_path: pathlib.Path, base_port: int,
                                                                    daemon_factory) -> None:
    daemon_factory(publish=("stack",))
    shot = tmp_path / "stack.png"
    proc = viewer_child(f"tcp://127.0.0.1:{base_port + 2}", shot, 1.5, 10, tmp_path)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert shot.stat().st_size > 5_000
    assert "s (run run-H acquiring; 3 stacks acquired, 0 predicted; no worker has connected (start one " \
           "with `livestain worker`)); saving the raw stack without one" in proc.stderr
    assert "WARNING no prediction in " in proc.stderr


def test_screenshot_with_nothing_to_show_writes_nothing_and_exits_1(tmp_path: pathlib.Path, base_port: int,
                                                                   daemon_factory) -> None:
    """A paused (or finished) run publishes nothing: say so instead of saving an empty window."""
    daemon_factory(publish=(), state="paused")
    shot = tmp_path / "empty.png"
    proc = viewer_child(f"tcp://127.0.0.1:{base_port + 2}", shot, 1.5, 10, tmp_path)
    assert proc.returncode == 1, proc.stderr[-2000:]
    assert not shot.exists()
    assert "answers (run run-H paused; 3 stacks acquired, 0 predicted; `livestain resume` continues it" in proc.stderr
    assert "nothing to show and no screenshot was written" in proc.stderr


def test_screenshot_stops_waiting_when_the_daemon_goes_away(tmp_path: pathlib.Path, base_port: int,
                                                             daemon_factory) -> None:
    """Nothing more can come from a daemon that stopped answering: no 60 s wait."""
    daemon = daemon_factory(publish=())
    threading.Timer(1.5, daemon.close).start()
    shot = tmp_path / "gone.png"
    proc = viewer_child(f"tcp://127.0.0.1:{base_port + 2}", shot, 60, 3, tmp_path)
    assert proc.returncode == 1, proc.stderr[-2000:]
    # this reason, not the 60 s wait's "nothing to show" one: it gave up on the silence
    assert "stopped answering before it sent anything to show" in proc.stderr
    assert not shot.exists()


# -- 3. bad input -------------------------------------------------------------------------


def test_a_wrong_keys_folder_is_one_line_and_exit_2(tmp_path: pathlib.Path, base_port: int) -> None:
    """Already so before this file (a guard): the key error comes before any window."""
    proc = view(["--port", str(base_port), "--keys", "/nonexistent-livestain-keys", "--screenshot",
                 str(tmp_path / "x.png")], clean_env(), tmp_path, timeout=30)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "missing key file /nonexistent-livestain-keys/client.key_secret" in one_line(proc.stderr)


def test_run_viewer_refuses_an_out_of_range_port_before_any_window() -> None:
    """ZeroMQ accepted tcp://...:70002 and the viewer waited forever (the command line
    now refuses such a --port itself; this covers other callers)."""
    from livestain.ui.app import run_viewer

    with pytest.raises(ValueError, match="port 70002 of tcp://127.0.0.1:70002 is out of range"):
        run_viewer("tcp://127.0.0.1:70002")


def test_unknown_host_is_one_line_and_exit_2(tmp_path: pathlib.Path, base_port: int) -> None:
    host = "no-such-host.invalid"
    try:
        socket.getaddrinfo(host, 1)
        pytest.skip(f"this network resolves {host}")
    except socket.gaierror as e:
        if e.errno != socket.EAI_NONAME:
            pytest.skip(f"no answer from DNS here ({e})")
    proc = view(["--connect", host, "--port", str(base_port), "--screenshot", str(tmp_path / "x.png")],
                clean_env(QT_QPA_PLATFORM="offscreen"), tmp_path, timeout=30)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert f"unknown host '{host}'" in one_line(proc.stderr)


# -- the rules, directly ------------------------------------------------------------------


def seen(**kw: Any) -> Seen:
    base = dict(elapsed_s=1.0, silent_s=1.0, heard=False, has_control=True, answering=None,
                n_predictions=0, shows_stack=False, shows_prediction=False, since_first_prediction_s=None)
    return Seen(**(base | kw))


@pytest.mark.parametrize(("kw", "action"), [
    ({}, "wait"),                                                        # first reply pending
    ({"answering": False, "silent_s": 5.0, "elapsed_s": 5.0}, "wait"),   # not yet the daemon timeout
    ({"answering": False, "silent_s": 10.0, "elapsed_s": 10.0}, "no-daemon"),
    ({"answering": False, "elapsed_s": 60.0, "silent_s": 3.0}, "no-daemon"),  # deadline, never heard
    ({"elapsed_s": 60.0}, "save"),                                       # deadline before any verdict
    ({"has_control": False, "answering": None, "elapsed_s": 60.0}, "save"),
    ({"heard": True, "answering": True, "n_predictions": 1, "shows_stack": True,
      "shows_prediction": True, "since_first_prediction_s": 0.1}, "save"),
    ({"heard": True, "answering": True, "n_predictions": 1, "shows_prediction": True,
      "since_first_prediction_s": 0.1}, "wait"),                         # stack to come
    ({"heard": True, "answering": None, "n_predictions": 1, "shows_stack": True,
      "shows_prediction": True}, "wait"),                                # status to come
    ({"heard": True, "answering": True, "shows_stack": True, "elapsed_s": 60.0}, "save"),
    ({"heard": True, "answering": True, "elapsed_s": 60.0}, "nothing"),
    ({"heard": True, "answering": False, "silent_s": 10.0, "elapsed_s": 12.0}, "nothing"),
    ({"heard": True, "answering": False, "silent_s": 10.0, "elapsed_s": 12.0, "shows_stack": True}, "save"),
])
def test_screenshot_rules(kw: dict[str, Any], action: str) -> None:
    assert decide(seen(**kw), limit_s=60.0, daemon_timeout_s=10.0).action == action


def test_describe_daemon_names_what_keeps_predictions_away() -> None:
    assert describe_daemon({}) == "no status reply yet"
    text = describe_daemon({"run_id": "r", "state": "acquiring", "stacks_acquired": 4,
                            "stacks_predicted": 0, "worker_alive": False})
    assert text == "run r acquiring; 4 stacks acquired, 0 predicted; its worker is down"
    assert "no worker heard from for 30 s" in describe_daemon({"worker_heartbeats_s": {"w": 30.0}})
    assert "worker" not in describe_daemon({"worker_heartbeats_s": {"w": 0.5}})


@pytest.mark.parametrize(("env", "platform", "expected"), [
    ({}, "linux", "no display found (DISPLAY and WAYLAND_DISPLAY are unset)"),
    ({"QT_QPA_PLATFORM": "offscreen"}, "linux", None),
    ({"QT_QPA_PLATFORM": "vnc"}, "linux", None),
    ({"WAYLAND_DISPLAY": "wayland-0"}, "linux", None),
    ({"QT_QPA_PLATFORM": "wayland", "DISPLAY": ":0"}, "linux", "(QT_QPA_PLATFORM=wayland but WAYLAND_DISPLAY is unset)"),
    ({"QT_QPA_PLATFORM": "xcb", "WAYLAND_DISPLAY": "w"}, "linux", "(QT_QPA_PLATFORM=xcb but DISPLAY is unset)"),
    ({}, "win32", None),
    ({}, "darwin", None),
])
def test_display_problem(env: dict[str, str], platform: str, expected: str | None) -> None:
    problem = display_problem(env, platform)
    if expected is None:
        assert problem is None
    else:
        assert problem is not None and expected in problem and problem.endswith(NO_WINDOW_ALTERNATIVES)


def test_display_problem_names_a_missing_xcb_cursor_library() -> None:
    """Qt 6.5+ needs libxcb-cursor for X11; a fresh install often lacks it."""
    def load(name: str) -> object:
        if name == "libxcb-cursor.so.0":
            raise OSError("libxcb-cursor.so.0: cannot open shared object file: No such file or directory")
        return ctypes.CDLL(name)

    problem = display_problem({"DISPLAY": ":0"}, "linux", load=load)
    assert problem is not None and "sudo apt install libxcb1 libxcb-cursor0" in problem


def test_check_endpoint_and_listening() -> None:
    assert split_tcp("tcp://[::1]:5562") == ("::1", 5562)
    assert split_tcp("ipc:///tmp/x") is None
    check_endpoint("tcp://127.0.0.1:5562")
    check_endpoint("tcp://localhost:65535")
    for bad in ("tcp://127.0.0.1:0", "tcp://127.0.0.1:65536", "tcp://127.0.0.1:-3"):
        with pytest.raises(ValueError, match="out of range"):
            check_endpoint(bad)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen(1)
        port = s.getsockname()[1]
        assert listening(f"tcp://127.0.0.1:{port}") is True
    assert listening(f"tcp://127.0.0.1:{port}") is False
    assert listening("inproc://x") is None
