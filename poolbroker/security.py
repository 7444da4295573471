"""Who may reach the broker: endpoint checks, socket permissions and CURVE keys.

The threat model (also in the README): anyone who can send frames to the broker can
ask for leases, and whoever can administer it can change every budget. So:

* an ipc socket is created owner-only (0600), or 0660 for one group
  (``--socket-group``); a socket in a directory every user can write is warned
  about (another user could take the path while the broker is down);
* TCP beyond loopback is refused unless CURVE is on: the broker's key pair
  (``--curve-secret``) and an allow-list of client public keys (``--curve-clients``,
  a directory of certificates made by ``poolbroker keygen``), checked by pyzmq's ZAP
  authenticator; clients find the keys through ``POOLBROKER_SERVER_KEY`` (the
  broker's public certificate) and ``POOLBROKER_CLIENT_KEY`` (their own secret
  certificate);
* administration (resize, drain, pause, resume) is accepted only on the admin
  endpoint (``--admin-bind``, by default ``ipc://PATH.admin`` beside an ipc socket,
  always owner-only); configuration reloads are signals (SIGHUP), local already.
"""

from __future__ import annotations

import ipaddress
import logging
import os
import stat
from typing import Any, Optional, Tuple

import zmq
import zmq.auth

log = logging.getLogger("poolbroker")

SERVER_KEY_ENV = "POOLBROKER_SERVER_KEY"
CLIENT_KEY_ENV = "POOLBROKER_CLIENT_KEY"


class InsecureEndpoint(ValueError):
    """An endpoint the broker refuses to serve as configured."""


def ipc_path(url: str) -> Optional[str]:
    return url[len("ipc://"):] if url.startswith("ipc://") else None


def is_loopback(url: str) -> bool:
    """True for ipc and for tcp on a loopback address (127.0.0.0/8, ::1, localhost)."""
    if url.startswith("ipc://"):
        return True
    if not url.startswith("tcp://"):
        return False
    host = url[len("tcp://"):].rsplit(":", 1)[0].strip("[]")
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:  # "*", an interface name, a host name: reachable from outside
        return False


def check_endpoint(url: str, *, curve: bool) -> None:
    """Refuse TCP beyond loopback without CURVE; warn about a socket directory any
    user can write."""
    path = ipc_path(url)
    if path is not None:
        directory = os.path.dirname(os.path.abspath(path)) or "/"
        try:
            mode = os.stat(directory).st_mode
        except OSError:
            return
        if mode & stat.S_IWOTH:
            log.warning("the ipc socket %s is in %s, which every user can write: another user "
                        "could take the path while the broker is down and see the requests "
                        "of clients; prefer a directory only this user (or group) can write, "
                        "such as /run/APP/", path, directory)
        return
    if not curve and not is_loopback(url):
        raise InsecureEndpoint(
            f"refusing to serve {url} without authentication: anyone who can reach it could "
            "take leases and exhaust the budget. Bind to 127.0.0.1, or turn CURVE on with "
            "--curve-secret (the broker's key, from `poolbroker keygen`) and --curve-clients "
            "(a directory of the public keys of allowed clients)")


def default_admin_url(url: str) -> Optional[str]:
    """``ipc://PATH.admin`` beside an ipc socket (if the path fits), else None."""
    path = ipc_path(url)
    if path is None or len((path + ".admin").encode()) > 107:
        return None
    return f"ipc://{path}.admin"


def bind_private(sock: zmq.Socket, url: str, group: Optional[int] = None) -> None:
    """Bind ``sock``; an ipc socket file is created 0600 (no moment with a wider
    mode), then given to ``group`` with 0660 if one is named."""
    path = ipc_path(url)
    if path is None:
        sock.bind(url)
        return
    old = os.umask(0o177)
    try:
        sock.bind(url)
    finally:
        os.umask(old)
    if group is not None:
        os.chown(path, -1, group)
        os.chmod(path, 0o660)


def load_server_keys(secret_file: str) -> Tuple[bytes, bytes]:
    """(public, secret) from a secret certificate made by ``poolbroker keygen``."""
    public, secret = zmq.auth.load_certificate(secret_file)
    if not secret:
        raise InsecureEndpoint(f"{secret_file} holds no secret key: pass the .key_secret file")
    return public, secret


def client_keys(environ: Any = os.environ) -> Optional[Tuple[bytes, bytes, bytes]]:
    """(server public, client public, client secret) from ``POOLBROKER_SERVER_KEY``
    and ``POOLBROKER_CLIENT_KEY`` (certificate files), or None if neither is set.
    Raises :class:`InsecureEndpoint` naming what is wrong."""
    server_file, client_file = environ.get(SERVER_KEY_ENV), environ.get(CLIENT_KEY_ENV)
    if not server_file and not client_file:
        return None
    if not (server_file and client_file):
        raise InsecureEndpoint(f"CURVE needs both {SERVER_KEY_ENV} (the broker's public key "
                               f"file) and {CLIENT_KEY_ENV} (this client's secret key file)")
    try:
        server_public, _ = zmq.auth.load_certificate(server_file)
        public, secret = zmq.auth.load_certificate(client_file)
    except (OSError, ValueError) as exc:
        raise InsecureEndpoint(f"cannot read the CURVE keys: {exc}") from None
    if not secret:
        raise InsecureEndpoint(f"{CLIENT_KEY_ENV}={client_file} holds no secret key: pass "
                               "the .key_secret file")
    return server_public, public, secret


def apply_client_curve(sock: zmq.Socket,
                       keys: Optional[Tuple[bytes, bytes, bytes]] = None) -> bool:
    """Set CURVE client keys on ``sock`` (by default from :func:`client_keys`).
    True if CURVE is on."""
    keys = keys or client_keys()
    if keys is None:
        return False
    sock.curve_serverkey, sock.curve_publickey, sock.curve_secretkey = keys
    return True


def keygen(directory: str, name: str) -> Tuple[str, str]:
    """Write ``NAME.key`` (public) and ``NAME.key_secret`` (0600) into ``directory``."""
    os.makedirs(directory, mode=0o700, exist_ok=True)
    public, secret = zmq.auth.create_certificates(directory, name)
    os.chmod(secret, 0o600)
    return public, secret
