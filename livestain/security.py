"""Who may talk to a daemon: loopback only, unless ZeroMQ CURVE keys say otherwise.

A daemon streams a live experiment and obeys ``stop``; on a network interface anyone
who can reach the port could watch or end a three-day run. So a daemon binds to
loopback by default, and binding anywhere else requires CURVE encryption and
authentication (``zmq.auth``): ``livestain keys DIR`` makes a server and a client key
pair; the daemon accepts only clients whose public key is in ``DIR``, and workers,
viewers and control commands connect with ``--keys DIR``.

Key directory layout (what `zmq.auth.create_certificates` writes)::

    DIR/server.key          server public key        (clients need it)
    DIR/server.key_secret   server secret key        (daemon only)
    DIR/client.key          client public key        (the daemon's allow-list)
    DIR/client.key_secret   client secret key        (workers, viewers, control)
"""

from __future__ import annotations

import ipaddress
from pathlib import Path

import zmq
import zmq.auth
from zmq.auth.thread import ThreadAuthenticator


class SecurityError(ValueError):
    """A bind or connect that would expose a daemon, or unusable keys."""


def is_loopback(host: str) -> bool:
    """True for addresses only this computer can reach (127.0.0.0/8, ::1, localhost)."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def create_keys(directory: str | Path) -> Path:
    """Write a server and a client CURVE key pair into ``directory``."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    for name in ("server", "client"):
        if (directory / f"{name}.key_secret").exists():
            raise SecurityError(f"{directory} already holds {name} keys; not overwriting them")
        zmq.auth.create_certificates(str(directory), name)
    return directory


def _load(directory: Path, name: str, secret: bool) -> tuple[bytes, bytes | None]:
    path = directory / (f"{name}.key_secret" if secret else f"{name}.key")
    if not path.is_file():
        raise SecurityError(
            f"missing key file {path}: create keys with `livestain keys {directory}` and give "
            f"the daemon and its clients the same --keys folder"
        )
    try:
        return zmq.auth.load_certificate(str(path))
    except (ValueError, OSError) as e:
        raise SecurityError(f"key file {path} is unreadable ({e}); recreate it with `livestain keys`") from None


class ServerSecurity:
    """Applied to every socket a daemon binds; owns the ZAP authenticator thread."""

    def __init__(self, ctx: zmq.Context, host: str, keys: str | Path | None) -> None:
        self.keys = Path(keys) if keys else None
        self._auth: ThreadAuthenticator | None = None
        if self.keys is None:
            if not is_loopback(host):
                raise SecurityError(
                    f"refusing to listen on {host} without encryption: anyone on the network "
                    f"could watch or stop the run. Create keys with `livestain keys DIR` and "
                    f"pass --keys DIR (daemon and clients), or keep the default 127.0.0.1."
                )
            return
        self.public, self.secret = _load(self.keys, "server", secret=True)
        self._auth = ThreadAuthenticator(ctx)
        self._auth.start()
        self._auth.configure_curve(domain="*", location=str(self.keys))

    def apply(self, sock: zmq.Socket) -> None:
        if self.keys is None:
            return
        sock.curve_secretkey = self.secret
        sock.curve_publickey = self.public
        sock.curve_server = True

    def close(self) -> None:
        if self._auth is not None:
            self._auth.stop()
            self._auth = None


def apply_client(sock: zmq.Socket, keys: str | Path | None) -> None:
    """Give a connecting socket the client key pair and the daemon's public key."""
    if not keys:
        return
    keys = Path(keys)
    public, secret = _load(keys, "client", secret=True)
    server_public, _ = _load(keys, "server", secret=False)
    sock.curve_secretkey = secret
    sock.curve_publickey = public
    sock.curve_serverkey = server_public
