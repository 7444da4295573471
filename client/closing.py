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
import threading
import time
from typing import Any, Callable, Dict, List, Optional, Tuple

from . import threads

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
    Returns the descriptors whose peer was still there at ``timeout``: those stay
    open, the caller's to watch (see :func:`watch_until_eof`) or close."""
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
    while socks:
        left = deadline - time.monotonic()
        if left <= 0:
            break
        for fd, _ in poller.poll(left * 1000):
            if _at_eof(socks[fd]):
                poller.unregister(fd)
                socks.pop(fd).close()
    for sock in socks.values():
        sock.detach()  # the descriptor stays open for the caller
    return list(socks)


def _at_eof(sock: socket.socket) -> bool:
    try:
        while sock.recv(65536):
            pass  # late data from the server: keep reading to EOF
        return True
    except (BlockingIOError, InterruptedError):
        return False
    except OSError:
        return True  # reset: the connection is gone


def close_and_wait(items: List[Tuple[Any, Optional[int]]], timeout: float = 10.0,
                   close: Optional[Callable[[Any], None]] = None) -> List[int]:
    """Close every ``(conn, fd)`` (with ``close(conn)``, default ``conn.close()``; a
    ``None`` conn is skipped) and wait until the server has seen them go (see the
    module doc). All Terminates go out first, so N connections cost one wait.
    Returns the positions in ``items`` whose server was not seen to close in time;
    their descriptors stay open (the caller watches or closes them)."""
    for conn, _ in items:
        if conn is None:
            continue
        try:
            if close is None:
                conn.close()
            else:
                close(conn)
        except Exception:
            pass
    late = set(wait_eof([fd for _, fd in items], timeout))
    positions = [i for i, (_, fd) in enumerate(items) if fd is not None and fd in late]
    if positions:
        log.warning("%d closed connection(s) still had a backend after %.0fs (is the "
                    "database reachable?); their leases go back unconfirmed, and stay "
                    "counted until the server is seen to close them", len(positions), timeout)
    return positions


class _EofWatcher:
    """One daemon thread that waits for end-of-file on sockets whose close was not
    confirmed in time, and reports each (EOF seen, or given up at its limit)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._items: Dict[int, Tuple[socket.socket, Callable[[bool], None], float]] = {}
        self._wake_r, self._wake_w = socket.socketpair()
        self._wake_r.setblocking(False)
        self._thread: Optional[threading.Thread] = None
        self._pid = 0

    def add(self, fd: int, on_done: Callable[[bool], None], limit: float) -> None:
        sock = socket.socket(fileno=fd)
        sock.setblocking(False)
        with self._lock:
            if self._thread is None or self._pid != os.getpid():
                if self._pid != os.getpid():  # a forked child: those are the parent's
                    for inherited, _, _ in self._items.values():
                        inherited.close()
                    self._items.clear()
                self._pid = os.getpid()
                self._thread = threading.Thread(target=self._run, daemon=True,
                                                name="poolbroker-eof-watcher")
                threads.start(self._thread)
            self._items[fd] = (sock, on_done, time.monotonic() + limit)
        self._wake_w.send(b"x")

    def _run(self) -> None:
        while True:
            with self._lock:
                items = dict(self._items)
            poller = select.poll()
            poller.register(self._wake_r.fileno(), select.POLLIN)
            for fd in items:
                poller.register(fd, select.POLLIN | select.POLLHUP | select.POLLERR)
            now = time.monotonic()
            wait = min([until - now for _, _, until in items.values()] + [60.0])
            events = dict(poller.poll(max(0.0, wait) * 1000))
            if self._wake_r.fileno() in events:
                try:
                    self._wake_r.recv(4096)
                except OSError:
                    pass
            now = time.monotonic()
            for fd, (sock, on_done, until) in items.items():
                seen = fd in events and _at_eof(sock)
                if seen or now >= until:
                    with self._lock:
                        del self._items[fd]
                    sock.close()
                    try:
                        on_done(seen)
                    except Exception:
                        log.exception("reporting a late close failed")


_watcher = _EofWatcher()


def watch_until_eof(fd: int, on_done: Callable[[bool], None], limit: float) -> None:
    """Keep waiting (in the background, up to ``limit`` seconds) for the server to
    close the socket behind ``fd``; then close ``fd`` and call ``on_done(seen)``."""
    _watcher.add(fd, on_done, limit)


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
