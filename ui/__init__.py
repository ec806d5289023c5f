"""Live viewer: a pyqtgraph window that subscribes to the daemon's ``display`` socket.

It only ever connects (never binds) and never sends anything to the daemon, so any
number of viewers can come and go while an acquisition runs.
"""
