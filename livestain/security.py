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

Secret keys are written mode 0600 in a folder of mode 0700: anyone who can read them
can join or impersonate the daemon.

Without keys (loopback), any local process could still connect. So a loopback daemon
also makes a per-run *worker token* (`DaemonToken`), a random secret written to a file
only this user can read (`token_path`); workers present it in every ``ready`` message
and prediction header (field ``token``, see docs/wire.md), and the daemon gives stacks
only to, and takes predictions only from, peers that present it. With CURVE keys the
key already authenticates, and no token is used.
"""

from __future__ import annotations

import hmac
import ipaddress
import logging
import os
import re
import secrets
import shutil
import stat
import tempfile
from pathlib import Path

import zmq
import zmq.auth
from zmq.auth.thread import ThreadAuthenticator

log = logging.getLogger(__name__)

#: Set to 1 to see zmq.auth's DEBUG lines (they include client public keys).
AUTH_DEBUG_ENV = "LIVESTAIN_DEBUG_AUTH"
#: A worker token given directly, for workers that cannot read the daemon's token file.
TOKEN_ENV = "LIVESTAIN_WORKER_TOKEN"
#: Overrides the folder of token files (default: $XDG_RUNTIME_DIR/livestain or
#: ~/.cache/livestain).
TOKEN_DIR_ENV = "LIVESTAIN_TOKEN_DIR"


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


def quiet_zmq_auth() -> None:
    """Keep zmq.auth's DEBUG lines (every client's public key) off the console.

    ``livestain -v`` turns the root logger to DEBUG, and zmq.auth logs each handshake
    there. Its loggers are set to WARNING unless `AUTH_DEBUG_ENV` asks for them, or
    someone already gave them a level of their own.
    """
    if os.environ.get(AUTH_DEBUG_ENV, "") not in ("", "0"):
        return
    for name in ("zmq.auth", "zmq.auth.thread", "zmq.auth.base"):
        logger = logging.getLogger(name)
        if logger.level == logging.NOTSET:
            logger.setLevel(logging.WARNING)


quiet_zmq_auth()


#: POSIX owners and mode bits exist (not on Windows, where ACLs guard user folders).
_POSIX_OWNERS = hasattr(os, "getuid")


def private_dir(directory: Path) -> Path:
    """Create ``directory`` (and parents) with mode 0700, or tighten ours to 0700.

    Secrets go in it: a folder others can list or enter would let them read a key file
    in the instant before its mode is tightened, or swap one in.
    """
    directory.mkdir(mode=0o700, parents=True, exist_ok=True)
    if not _POSIX_OWNERS:  # Windows: the user's profile folders are private by their ACLs
        return directory
    info = directory.stat()
    if info.st_uid != os.getuid():
        raise SecurityError(f"{directory} belongs to another user; choose a folder of your own")
    if stat.S_IMODE(info.st_mode) & 0o077:
        directory.chmod(0o700)
    return directory


def _is_key_folder(directory: Path) -> bool:
    """True for a folder that is absent, empty or holds only key files: ours to tighten
    (a user's folder that holds other things keeps the mode they gave it)."""
    if not directory.exists():
        return True
    return all(p.suffix in (".key", ".key_secret") for p in directory.iterdir())


def create_keys(directory: str | Path) -> Path:
    """Write a server and a client CURVE key pair into ``directory``.

    The folder is made (or tightened to) mode 0700 and the secret keys 0600 (zmq.auth
    writes them 0644): they are generated in a private temporary folder inside it and
    moved into place, so no secret is ever readable by others, even for an instant.
    """
    directory = Path(directory)
    if _is_key_folder(directory):
        private_dir(directory)  # new, or made by us before: 0700
    else:
        log.warning("%s holds other files too: left as it is; the secret keys are still 0600",
                    directory)
    for name in ("server", "client"):
        if (directory / f"{name}.key_secret").exists():
            raise SecurityError(f"{directory} already holds {name} keys; not overwriting them")
    staging = Path(tempfile.mkdtemp(prefix=".keys-", dir=directory))  # mode 0700
    try:
        for name in ("server", "client"):
            public, secret = (Path(p) for p in zmq.auth.create_certificates(str(staging), name))
            secret.chmod(0o600)
            public.chmod(0o644)  # public keys: clients and the allow-list need them
            os.replace(secret, directory / secret.name)
            os.replace(public, directory / public.name)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return directory


def _tighten_secret(path: Path) -> None:
    """A secret key others can read (written by an older `livestain keys`, or copied
    carelessly) is made 0600 when it is ours, with a warning: it may have leaked."""
    if not _POSIX_OWNERS:
        return
    info = path.stat()
    if stat.S_IMODE(info.st_mode) & 0o077 and info.st_uid == os.getuid():
        path.chmod(0o600)
        log.warning("%s was readable by other users; made it 0600 (recreate the keys if "
                    "others may have copied it)", path)


def _load(directory: Path, name: str, secret: bool) -> tuple[bytes, bytes | None]:
    path = directory / (f"{name}.key_secret" if secret else f"{name}.key")
    if not path.is_file():
        raise SecurityError(
            f"missing key file {path}: create keys with `livestain keys {directory}` and give "
            f"the daemon and its clients the same --keys folder"
        )
    if secret:
        _tighten_secret(path)
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
        quiet_zmq_auth()
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


# -- worker token (loopback daemons without keys) -----------------------------------

def token_dir() -> Path:
    """Folder of worker-token files: per user, not readable by others.

    ``$XDG_RUNTIME_DIR`` (a tmpfs only this user can enter, emptied at logout) when the
    session has one, else ``~/.cache/livestain``; `TOKEN_DIR_ENV` overrides both.
    """
    if override := os.environ.get(TOKEN_DIR_ENV):
        return Path(override)
    runtime = os.environ.get("XDG_RUNTIME_DIR")
    if runtime and Path(runtime).is_dir():
        return Path(runtime) / "livestain"
    return Path.home() / ".cache" / "livestain"


def _host_key(host: str) -> str:
    """``host`` as it appears in a token file name: the same for every way of writing
    this computer's loopback address that resolves to one daemon."""
    host = host.strip("[]")
    if host in ("", "localhost", "*"):
        host = "127.0.0.1"
    return re.sub(r"[^0-9A-Za-z.-]", "_", host)


def token_path(host: str, base_port: int) -> Path:
    """Where the daemon listening on ``host:base_port`` keeps its worker token.

    Named by host and base port (the stacks port), so a worker that connects to
    ``tcp://HOST:PORT`` finds the token of the daemon it talks to.
    """
    return token_dir() / f"worker-token-{_host_key(host)}-{int(base_port)}"


def split_endpoint(endpoint: str) -> tuple[str, int]:
    """Host and port of ``tcp://host:port`` (IPv6 hosts in brackets)."""
    address = endpoint.split("://", 1)[-1]
    host, _, port = address.rpartition(":")
    return host.strip("[]"), int(port)


class DaemonToken:
    """The per-run secret a loopback daemon requires of its workers.

    Any local process can connect to a loopback port. Without this, one could take
    stacks (private data) or send predictions that are written as the official ones.
    The token is random per daemon start (a daemon resumed after a crash makes a new
    one), written atomically to `token_path` with mode 0600 in a 0700 folder, and
    removed when the daemon closes.
    """

    def __init__(self, host: str, base_port: int) -> None:
        self.value = secrets.token_hex(32)
        self.path = token_path(host, base_port)
        private_dir(self.path.parent)
        self._write()

    def _write(self) -> None:
        """Write the token to a private temporary file and rename it into place: a
        worker never reads half a token, and the file is never readable by others."""
        fd, tmp = tempfile.mkstemp(prefix=".token-", dir=self.path.parent)  # mode 0600
        try:
            with os.fdopen(fd, "w") as f:
                f.write(self.value + "\n")
            os.replace(tmp, self.path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise

    def accepts(self, presented: object) -> bool:
        """True when ``presented`` is this token (compared in constant time)."""
        return isinstance(presented, str) and hmac.compare_digest(presented.encode(), self.value.encode())

    def close(self) -> None:
        """Remove the token file, unless a later daemon on the same port replaced it."""
        try:
            if self.path.read_text().strip() == self.value:
                self.path.unlink()
        except OSError:
            pass


class WorkerToken:
    """The token a worker presents to the daemon at ``stacks_endpoint``.

    `TOKEN_ENV` when set (workers on another setup, e.g. through an SSH tunnel), else
    the daemon's token file, read again whenever it changes: a daemon restarted with
    ``--resume`` on the same port makes a new token, and its workers must follow.
    """

    def __init__(self, stacks_endpoint: str) -> None:
        host, port = split_endpoint(stacks_endpoint)
        self.path = token_path(host, port)
        self._fixed = os.environ.get(TOKEN_ENV, "").strip()
        self._stamp: tuple[int, int, int] | None = None
        self._value = ""

    def get(self) -> str:
        """The current token ("" when there is none yet: the daemon will refuse us)."""
        if self._fixed:
            return self._fixed
        try:
            info = self.path.stat()
        except OSError:
            self._stamp, self._value = None, ""
            return ""
        stamp = (info.st_ino, info.st_mtime_ns, info.st_size)
        if stamp != self._stamp:
            try:
                self._value = self.path.read_text().strip()
                self._stamp = stamp
            except OSError:
                return self._value
            log.debug("read worker token from %s", self.path)
        return self._value
