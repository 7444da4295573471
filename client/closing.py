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

import logging
import os
import select
import socket
import time
from typing import Any, List, Optional, Tuple

log = logging.getLogger("poolbroker_client")

_sinks: list = []


def watch(conn: Any) -> Optional[int]:
    """Duplicate the connection's socket descriptor (None if it has none)."""
    try:
        return os.dup(conn.fileno())
    except Exception:
        return None


def wait_eof(fds: List[Optional[int]], timeout: float) -> List[int]:
    """Wait until the peer of every socket in ``fds`` has closed, then close them.
    Returns the descriptors whose peer was still there at ``timeout`` (closed too)."""
    socks = {}
    for fd in fds:
        if fd is None:
            continue
        try:
            sock = socket.socket(fileno=fd)
        except OSError:
            os.close(fd)
            continue
        sock.setblocking(False)
        socks[fd] = sock
    poller = select.poll()
    for fd in socks:
        poller.register(fd, select.POLLIN | select.POLLHUP | select.POLLERR)
    deadline = time.monotonic() + timeout
    try:
        while socks:
            left = deadline - time.monotonic()
            if left <= 0:
                return list(socks)
            for fd, _ in poller.poll(left * 1000):
                try:
                    if socks[fd].recv(65536):
                        continue  # late data from the server: keep reading to EOF
                except (BlockingIOError, InterruptedError):
                    continue
                except OSError:
                    pass  # reset: the connection is gone
                poller.unregister(fd)
                socks.pop(fd).close()
        return []
    finally:
        for sock in socks.values():
            sock.close()


def close_and_wait(items: List[Tuple[Any, Optional[int]]], timeout: float = 10.0) -> int:
    """Close every ``(conn, fd)`` and wait until the server has seen them go (see the
    module doc). All Terminates go out first, so N connections cost one wait.
    Returns how many were still there at ``timeout``."""
    for conn, _ in items:
        try:
            conn.close()
        except Exception:
            pass
    late = wait_eof([fd for _, fd in items], timeout)
    if late:
        log.warning("%d closed connection(s) still had a backend after %.0fs; "
                    "giving their leases back anyway", len(late), timeout)
    return len(late)


def cut(fd: int) -> None:
    """Shut down the connection behind ``fd`` (a duplicate of libpq's socket):
    the server sees end-of-file and ends the session; libpq's next use fails."""
    try:
        sock = socket.socket(fileno=os.dup(fd))
    except OSError:
        return
    try:
        sock.shutdown(socket.SHUT_RDWR)
    except OSError:
        pass
    finally:
        sock.close()


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
