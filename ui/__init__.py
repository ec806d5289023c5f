"""Live viewer: a pyqtgraph window on a daemon's ``display`` and ``control`` sockets.

It only ever connects (never binds): it subscribes to the display stream and asks the
control socket for status (1 Hz) and, when the user says so, pause/resume/stop. Any
number of viewers can come and go, freeze or crash while an acquisition runs.

Modules: `app` (entry point), `window` (assembly and data flow), `views` (XY/XZ/YZ),
`frames` + `render` (images, no Qt), `history` (bounded buffer), `subscriber` and
`control_client` (sockets), `status_panel`, `structure_panel`, `control_bar` (side
panel), `colors`, `screenshot` (when ``--screenshot`` saves, or why not), `endpoints`
(address checks), `qtcheck` (no display, a Qt binding bug guard).
"""
