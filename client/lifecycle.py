"""The process's life: leases go back at exit, and a forked child starts afresh.

* at exit (``atexit``; in a multiprocessing child, whose ``os._exit`` skips atexit,
  a multiprocessing finalizer instead) every pool closes and every lease client
  says bye, so the broker frees this process's slots at once rather than after
  its TTL;
* a multiprocessing child stopped with SIGTERM (``Pool.terminate()``, which is what
  ``with multiprocessing.Pool()`` does on exit) does the same before it dies, if
  nobody else handles SIGTERM there (the client's threads block signals, see
  :mod:`poolbroker_client.threads`, so the main thread is the one woken);
* after ``fork()`` the child drops the parent's lease clients (their socket and
  thread are the parent's) and every pool forgets the connections it inherited
  without closing them (that would end the parent's sessions).

Pools take part through :func:`track_pool` and two methods:
``close_at_exit()`` and ``after_fork_in_child()``.
"""

from __future__ import annotations

import atexit
import logging
import os
import signal
import socket
import threading
import time
import weakref
from typing import Any, List, Protocol

from . import leases, threads

log = logging.getLogger("poolbroker_client")


class Tracked(Protocol):
    """What a pool offers this module (:class:`poolbroker_client.core.PoolCore`)."""

    def close_at_exit(self) -> None:
        """Close every connection, in use or not, and give the leases back."""
        ...

    def after_fork_in_child(self) -> None:
        """Forget inherited connections without closing them; start afresh."""
        ...


# Every pool, for fork handling; open pools are also held strongly, so that a pool
# dropped without close() is not collected with leases still counted for it.
_live_pools: "weakref.WeakSet[Any]" = weakref.WeakSet()
_open_pools: set = set()
_exit_hooked_pid = 0
_graveyard: List[Any] = []  # the parent's clients, kept alive so nothing is finalized


def track_pool(pool: Tracked, is_open: bool) -> None:
    """Register ``pool`` (at creation, and whenever it opens or closes)."""
    _live_pools.add(pool)
    if is_open:
        _open_pools.add(pool)
        # a pool opens in the thread that makes it, usually the main one: the
        # only one that may set a signal handler (the first lease request may
        # come from any thread)
        _shutdown_on_sigterm()
    else:
        _open_pools.discard(pool)


def on_first_start() -> None:
    """Once per process (a lease client's first start): make sure leases go back
    when the process exits.

    atexit covers ordinary exits. multiprocessing children end with ``os._exit``,
    which skips atexit, but they run multiprocessing's finalizers first."""
    global _exit_hooked_pid
    if _exit_hooked_pid == os.getpid():
        return
    _exit_hooked_pid = os.getpid()
    try:
        import multiprocessing
        import multiprocessing.util

        if multiprocessing.parent_process() is not None:
            multiprocessing.util.Finalize(None, shutdown, exitpriority=100)
    except Exception:
        pass
    _shutdown_on_sigterm()


#: Seconds a SIGTERMed multiprocessing child spends giving its leases back before
#: it dies anyway, of SIGALRM (then they come back at the TTL).
TERMINATE_GRACE = 2


_sigterm_armed_pid = 0


def _shutdown_on_sigterm() -> None:
    """In a multiprocessing child: SIGTERM (``Pool.terminate()``) kills without
    finalizers, so give the leases back first, then die of SIGTERM as before.
    Only where SIGTERM has its default action (the application's own handler
    wins) and from the main thread (the only one that may set handlers); once
    per process."""
    global _sigterm_armed_pid
    if _sigterm_armed_pid == os.getpid():
        return
    try:
        import multiprocessing

        if multiprocessing.parent_process() is None:
            return
    except Exception:
        return
    if (threading.current_thread() is not threading.main_thread()
            or signal.getsignal(signal.SIGTERM) is not signal.SIG_DFL):
        return
    _sigterm_armed_pid = os.getpid()

    def terminated(signum: int, _frame: Any) -> None:
        signal.signal(signum, signal.SIG_DFL)
        # whatever happens below, dead by the deadline: the main thread may have
        # been interrupted holding a pool's lock, and shutdown would wait for it
        # forever (no thread is started here: the interrupted code may hold
        # threading's own locks)
        signal.signal(signal.SIGALRM, signal.SIG_DFL)
        signal.alarm(TERMINATE_GRACE)
        if _shutdown_pid == os.getpid():
            return  # the interrupted code is giving the leases back already: let it
        shutdown()
        os.kill(os.getpid(), signum)

    signal.signal(signal.SIGTERM, terminated)
    _nudge_on_sigterm(terminated)


#: Seconds between two nudges of a main thread that has not run the SIGTERM handler.
NUDGE_EVERY = 0.1

_wakeup: List[Any] = []  # this process's (reader, writer) for signal.set_wakeup_fd


def _nudge_on_sigterm(handler: Any) -> None:
    """Python runs ``handler`` when the main thread next runs Python code. A
    SIGTERM that lands just before the main thread blocks in C (multiprocessing's
    task-queue lock, whose wait only a signal interrupts) is noted and never
    handled: the child lived on, and ``terminate()`` waited for it forever (1 run
    in 4 under CPU load). Python's C handler also writes the signal's number to
    the wakeup descriptor, whatever the main thread does: a thread of ours reads
    it and sends SIGTERM to the main thread again, which interrupts its wait,
    until the handler has started. Not where the application has a wakeup
    descriptor of its own (asyncio's signal handlers)."""
    reader, writer = socket.socketpair()
    writer.setblocking(False)
    try:
        previous = signal.set_wakeup_fd(writer.fileno(), warn_on_full_buffer=False)
    except (ValueError, OSError):
        previous = None
    if previous is None or previous != -1:
        if previous is not None:
            signal.set_wakeup_fd(previous)  # the application's: leave it
        reader.close()
        writer.close()
        return
    _wakeup[:] = [reader, writer]
    main = threading.main_thread().ident
    assert main is not None

    def watch() -> None:
        while True:
            try:
                arrived = reader.recv(512)
            except OSError:
                return
            if not arrived:
                return
            if signal.SIGTERM not in arrived:
                continue
            # the handler's first step puts back the default action
            deadline = time.monotonic() + TERMINATE_GRACE
            while time.monotonic() < deadline:
                time.sleep(NUDGE_EVERY)
                if signal.getsignal(signal.SIGTERM) is not handler:
                    break
                log.debug("SIGTERM not handled yet: interrupting the main thread")
                signal.pthread_kill(main, signal.SIGTERM)

    threads.start(threading.Thread(target=watch, daemon=True, name="poolbroker-sigterm"))


def _forget_wakeup_in_child() -> None:
    # the descriptor is the parent's socket: our signals must not reach its watcher
    if not _wakeup:
        return
    reader, writer = _wakeup
    try:
        previous = signal.set_wakeup_fd(-1)
        if previous != writer.fileno():
            signal.set_wakeup_fd(previous)
    except (ValueError, OSError):
        pass
    _graveyard.extend((reader, writer))  # not closed: the parent's
    _wakeup.clear()


_shutdown_pid = 0  # the process whose shutdown has begun


def shutdown() -> None:
    """Close every pool of this process and say bye to every broker. Runs at exit;
    idempotent."""
    global _shutdown_pid
    _shutdown_pid = os.getpid()
    for pool in list(_live_pools):
        try:
            pool.close_at_exit()
        except Exception:
            log.exception("closing pool at exit")
    for client in leases.LeaseClient.in_process():
        client.close()


def _after_fork_in_child() -> None:
    # The child must not touch the parent's socket, thread or connections.
    # (pyzmq skips closing inherited sockets in a child.)
    _graveyard.extend(leases.LeaseClient.forget_all())
    _forget_wakeup_in_child()
    _open_pools.clear()
    for pool in list(_live_pools):
        try:
            pool.after_fork_in_child()
        except Exception:
            log.exception("resetting a pool after fork")


atexit.register(shutdown)
if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_after_fork_in_child)
