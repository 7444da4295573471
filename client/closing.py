"""Closing a connection so that its lease can be given back safely.

``conn.close()`` sends Terminate and closes libpq's socket, but the backend leaves
``pg_stat_activity`` only when its process exits, a little later. Releasing the
lease at ``close()`` would let another process connect while the old backend still
counts, and the server would briefly see more than the budget. So each pooled
connection keeps a duplicate of its socket descriptor: after ``close()`` we wait on
the duplicate for end-of-file, which the kernel delivers when the backend process
has exited (it leaves ``pg_stat_activity`` before that).
"""

from __future__ import annotations

import errno
import logging
import os
import select
import socket
import time
from typing import Any, Optional

log = logging.getLogger("poolbroker_client")

_sinks: list = []


def watch(conn: Any) -> Optional[int]:
    """Duplicate the connection's socket descriptor (None if it has none)."""
    try:
        return os.dup(conn.fileno())
    except Exception:
        return None


def wait_eof(fd: Optional[int], timeout: float) -> bool:
    """Wait until the peer of socket ``fd`` has closed, then close ``fd``.
    Returns False if ``timeout`` passed first (the descriptor is closed anyway)."""
    if fd is None:
        return True
    deadline = time.monotonic() + timeout
    try:
        sock = socket.socket(fileno=fd)
    except OSError:
        os.close(fd)
        return True
    try:
        sock.setblocking(False)
        poller = select.poll()
        poller.register(fd, select.POLLIN | select.POLLHUP | select.POLLERR)
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                return False
            if not poller.poll(left * 1000):
                continue
            try:
                if not sock.recv(65536):
                    return True
            except BlockingIOError:
                continue
            except OSError as exc:
                if exc.errno in (errno.EAGAIN, errno.EINTR):
                    continue
                return True  # reset or similar: the connection is gone
    finally:
        sock.close()


def close_and_wait(conn: Any, fd: Optional[int], timeout: float = 10.0) -> bool:
    """Close ``conn`` and wait until the server has seen it go (see module doc)."""
    try:
        conn.close()
    except Exception:
        pass
    ok = wait_eof(fd, timeout)
    if not ok:
        log.warning("backend of a closed connection still there after %.0fs; "
                    "giving its lease back anyway", timeout)
    return ok


def forget_in_child(conn: Any, fd: Optional[int]) -> None:
    """In a forked child: make an inherited connection harmless.

    The child shares the parent's socket. If it closed the connection, or its
    interpreter finalized it at exit, libpq would send Terminate on that shared
    socket and end the parent's session. We point the child's copy of the
    descriptor at a dead socketpair instead, so whatever libpq writes there is lost.
    """
    if fd is not None:
        try:
            os.close(fd)
        except OSError:
            pass
    try:
        target = conn.fileno()
    except Exception:
        return
    a, b = socket.socketpair()
    try:
        os.dup2(a.fileno(), target)
    finally:
        a.close()
    _sinks.append(b)  # keep the other end open so writes land in a buffer, not EPIPE
