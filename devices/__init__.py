"""The microscope: the built-in simulated scope, a replay scope for recorded stacks, and
real Micro-Manager hardware."""

import os as _os

# The daemon's frame handler must run on the MDA thread as frames come. pymmcore-plus
# picks Qt signals when a QApplication exists in the process ("auto"), which queues
# every frame for a Qt event loop no daemon runs: the run then hangs with nothing
# acquired. livestain never owns a core inside a Qt loop, so it asks for psygnal's
# direct calls unless the user chose otherwise.
_os.environ.setdefault("PYMM_SIGNALS_BACKEND", "psygnal")
