"""PoolCore: the local pool every poolbroker pool is built on, whatever the driver.

Every connection the pool opens sits inside a lease granted by the broker, so the
total across all processes never exceeds the broker's budget. The hot path (an idle
connection is here) touches no socket. The cold path asks the broker for a lease
(one round trip), connects, and tells the broker the backend pid without waiting.

The core knows no driver: a :class:`~poolbroker_client.connectors.Connector`
opens, inspects and closes connections. :class:`poolbroker_client.ConnectionPool`
is this core with psycopg2; the drop-ins (:mod:`poolbroker_client.compat`) are thin
layers over it, through the hooks documented in the section "hooks for drop-ins"
below. A connection is retired in one way only: taken out of the pool, closed,
and its lease given back once the server has seen it close.
"""

from __future__ import annotations

import enum
import itertools
import logging
import math
import os
import random
import threading
import time
from collections import deque
from typing import (
    Any,
    Callable,
    ContextManager,
    Deque,
    Dict,
    Generic,
    List,
    Optional,
    Set,
    Tuple,
    Union,
    cast,
)

from . import closing, threads
from .connectors import CT, Connector, Status
from .errors import BrokerError, PoolClosed, PoolError, PoolTimeout, TooManyRequests
from .leases import LeaseClient, LeaseRequest, settings
from .lifecycle import track_pool

log = logging.getLogger("poolbroker_client")


class _Conn:
    """A pooled connection and what the pool knows about it."""

    __slots__ = ("conn", "lease", "fd", "created", "returned", "expires", "out_since")

    def __init__(self, conn: Any, lease: int, fd: Optional[int], expires: float) -> None:
        self.conn = conn
        self.lease = lease
        self.fd = fd
        self.created = self.returned = time.monotonic()
        self.expires = expires
        # when it was checked out; None while it is not in use (one store on the hot path)
        self.out_since: Optional[float] = self.created


class _Checkout(Generic[CT]):
    """What :meth:`PoolCore.connection` returns (a class rather than a contextlib
    generator: it is on every transaction's path, and with an idle connection
    ``with pool.connection():`` went from 2.66 to 1.91 us, bench/run.py)."""

    __slots__ = ("_pool", "_timeout", "_conn")

    def __init__(self, pool: "PoolCore[CT]", timeout: Optional[float]) -> None:
        self._pool = pool
        self._timeout = timeout

    def __enter__(self) -> CT:
        conn = self._conn = self._pool.getconn(self._timeout)
        try:
            # the driver's own transaction block (psycopg2: commit or roll back,
            # the connection stays open)
            cast(Any, conn).__enter__()
        except BaseException:
            self._pool.putconn(conn)
            raise
        return conn

    def __exit__(self, *exc: Any) -> None:
        conn = self._conn
        try:
            cast(Any, conn).__exit__(*exc)
        finally:
            self._pool.putconn(conn)


class Signal:
    """A one-shot :class:`threading.Event` on a bare lock: ``set`` wakes the one
    thread in ``wait``. (An Event builds a Condition, and a waiting caller is
    handed a connection on every transaction of a busy pool: this is lighter.)"""

    __slots__ = ("_lock", "_set")

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._lock.acquire()  # held until set
        self._set = False

    def set(self) -> None:
        if not self._set:
            self._set = True
            try:
                self._lock.release()
            except RuntimeError:  # set twice at once: released already
                pass

    def is_set(self) -> bool:
        return self._set

    def wait(self, timeout: float) -> bool:
        """Wait up to ``timeout`` seconds for :meth:`set`; True if it was."""
        if self._set:
            return True
        if self._lock.acquire(timeout=max(0.0, timeout)):
            try:
                self._lock.release()  # a later wait passes too
            except RuntimeError:  # (a racing second set released it already)
                pass
        return self._set


class Waiter:
    """A caller waiting for a connection (see :meth:`PoolCore.checkout`). Served by
    exactly one of: a returned connection, a granted lease (the caller then
    connects inside it), or an error; :meth:`PoolCore.finish_wait` says which.
    ``wake`` is called (from any thread, under the pool's lock: it must not
    block) once it is served; by default it sets ``event``."""

    __slots__ = ("event", "wake", "deadline", "done", "conn", "lease", "error", "req",
                 "warm", "granted_at", "nudge", "thread", "ahead")

    def __init__(self, deadline: float, warm: bool = False,
                 wake: Optional[Callable[[], None]] = None) -> None:
        self.warm = warm  # opened by the janitor for min_size, not by a caller
        self.event = Signal()
        self.wake: Callable[[], None] = wake or self._set
        # set while its caller may read the broker's socket (LeaseClient.serve_until):
        # a connection handed over by another thread must interrupt that
        self.nudge: Optional[Callable[[int], None]] = None
        self.thread = threading.get_ident()  # whose wait it is
        self.deadline = deadline
        self.done = False
        self.conn: Optional[_Conn] = None
        self.lease: Optional[int] = None
        self.error: Optional[BaseException] = None
        self.req: Optional[LeaseRequest] = None
        self.granted_at = 0.0  # when the grant reached us (a freeze after it shows)
        self.ahead = False  # served by the lease asked ahead: it waited for no lease

    def _set(self) -> None:
        self.event.set()
        nudge = self.nudge  # read after the set: see LeaseClient.serve_until
        if nudge is not None:
            nudge(self.thread)


class PoolCore(Generic[CT]):
    """A pool of connections inside the broker's budget, for any driver.

    :param conninfo: libpq connection string (or URL), or a function returning
        one (called at each connect).
    :param connector: the driver (see :mod:`poolbroker_client.connectors`).
    :param broker: the broker's ZeroMQ endpoint; default ``$POOLBROKER_URL``.
    :param pool: the broker pool (budget) to lease from; default
        ``$POOLBROKER_POOL``, then ``"default"``.
    :param min_size: connections kept open (and leased) even when idle.
    :param max_size: this process's own cap; ``None`` for no local cap (the
        broker's budget still applies).
    :param timeout: default seconds :meth:`getconn` waits, covering both the wait
        for a lease and the connect.
    :param max_idle: seconds an idle connection above ``min_size`` is kept before
        it is closed and its lease given back.
    :param max_lifetime: seconds after which a connection is replaced.
    :param kwargs: extra keyword arguments for the driver's connect, or a
        function returning them (called at each connect).
    :param configure: called with each new connection before first use.
    :param reset: called with each connection handed back (after any rollback).
    :param name: the pool's name in logs and stats; default ``pool-N``.
    :param open: open at once (default); otherwise call :meth:`open`.
    :param max_waiting: callers allowed to wait at once (0: no limit); one more
        gets :class:`TooManyRequests` at once.
    :param reconnect_timeout: seconds of failing to open connections for
        ``min_size`` after which ``reconnect_failed`` is called (once per outage).
    :param reconnect_failed: called with the pool when that happens.
    :param lease_ahead: while a caller who found no idle connection connects,
        ask the broker for one lease more, for the next such caller (a burst, or
        connections discarded on return): it then only connects. The broker
        grants it only while the pool keeps another free slot besides. The
        spare slot has no connection and goes back after 100 ms unused, or at
        once when others wait in the pool; meanwhile the broker counts it
        (``leased`` may be one above this process's connections).
    """

    _counter = itertools.count(1)

    def __init__(
        self,
        conninfo: Union[str, Callable[[], str]] = "",
        *,
        connector: Connector[CT],
        broker: Optional[str] = None,
        pool: Optional[str] = None,
        min_size: int = 0,
        max_size: Optional[int] = None,
        timeout: float = 30.0,
        max_idle: float = 600.0,
        max_lifetime: float = 3600.0,
        kwargs: Union[Dict[str, Any], Callable[[], Dict[str, Any]], None] = None,
        configure: Optional[Callable[[CT], None]] = None,
        reset: Optional[Callable[[CT], None]] = None,
        name: Optional[str] = None,
        open: bool = True,
        close_timeout: float = 10.0,
        max_waiting: int = 0,
        reconnect_timeout: float = 300.0,
        reconnect_failed: Optional[Callable[[Any], None]] = None,
        lease_ahead: bool = False,
    ) -> None:
        if min_size < 0:
            raise ValueError("min_size must be >= 0")
        if max_size is not None and max_size < max(1, min_size):
            raise ValueError("max_size must be >= min_size and >= 1")
        if timeout <= 0:
            raise ValueError("timeout must be > 0")
        self.conninfo = conninfo
        self.connector = connector
        self.kwargs: Union[Dict[str, Any], Callable[[], Dict[str, Any]]] = \
            kwargs if callable(kwargs) else dict(kwargs or {})
        self.max_waiting = max_waiting
        self.reconnect_timeout = reconnect_timeout
        self._reconnect_failed = reconnect_failed
        self._broker_pool, self.broker = settings(pool, broker)
        self.min_size = min_size
        self.max_size = max_size
        self.timeout = timeout
        self.max_idle = max_idle
        self.max_lifetime = max_lifetime
        self.close_timeout = close_timeout
        self.lease_ahead = lease_ahead
        self._configure = configure
        self._reset = reset
        self.name = name or f"pool-{next(self._counter)}"
        self._init_state()
        self._closed = True
        track_pool(self, False)
        if open:
            self.open()

    def _init_state(self) -> None:
        self._lock = threading.Lock()
        self._cond = threading.Condition(self._lock)  # wait() and the janitor
        self._idle: Deque[_Conn] = deque()
        self._all: Dict[int, _Conn] = {}  # id(conn) -> _Conn, idle or in use
        self._waiting: Deque[Waiter] = deque()
        self._opening = 0  # leases granted, connection being opened
        self._pending = 0  # lease requests outstanding at the broker
        # The callers' requests belong to the pool, not to a waiting thread: a
        # thread served by a returned connection leaves its request to the next
        # one, so a busy pool sends nothing to the broker in steady state.
        self._reqs: Dict[int, LeaseRequest] = {}
        # One lease asked for ahead of need (timeout 0: granted from room or
        # refused, never queued): after a caller waited for a lease in a pool
        # nobody else waits in, the next caller who finds no idle connection
        # takes the spare and only connects (see _ask_ahead_locked).
        self._ahead: Optional[LeaseRequest] = None
        self._spare: Optional[Tuple[int, float]] = None  # (lease, granted at)
        # what moving a lease costs here (a close seen by the server, and getting
        # one back: the wait for a lease plus the connect), learnt as we go: how
        # long an idle connection is kept while others wait for one (_hold_idle)
        self._acquire_s = 0.002
        self._close_s = 0.0005
        # how long a connection put back here waits for its next user (a moving
        # average of the gaps; 0 when a waiter takes it at once): the prediction
        # that decides whether to keep an idle one while others wait (_hold_idle)
        self._gap_s = 0.0
        self._returns: Deque[float] = deque(maxlen=64)  # put back, not yet reused
        self._closing = 0  # closed, waiting for the server to see it before release
        self._jobs: Deque[_Conn] = deque()  # discarded connections for the janitor to close
        self._janitor: Optional[threading.Thread] = None
        self._warming = False
        self._warm_backoff = 0.0
        self._revive = False  # start the janitor on first use (after fork)
        self._client: Optional[LeaseClient] = None
        self._stats: Dict[str, float] = dict.fromkeys(_STAT_COUNTERS, 0)
        self._drained_at = 0.0  # connections opened before are replaced on return
        self._failing_since: Optional[float] = None  # warm-up connects failing since

    # ----------------------------------------------------------------- public

    @property
    def pool(self) -> str:
        """The broker pool (budget) this pool leases from."""
        return self._broker_pool

    @property
    def closed(self) -> bool:
        """True if the pool is closed (or was never opened)."""
        return self._closed

    def open(self, wait: bool = False, timeout: float = 30.0) -> None:
        """Open the pool: start keeping ``min_size`` connections. With ``wait``,
        block until they are open (see :meth:`wait`)."""
        with self._lock:
            if not self._closed:
                return
            self._closed = False
            track_pool(self, True)
            if self.min_size:
                self._start_janitor_locked()
        log.info("%s: opened (broker %s, pool %r, min_size %d, max_size %s)", self.name,
                 self.broker, self._broker_pool, self.min_size, self.max_size)
        if wait:
            self.wait(timeout)

    def wait(self, timeout: float = 30.0) -> None:
        """Block until ``min_size`` connections are open; :class:`PoolTimeout` if
        that takes longer than ``timeout``."""
        deadline = time.monotonic() + timeout
        with self._cond:
            while len(self._all) < self.min_size:
                self._check_open()
                left = deadline - time.monotonic()
                if left <= 0:
                    raise PoolTimeout(
                        f"{self.name}: {len(self._all)} of min_size {self.min_size} connections "
                        f"open after {timeout:g}s ({self._lease_client().describe_broker()})")
                self._cond.wait(left)

    def getconn(self, timeout: Optional[float] = None) -> CT:
        """Take a connection; hand it back with :meth:`putconn`.

        Waits up to ``timeout`` seconds (default: the pool's ``timeout``) for a
        connection to come back or a lease to be granted, then raises
        :class:`PoolTimeout`. Database errors on connect are raised as they are,
        and the lease goes back at once.
        """
        start = time.monotonic()
        if timeout is None:
            timeout = self.timeout
        got = self.checkout(start, timeout, lead=True)
        if not isinstance(got, Waiter):
            return got
        # read the broker's answer on this thread (and send what checkout asked);
        # a connection handed over meanwhile interrupts that
        client = self._lease_client()
        got.nudge = client.nudge
        client.serve_until(got.event.is_set, got.deadline)
        got.event.wait(max(0.0, got.deadline - time.monotonic()))  # (what the lead left)
        handed, lease = self.finish_wait(got, start, timeout)
        if lease is None:
            assert handed is not None
            return handed
        conn = self.open_leased(lease, got.deadline, for_caller=True, granted_at=got.granted_at)
        self.note_acquired(got, start)
        return conn

    def putconn(self, conn: CT) -> None:
        """Hand back a connection from :meth:`getconn`.

        A transaction left open is rolled back; a closed or broken connection is
        discarded and its lease given back once the server has seen it close.
        """
        self._return(conn, None)

    def _return(self, conn: CT, discard: Optional[Tuple[str, "Retire"]],
                now: bool = False) -> None:
        """putconn(), or with ``discard`` (reason, kind) close it instead of keeping
        it (``now``: in this thread, else the janitor's)."""
        self._lock.acquire()  # not ``with``: about 80 ns less on CPython 3.11 (every return)
        try:
            # the common case, under the same lock: a clean connection back to
            # an open pool, nobody waiting, nothing owed to the broker
            if not discard and self.keep_locked(conn):
                return
            c = self._all.get(id(conn))
            if c is None or c.conn is not conn:
                raise PoolError(f"can't return connection to pool {self.name!r}, "
                                "it doesn't come from it")
            if c.out_since is None:
                raise PoolError(f"{self.name}: connection returned twice")
            c.out_since = None
        finally:
            self._lock.release()
        if discard:
            self._discard(c, *discard, now=now)
            return
        retire = self._check_returned(c)
        if retire:
            self._discard(c, *retire)
            return
        self._give_back(c)

    def connection(self, timeout: Optional[float] = None) -> "ContextManager[CT]":
        """``with pool.connection() as conn:`` commits on success, rolls back on
        error, and gives the connection back to the pool either way."""
        return _Checkout(self, timeout)

    def close(self, timeout: float = 5.0) -> None:
        """Close the pool: waiting callers get :class:`PoolClosed`, idle connections
        are closed and their leases given back (the broker has them when this
        returns, unless it does not answer within a second); connections in use
        are closed when they come back."""
        if self._shut(timeout):
            self._flush()

    def _flush(self) -> None:
        # releases ride on the next message, and after a close there may be none:
        # the process may end next without atexit (os._exit, as Celery's and
        # billiard's children do), and the slots would stay taken until the TTL
        client = self._client
        if client is not None and not client.flush():
            log.info("%s: the broker did not confirm the releases in time; they go with "
                     "the next message, or come back at the TTL", self.name)

    def _shut(self, timeout: float) -> bool:
        """:meth:`close` but for the flush; False if the pool was closed already."""
        with self._lock:
            if self._closed:
                return False
            self._closed = True
            track_pool(self, False)
            idle = self._take_all_idle_out_locked()
            spare = self._drop_spare_locked()
            self._withdraw_ahead_locked()  # (an answer on its way goes back: closed)
            waiters = list(self._waiting)
            self._waiting.clear()
            for w in waiters:
                self._fail_locked(w, PoolClosed(f"the pool {self.name!r} is closed"))
            janitor = self._janitor
            self._cond.notify_all()
        if spare is not None:
            self._lease_client().release(spare)
        if idle:
            self._close_and_release(idle)
        if janitor is not None and janitor is not threading.current_thread():
            janitor.join(timeout)
        log.info("%s: closed", self.name)
        return True

    def __enter__(self) -> "PoolCore[CT]":
        self.open()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def __repr__(self) -> str:
        return (f"<{type(self).__name__} {self.name!r} broker={self.broker!r} "
                f"pool={self._broker_pool!r} size={len(self._all)} idle={len(self._idle)} "
                f"waiting={len(self._waiting)} {'closed' if self._closed else 'open'}>")

    def get_stats(self) -> Dict[str, Any]:
        """Figures like psycopg_pool's, plus the lease figures: ``leases_held``
        (connections open, opening or closing, and a spare lease asked ahead),
        ``leases_requested`` (asks outstanding at the broker),
        ``leases_recalled``, ``leases_yielded``, ``leases_ahead`` (callers served
        by the spare lease, without waiting for the broker), ``leases_lost``."""
        with self._lock:
            stats: Dict[str, Any] = {
                "pool_min": self.min_size,
                "pool_max": self.max_size or 0,
                "pool_size": len(self._all) + self._opening,
                "pool_available": len(self._idle),
                "requests_waiting": len(self._waiting),
                "leases_held": len(self._all) + self._opening + self._closing
                + (self._spare is not None),
                "leases_requested": self._pending,
            }
            for key, value in self._stats.items():
                stats[key] = int(value)
        return stats

    def pop_stats(self) -> Dict[str, Any]:
        """Like :meth:`get_stats`, and reset the counters."""
        stats = self.get_stats()
        with self._lock:
            self._stats = dict.fromkeys(_STAT_COUNTERS, 0)
        return stats

    # ----------------------------------------------------------------- waiting

    def _lease_client(self) -> LeaseClient:
        client = self._client
        if client is None:
            client = self._client = LeaseClient.for_url(self.broker)
            client.register(self)
        return client

    def _capacity_left(self) -> float:
        if self.max_size is None:
            return float("inf")
        return self.max_size - (len(self._all) + self._opening + self._pending + self._closing
                                + (self._spare is not None))

    def _needing(self) -> int:
        """Callers waiting for a connection that have no lease yet."""
        return sum(1 for w in self._waiting if not w.done)

    def _grow_locked(self, lead: bool = False) -> None:
        """Ask the broker for as many leases as callers wait for, as the local cap
        allows."""
        if self._closed:
            return
        needing = self._needing()
        missing = needing - len(self._reqs)
        if missing <= 0:
            return
        now = time.monotonic()
        # long enough for the caller who will wait longest; those who give up
        # earlier leave the request to the others (or it is cancelled)
        left = max((w.deadline for w in self._waiting if not w.done), default=now) - now
        if left <= 0:
            return
        client = self._lease_client()
        for _ in range(missing):
            if self._capacity_left() <= 0:
                return
            self._pending += 1
            req = client.acquire(self._broker_pool, left, self._on_lease, lead=lead)
            self._reqs[req.rid] = req

    def _trim_locked(self) -> None:
        """Cancel requests nobody could use: all of them once no caller waits;
        while some wait, those beyond the waiters plus the connections in use
        (a returning thread takes its connection back to a waiter and comes back
        itself at once: a request cancelled then would be asked again)."""
        needing = self._needing()
        keep = needing + (len(self._all) - len(self._idle)) if needing else 0
        excess = len(self._reqs) - keep
        if excess <= 0:
            return
        client = self._lease_client()
        for rid in sorted(self._reqs, reverse=True)[:excess]:  # the newest go
            req = self._reqs.pop(rid)
            if client.cancel(req):
                self._pending -= 1

    def _on_lease(self, req: LeaseRequest, lease: Optional[int],
                  error: Optional[BaseException], w: Optional[Waiter] = None) -> None:
        """A pool request (or ``w``'s own, for min_size) was answered. Runs on the
        I/O thread: no blocking here."""
        spare = None
        with self._lock:
            self._pending -= 1
            self._reqs.pop(req.rid, None)
            if w is not None and w.req is req:
                w.req = None
            if error is not None:
                # the broker gave up on this request; a timeout is each caller's
                # own to report, anything else (unknown pool, draining) goes to
                # the longest waiting caller (or the warm-up waiter)
                timed_out = isinstance(error, BrokerError) and error.code == "timeout"
                target = w if w is not None and not w.done else None
                if target is None and not timed_out:
                    target = self._first_waiting_locked()
                if target is not None:
                    self._unqueue(target)
                    self._fail_locked(target, error)
                self._grow_locked()
                return
            target = None
            if not self._closed:
                # the longest waiting caller (or w, if still waiting)
                target = w if w is not None and not w.done else self._first_waiting_locked()
            if target is None:
                spare = lease
            else:
                assert lease is not None  # (no error: a grant)
                self._serve_locked(target, lease)
        if spare is not None:
            self._lease_client().release(spare)

    def _serve_locked(self, target: Waiter, lease: int) -> None:
        """Hand ``lease`` to ``target``, who connects in it; with ``lease_ahead``,
        a caller who had to wait for a lease makes the pool ask for the next one."""
        self._unqueue(target)
        target.lease = lease
        target.granted_at = time.monotonic()
        target.done = True
        self._opening += 1
        target.wake()
        self._trim_locked()
        if not target.warm:
            self._ask_ahead_locked()

    def _ask_ahead_locked(self, lead: bool = True) -> None:
        """Ask for one lease before it is needed, while the caller just served
        connects: the next caller to find no idle connection then takes it and
        only connects, without a round trip to the broker. Only while nobody
        else waits in the pool, one at a time, within ``max_size``; the broker
        grants it only from room to spare (a free slot stays besides) or
        refuses it at once, so it never queues there, never takes the slot
        another process is about to ask for, and never makes anyone give a
        lease back. ``lead``: a pump of the broker's socket follows on this
        thread (a grant's callback, or a caller about to call serve_until),
        which sends it without waking the I/O thread (see
        :meth:`LeaseClient.acquire`)."""
        if self._ahead is not None and time.monotonic() - self._ahead.created > AHEAD_STALE:
            self._withdraw_ahead_locked()  # unanswered (lost with a broker restart, say)
        if (not self.lease_ahead or self._closed or self._ahead is not None
                or self._spare is not None or self._capacity_left() <= 0 or self._contended()):
            return
        self._pending += 1
        self._ahead = self._lease_client().acquire(self._broker_pool, 0.0, self._on_ahead,
                                                   lead=lead, ahead=True)

    def _withdraw_ahead_locked(self) -> None:
        """Cancel the lease asked ahead, if any (an answer already on its way
        still reaches :meth:`_on_ahead`, which counts it)."""
        if self._ahead is not None and self._lease_client().cancel(self._ahead):
            self._pending -= 1
        self._ahead = None

    def _on_ahead(self, req: LeaseRequest, lease: Optional[int],
                  error: Optional[BaseException]) -> None:
        """The broker answered the lease asked ahead (I/O thread, no blocking): a
        waiting caller takes it; else it is kept as the spare for up to
        :meth:`_spare_hold`, unless others wait in the pool. A refusal (no room
        now, or an error the callers' own requests will meet) ends it."""
        give_back = None
        with self._lock:
            self._pending -= 1
            if self._ahead is req:
                self._ahead = None
            if lease is None:
                return
            target = None if self._closed else self._first_waiting_locked()
            if target is not None:
                self._serve_locked(target, lease)
            elif self._closed or self._spare is not None or self._contended():
                give_back = lease
            else:
                self._spare = (lease, time.monotonic())
                self._start_janitor_locked()
                self._cond.notify_all()  # the janitor gives it back if unused
        if give_back is not None:
            self._lease_client().release(give_back)

    def _spare_hold(self) -> float:
        # under half a heartbeat: an older grant would be in doubt (check_fresh)
        return min(AHEAD_HOLD, self._lease_client().heartbeat / 2)

    def _spare_good_locked(self, now: float) -> bool:
        """Whether the spare lease may still be connected in: within its hold,
        not lost, and nobody else waits in the pool (then it goes back)."""
        spare = self._spare
        return (spare is not None and now - spare[1] < self._spare_hold()
                and not self._closed and not self._contended()
                and not self._lease_client().is_lost(spare[0]))

    def _drop_spare_locked(self) -> Optional[int]:
        """Take the spare lease out (to give back), if the pool has one."""
        spare, self._spare = self._spare, None
        return None if spare is None else spare[0]

    def _first_waiting_locked(self) -> Optional[Waiter]:
        """The caller waiting longest for a connection, if any."""
        return next((w for w in self._waiting if not w.done), None)

    def _unqueue(self, w: Waiter) -> None:
        if not w.warm:
            self._waiting.remove(w)

    # ----------------------------------------------------------------- hooks for drop-ins
    # getconn() in three steps, so that an async pool can await the middle one:
    # checkout (never blocks), wait for the waiter's wake, finish_wait; then, if
    # a lease came rather than a connection, connect inside it (open_leased, or
    # the async pool's own connect followed by adopt and add_opened).

    def checkout(self, start: float, timeout: float,
                 wake: Optional[Callable[[], None]] = None,
                 lead: bool = False) -> Union[CT, Waiter]:
        """An idle connection (marked in use), or a :class:`Waiter` queued for
        one (``wake`` is called when it is served). Never blocks. ``lead``: the
        caller calls :meth:`LeaseClient.serve_until` next, which sends the lease
        requests made here (see :meth:`LeaseClient.acquire`).
        :class:`PoolClosed` if closed, :class:`TooManyRequests` if
        ``max_waiting`` callers wait already."""
        self._lock.acquire()  # not ``with``: about 80 ns less on CPython 3.11 (every checkout)
        try:
            self._check_open()
            self._stats["requests_num"] += 1
            if self._revive:
                self._revive = False
                self._start_janitor_locked()
            if self._returns:
                self._note_reuse_locked(start)
            if self._idle:
                c = self._idle.pop()  # LIFO: the spare ones at the left age out
                c.out_since = start
                return c.conn
            if self._spare is not None:
                served = self._checkout_spare_locked(start, timeout, wake, lead)
                if served is not None:
                    return served
            if self.max_waiting and len(self._waiting) >= self.max_waiting:
                self._stats["requests_errors"] += 1
                raise TooManyRequests(f"the pool {self.name!r} has already "
                                      f"{len(self._waiting)} requests waiting")
            waiter = Waiter(start + timeout, wake=wake)
            self._waiting.append(waiter)
            self._stats["requests_queued"] += 1
            self._grow_locked(lead)
        finally:
            self._lock.release()
        return waiter

    def _checkout_spare_locked(self, start: float, timeout: float,
                               wake: Optional[Callable[[], None]],
                               lead: bool) -> Optional[Waiter]:
        """A waiter already served with the spare lease (and the next asked
        ahead), or None if there is none still good."""
        spare = self._spare
        if spare is None or not self._spare_good_locked(start):
            stale = self._drop_spare_locked()
            if stale is not None:
                self._lease_client().release(stale)
            return None
        self._spare = None
        w = Waiter(start + timeout, wake=wake)
        w.lease, w.granted_at = spare
        w.done = w.ahead = True
        self._opening += 1
        self._stats["leases_ahead"] += 1
        self._ask_ahead_locked(lead)
        w.wake()
        return w

    def finish_wait(self, w: Waiter, start: float,
                    timeout: float) -> Tuple[Optional[CT], Optional[int]]:
        """After ``w``'s wake, or its deadline: ``(conn, None)`` for a connection
        handed over, ``(None, lease)`` for a lease to connect in (with
        :meth:`open_leased`); raises the error it got, or :class:`PoolTimeout`."""
        with self._lock:
            if not w.done:
                w.done = True
                self._waiting.remove(w)
                self._trim_locked()
                self._stats["requests_errors"] += 1
                self._stats["requests_wait_ms"] += (time.monotonic() - start) * 1000
                message = self._timeout_message(timeout)
                self._grow_locked()
            else:
                message = None
                self._stats["requests_wait_ms"] += (time.monotonic() - start) * 1000
        if message is not None:
            raise PoolTimeout(message)
        if w.conn is not None:
            return w.conn.conn, None
        if w.error is not None:
            if isinstance(w.error, BrokerError) and w.error.code == "timeout":
                raise PoolTimeout(f"couldn't get a connection after {timeout:g}s: "
                                  f"{self._where()}: {w.error}")
            raise w.error
        assert w.lease is not None
        return None, w.lease

    def abandon(self, w: Waiter) -> None:
        """The caller behind ``w`` gives up (cancelled): whatever served it goes
        back (a connection to the pool, a lease to the broker)."""
        with self._lock:
            if not w.done:
                w.done = True
                self._waiting.remove(w)
                self._trim_locked()
                self._stats["requests_errors"] += 1
                self._grow_locked()
                return
            conn, lease = w.conn, w.lease
            w.conn = w.lease = None
            if lease is not None:
                self._opening -= 1
                self._grow_locked()
        if conn is not None:
            self.putconn(conn.conn)
        elif lease is not None:
            self._lease_client().release(lease)

    def note_acquired(self, w: Waiter, start: float) -> None:
        """``w``'s caller waited from ``start`` for a lease and connected: what
        getting a slot here costs, a moving average (see :meth:`_hold_idle`). A
        caller served by the spare lease waited for none: nothing to learn."""
        if w.ahead:
            return
        self._acquire_s += (time.monotonic() - start - self._acquire_s) / 8

    def _timeout_message(self, timeout: float) -> str:
        client = self._lease_client()
        silent = client.last_reply is None or \
            time.monotonic() - client.last_reply > client.quiet_limit()
        if silent:
            why = f"the broker does not answer: {client.describe_broker()}"
        else:
            local = "" if self.max_size is None else f", local max_size {self.max_size}"
            why = (f"the budget is full ({len(self._waiting)} other request(s) waiting here, "
                   f"{len(self._all)} connection(s) held here{local})")
        return f"couldn't get a connection after {timeout:g}s: {self._where()}: {why}"

    def _where(self) -> str:
        return f"pool {self.name!r} (broker {self.broker}, pool {self._broker_pool!r})"

    def _cancel_req_locked(self, w: Waiter) -> None:
        if w.req is not None:
            if self._lease_client().cancel(w.req):
                self._pending -= 1
            w.req = None

    def _fail_locked(self, w: Waiter, error: BaseException) -> None:
        w.error = error
        w.done = True
        self._cancel_req_locked(w)
        self._trim_locked()
        w.wake()

    # ----------------------------------------------------------------- connecting

    def open_leased(self, lease: int, deadline: float, for_caller: bool,
                    granted_at: float) -> CT:
        """Connect inside ``lease`` (granted at ``granted_at``): the connection, in
        use if ``for_caller``, else idle in the pool. On failure the lease goes back
        at once, after the server has seen any half-open connection close."""
        t0 = time.monotonic()
        conn = fd = None
        try:
            self.check_fresh(lease, granted_at, deadline)  # no connection on a stale lease
            conninfo, kwargs = self.connect_args(deadline, lease)
            conn = self.connector.connect(conninfo, kwargs)
            fd = self.adopt(conn, lease, granted_at, deadline)
            if self._configure is not None:
                self._configure(conn)
                self.check_configured(conn)
        except BaseException:
            self.open_failed(lease, conn, fd)
            raise
        return self.add_opened(conn, lease, fd, t0, for_caller)

    def connect_args(self, deadline: float, lease: int) -> Tuple[str, Dict[str, Any]]:
        """The conninfo and keyword arguments for connecting inside ``lease``: the
        pool's, with the fence tag in ``application_name`` when the broker fences,
        and a ``connect_timeout`` within ``deadline`` unless one is set."""
        conninfo = self.conninfo() if callable(self.conninfo) else (self.conninfo or "")
        kwargs = dict(self.kwargs() if callable(self.kwargs) else self.kwargs)
        if self._lease_client().fence:
            kwargs["application_name"] = self._tagged_application_name(conninfo, kwargs,
                                                                       lease)
        if "connect_timeout" not in kwargs and "connect_timeout" not in conninfo:
            # libpq counts whole seconds and treats 1 as 2.
            kwargs["connect_timeout"] = max(2, int(deadline - time.monotonic() + 0.999))
        return conninfo, kwargs

    def adopt(self, conn: CT, lease: int, granted_at: float, deadline: float) -> Optional[int]:
        """A connection just opened inside ``lease``: make sure the lease is still
        ours, watch its socket, tell the broker its backend. Returns the watched
        descriptor. May block (only after a stall, up to ``deadline``)."""
        # frozen while connecting? confirm the lease before anyone uses this connection
        self.check_fresh(lease, granted_at, deadline)
        client = self._lease_client()
        fd = closing.watch(conn)
        pid, user, db = self.connector.backend(conn)
        client.connected(lease, pid, user, db)
        return fd

    def in_doubt(self, lease: int, granted_at: float) -> bool:
        """Whether :meth:`check_fresh` has anything to do (never blocks)."""
        client = self._lease_client()
        return (time.monotonic() - granted_at > client.heartbeat
                or not client.confirmed.is_set() or client.is_lost(lease))

    def check_fresh(self, lease: int, granted_at: float, deadline: float) -> None:
        """Before and after connecting inside ``lease`` (granted at ``granted_at``):
        frozen anywhere since the grant, the lease may have expired and gone to
        someone else. If so, wait (up to ``deadline``) for the broker to confirm
        it; :class:`PoolError` if it does not. Blocks only after a stall (see
        :meth:`in_doubt`)."""
        if not self.in_doubt(lease, granted_at):
            return
        client = self._lease_client()
        stalled = time.monotonic() - granted_at
        if stalled > client.heartbeat or not client.confirmed.is_set():
            client.suspect(stalled)
            client.confirmed.wait(max(0.0, deadline - time.monotonic()))
        if client.is_lost(lease) or not client.confirmed.is_set():
            raise PoolError(f"{self.name}: the lease expired while this process stalled "
                            f"({stalled:.1f}s since the grant); try again")

    def check_configured(self, conn: CT) -> None:
        """After ``configure``: :class:`PoolError` unless the connection is idle."""
        status = self.connector.status(conn)
        if status is not Status.IDLE:
            raise PoolError(f"{self.name}: configure() left the connection in status "
                            f"{status.value}; discarded")

    def open_failed(self, lease: int, conn: Optional[CT], fd: Optional[int]) -> None:
        """Connecting inside ``lease`` failed (``conn`` may be half-open): close
        it, wait for the server to see that, give the lease back. Blocks."""
        with self._lock:
            self._opening -= 1
            self._stats["connections_errors"] += 1
            self._grow_locked()
        late = self._close_and_wait([(conn, fd)]) if conn is not None else []
        self._lease_client().give_back(lease, fd if late else None)

    def add_opened(self, conn: CT, lease: int, fd: Optional[int], t0: float,
                   for_caller: bool) -> CT:
        """A connection opened (since ``t0``) and configured inside ``lease`` joins
        the pool: in use if ``for_caller``, else idle (or handed to a waiter).
        :class:`PoolClosed` if the pool closed meanwhile (it is discarded)."""
        lifetime = self.max_lifetime * random.uniform(0.95, 1.0)  # spread the replacements
        c = _Conn(conn, lease, fd, t0 + lifetime)
        with self._lock:
            self._opening -= 1
            self._all[id(conn)] = c
            self._stats["connections_num"] += 1
            self._stats["connections_ms"] += (time.monotonic() - t0) * 1000
            closed = self._closed
            self._cond.notify_all()
        if closed:
            self._discard(c, "pool closed while connecting", Retire.ROUTINE)
            raise PoolClosed(f"the pool {self.name!r} is closed")
        if not for_caller:
            c.out_since = None
            self._give_back(c)
        return conn

    def _tagged_application_name(self, conninfo: str, kwargs: Dict[str, Any],
                                 lease: int) -> str:
        """The application name with this lease's tag at the end, which the
        broker's fencer looks for (PostgreSQL keeps the first 63 bytes)."""
        name = kwargs.get("application_name")
        if name is None:
            name = self.connector.application_name(conninfo)
        if name is None:
            name = os.environ.get("PGAPPNAME", "")
        tag = f"{self._lease_client().fence}{lease}"
        return name.encode()[:63 - len(tag)].decode(errors="ignore") + tag

    # ----------------------------------------------------------------- returning

    def _check_returned(self, c: _Conn) -> Optional[Tuple[str, "Retire"]]:
        """Make a returned connection ready for the next user; the reason to
        discard it instead, if any."""
        conn = c.conn
        status = self.connector.status(conn)
        if status is Status.INTRANS:
            log.warning("%s: connection returned in a transaction; rolling back", self.name)
            try:
                self.connector.rollback(conn)
            except Exception as exc:
                return f"rollback failed: {exc}", Retire.BAD
        elif status is Status.ACTIVE:
            return "query in progress", Retire.BAD
        elif status is Status.BROKEN:
            return "closed or broken", Retire.BAD
        if self._reset is not None:
            try:
                self._reset(conn)
            except Exception as exc:
                return f"reset() failed: {exc}", Retire.BAD
            if self.connector.status(conn) is not Status.IDLE:
                return "reset() left it unusable", Retire.BAD
        client = self._lease_client()
        if client.is_lost(c.lease):
            return "its lease expired at the broker", Retire.LOST
        if time.monotonic() >= c.expires:
            return "max_lifetime reached", Retire.ROUTINE
        if c.created <= self._drained_at:
            return "drained", Retire.ROUTINE
        if client.take_recall(self._broker_pool):
            return _RECALLED, Retire.RECALLED
        return None

    def _give_back(self, c: _Conn) -> None:
        with self._lock:
            if self._closed:
                closed = True
            else:
                closed = False
                c.returned = time.monotonic()
                while self._waiting:
                    w = self._waiting.popleft()
                    if w.done:
                        continue
                    c.out_since = c.returned
                    w.conn = c
                    w.done = True
                    w.wake()
                    self._trim_locked()
                    self._gap_s -= self._gap_s / 8  # reused at once: a gap of 0
                    return
                self._idle.append(c)
                self._returns.append(c.returned)
                self._watch_idle_locked()
        if closed:
            self._discard(c, "pool closed", Retire.ROUTINE)

    def _discard(self, c: _Conn, reason: str, kind: "Retire", now: bool = False) -> None:
        """Take ``c`` out of the pool (counted as ``kind``); the janitor closes it
        and releases the lease (or this thread, ``now``)."""
        log.log(logging.INFO if kind in (Retire.BAD, Retire.BROKEN) else logging.DEBUG,
                "%s: discarding connection (lease %d): %s", self.name, c.lease, reason)
        with self._lock:
            if self._all.pop(id(c.conn), None) is None:
                return
            self._closing += 1
            self._stats[kind.value] += 1
            if not now:
                self._jobs.append(c)
                self._start_janitor_locked()
                self._cond.notify_all()
        if now:
            self._close_and_release([c])

    def _close_and_wait(self, items: List[Tuple[Any, Optional[int]]]) -> List[int]:
        return closing.close_and_wait(items, self.close_timeout, close=self.connector.close)

    def _close_and_release(self, conns: List[_Conn]) -> None:
        """Close ``conns`` (already out of ``_all`` and counted in ``_closing``), wait
        until the server has seen them go, then give their leases back."""
        client = self._lease_client()
        t0 = time.monotonic()
        late = self._close_and_wait([(c.conn, c.fd) for c in conns])
        if not late:  # what a move costs here, for _hold_idle (a moving average)
            self._close_s += ((time.monotonic() - t0) / len(conns) - self._close_s) / 8
        for i, c in enumerate(conns):
            client.give_back(c.lease, c.fd if i in late else None)
        with self._lock:
            self._closing -= len(conns)
            self._grow_locked()
            self._cond.notify_all()

    # ----------------------------------------------------------------- broker events
    # What the lease client calls (poolbroker_client.leases.LeaseOwner): pool,
    # idle_leases(), on_recall(), on_lost(); and the process lifecycle
    # (poolbroker_client.lifecycle): close_at_exit(), after_fork_in_child().

    def idle_leases(self) -> int:
        """Leases held by idle connections (a hint the heartbeat carries: the
        broker recalls idle ones first); a spare lease asked ahead counts too."""
        return len(self._idle) + (self._spare is not None)

    def checkouts(self) -> Dict[int, float]:
        """Lease id -> ``time.monotonic()`` when its connection was checked out,
        for the connections in use (``poolbroker clients`` shows who holds what).
        Lock-free, as the I/O thread needs: a racy read is fine for a report."""
        return {c.lease: c.out_since for c in list(self._all.values())
                if c.out_since is not None}

    def _contended(self) -> bool:
        client = self._client
        return client is not None and client.contended(self._broker_pool)

    def _watch_idle_locked(self) -> None:
        """While others wait for a slot, wake the janitor: it gives back an idle
        connection nobody here takes within what a move costs."""
        if self._idle and self._contended():
            self._start_janitor_locked()
            self._cond.notify_all()

    def _note_reuse_locked(self, now: float) -> None:
        """A caller wants a connection: if one was put back and not reused since,
        the time it waited is a sample of this pool's gaps (the last put back
        first, as the idle stack hands them out). Call only if ``_returns``."""
        gap = now - self._returns.pop()
        self._gap_s += ((gap if gap > 0.0 else 0.0) - self._gap_s) / 8

    def _hold_idle(self) -> float:
        """How long an idle connection is kept while others wait for a slot.

        Rent or buy: keeping it costs its slot for as long as it sits idle;
        giving it back costs a move away (a close the server sees) and, if it is
        wanted here again, a move back (waiting for a lease, then a connect):
        ``cost``, measured here as this pool's own closes and cold getconns take.
        Not knowing when the next caller comes, keeping it for ``cost`` and then
        giving it back never costs more than twice the best choice made knowing
        the future (the ski-rental bound). This pool does know roughly: how long
        its connections wait for their next user (the gaps, a moving average).
        So, as in ski rental with a prediction (Purohit, Svitkina, Kumar, NeurIPS
        2018), a pool whose next caller is predicted later than a move back costs
        gives its idle connection back after ``TRUST x cost`` (a few
        milliseconds: a one-off early caller costs little), and one whose callers
        come sooner keeps it for ``cost``, at least HOLD_IDLE_FLOOR (what this
        side cannot see: the taker's connect, and the CPU every connect costs a
        small machine; see docs/lease-policy.md), at most 1 s."""
        return keep_idle_for(self._gap_s, 2 * (self._acquire_s + self._close_s))

    def _yield_due_locked(self, now: float) -> Tuple[List[_Conn], float]:
        """Idle connections above min_size that sat longer than :meth:`_hold_idle`
        while others wait (taken out of the pool), and when the next falls due."""
        if not self._idle or not self._contended():
            return [], math.inf
        hold = self._hold_idle()
        spare = len(self._all) - self.min_size
        out: List[_Conn] = []
        while self._idle and spare > 0 and now - self._idle[0].returned >= hold:
            out.append(self._take_idle_out_locked("leases_yielded"))
            spare -= 1
        due = self._idle[0].returned + hold if self._idle and spare > 0 else math.inf
        return out, due

    def _take_idle_out_locked(self, stat: Optional[str], c: Optional[_Conn] = None) -> _Conn:
        """Take ``c`` (default: the connection idle longest) out of the pool, to be
        closed and its lease given back (counted in ``stat``)."""
        if c is None:
            c = self._idle.popleft()
        else:
            self._idle.remove(c)
        del self._all[id(c.conn)]
        self._closing += 1
        if stat is not None:
            self._stats[stat] += 1
        return c

    def _take_all_idle_out_locked(self) -> List[_Conn]:
        return [self._take_idle_out_locked(None) for _ in range(len(self._idle))]

    def on_recall(self) -> None:
        """The broker wants leases back (give idle connections first), or says
        others wait (the janitor gives back what stays idle). I/O thread."""
        client = self._lease_client()
        with self._lock:
            # a spare lease has no connection to close: it goes first, at once
            spare = None
            if self._spare is not None and (self._contended()
                                            or client.take_recall(self._broker_pool)):
                spare = self._drop_spare_locked()
            self._watch_idle_locked()
            while self._idle and client.recall_owed(self._broker_pool) > 0:
                if not client.take_recall(self._broker_pool):
                    break
                self._jobs.append(self._take_idle_out_locked(Retire.RECALLED.value))
            if self._jobs:
                self._start_janitor_locked()
                self._cond.notify_all()
        if spare is not None:
            client.release(spare)

    def on_lost(self, leases: Set[int]) -> None:
        """Leases the broker no longer knows (I/O thread): their slots may have gone
        to someone else, so their connections must not go on silently. Idle ones
        are closed now; those in use are cut (their socket shut down: the next
        use fails, and the server ends the session at once), then discarded when
        they come back."""
        with self._lock:
            for c in self._all.values():
                if c.out_since is not None and c.lease in leases and c.fd is not None:
                    closing.cut(c.fd)
                    log.warning("%s: lease %d expired at the broker; its connection in use "
                                "was cut, the next use fails", self.name, c.lease)
            for c in [c for c in self._idle if c.lease in leases]:
                self._jobs.append(self._take_idle_out_locked(Retire.LOST.value, c))
            if self._spare is not None and self._spare[0] in leases:
                self._spare = None  # the broker no longer counts it: nothing to give back
            if self._jobs:
                self._start_janitor_locked()
                self._cond.notify_all()

    # ----------------------------------------------------------------- janitor

    def _start_janitor_locked(self) -> None:
        if self._janitor is None or not self._janitor.is_alive():
            self._janitor = threading.Thread(target=self._janitor_loop,
                                             name=f"poolbroker-{self.name}", daemon=True)
            threads.start(self._janitor)

    def _janitor_loop(self) -> None:
        """Close discarded connections, give back those idle while others wait,
        expire idle and old ones, keep min_size."""
        next_check = 0.0
        while True:
            with self._cond:
                while True:
                    now = time.monotonic()
                    yielded, due = self._yield_due_locked(now)
                    self._jobs.extend(yielded)
                    unused = None if self._spare_good_locked(now) else self._drop_spare_locked()
                    if self._jobs or unused is not None or (self._closed and not self._warming):
                        break
                    if self._spare is not None:
                        due = min(due, self._spare[1] + self._spare_hold())
                    left = min(next_check, due) - now
                    if left <= 0:
                        break
                    self._cond.wait(left)
                jobs = list(self._jobs)
                self._jobs.clear()
                stop = self._closed and not self._jobs and not self._warming
            if unused is not None:  # a lease asked ahead nobody came for: no connection
                self._lease_client().release(unused)
                with self._lock:
                    self._grow_locked()
            if jobs:
                self._close_and_release(jobs)
                continue
            if stop:
                return
            if time.monotonic() >= next_check:
                self._maintain()
                # a quarter of the shortest timer, within [50 ms, 1 s]: never a busy loop
                interval = min(1.0, self.max_idle / 4, self.max_lifetime / 4)
                next_check = time.monotonic() + max(0.05, interval)

    def _maintain(self) -> None:
        now = time.monotonic()
        with self._lock:
            if self._closed:
                return
            expired: List[Tuple[_Conn, str]] = []
            keep = len(self._all) - self.min_size
            for c in list(self._idle):  # oldest returned first
                if now >= c.expires:
                    expired.append((c, "max_lifetime reached"))
                elif keep > 0 and now - c.returned >= self.max_idle:
                    expired.append((c, "idle for max_idle"))
                    keep -= 1
            for c, reason in expired:
                log.debug("%s: discarding connection (lease %d): %s", self.name, c.lease,
                          reason)
                self._jobs.append(self._take_idle_out_locked(Retire.ROUTINE.value, c))
            if expired:
                self._cond.notify_all()  # the janitor (this thread) closes them next
            # outstanding lease requests become connections too: count them
            need = self.min_size - (len(self._all) + self._opening + self._pending)
            warm = need > 0 and not self._warming and now >= self._warm_backoff
            if warm:
                self._warming = True
                # counted now, under the same lock as the need: a caller's request
                # made before _warm_one asks would otherwise go over max_size
                self._pending += 1
        if warm:
            self._warm_one()

    def _warm_one(self) -> None:
        """Open one connection towards min_size (janitor thread)."""
        w = Waiter(time.monotonic() + self.timeout, warm=True)
        with self._lock:  # _pending was counted by _maintain
            try:
                w.req = self._lease_client().acquire(
                    self._broker_pool, self.timeout,
                    lambda req, lease, err: self._on_lease(req, lease, err, w))
            except BaseException:
                self._pending -= 1
                self._warming = False
                self._warm_backoff = time.monotonic() + 2.0
                raise
        w.event.wait(self.timeout)
        with self._lock:
            if not w.done:  # a grant arriving later goes to a caller or back
                w.done = True
                self._cancel_req_locked(w)
        try:
            if w.lease is None:
                raise w.error or PoolTimeout(f"no lease within {self.timeout:g}s "
                                             f"({self._lease_client().describe_broker()})")
            self.open_leased(w.lease, w.deadline, for_caller=False, granted_at=w.granted_at)
            self._warm_backoff = 0.0
            self._failing_since = None
        except Exception as exc:
            log.warning("%s: could not open a connection to keep min_size %d: %s",
                        self.name, self.min_size, exc)
            now = time.monotonic()
            self._warm_backoff = now + 2.0
            if self._failing_since is None:
                self._failing_since = now
            elif (now - self._failing_since >= self.reconnect_timeout
                    and self._reconnect_failed is not None):
                self._failing_since = math.inf  # once per outage
                log.error("%s: no connection could be opened for %.0fs", self.name,
                          self.reconnect_timeout)
                try:
                    self._reconnect_failed(self)
                except Exception:
                    log.exception("%s: reconnect_failed callback failed", self.name)
        finally:
            with self._lock:
                self._warming = False

    # ----------------------------------------------------------------- lifecycle

    def _check_open(self) -> None:
        if self._closed:
            raise PoolClosed(f"the pool {self.name!r} is closed")

    def clear_idle(self) -> int:
        """Close every idle connection now and give its lease back (the
        connections are gone when this returns). Returns how many."""
        with self._lock:
            idle = self._take_all_idle_out_locked()
        if idle:
            self._close_and_release(idle)
        return len(idle)

    def prefill(self, count: int) -> int:
        """Open up to ``count`` connections now and keep them idle, waiting at most
        a second for each lease: what the drop-ins do at construction, so that a bad
        DSN fails the constructor while a momentarily full budget does not. A
        database error closes the pool and propagates. Returns how many opened."""
        conns: List[CT] = []
        try:
            for _ in range(count):
                conns.append(self.getconn(timeout=min(1.0, self.timeout)))
        except PoolTimeout:
            log.info("%s: budget full at start: %d of %d connections opened now, the rest "
                     "later", self.name, len(conns), count)
        except BaseException:
            for conn in conns:
                self.putconn(conn)
            self.close()
            raise
        for conn in conns:
            self.putconn(conn)
        return len(conns)

    def keep_min_size(self, count: int) -> None:
        """From now on keep ``count`` connections open in the background."""
        with self._lock:
            self.min_size = count
            if count and not self._closed:
                self._start_janitor_locked()

    def take_idle(self, count_request: bool = True) -> Optional[CT]:
        """An idle connection (the last returned), marked in use, or None: never
        waits, never asks the broker. Counted as a request unless told not to
        (a drop-in checking its idle connections)."""
        with self._lock:
            return self.take_idle_locked(count_request)

    @property
    def lock(self) -> "threading.Lock":
        """The pool's lock. A drop-in that keeps books of its own may keep them
        under it and call the ``*_locked`` methods while holding it (one lock per
        get and put instead of two); nothing else may be called while holding it."""
        return self._lock

    def take_idle_locked(self, count_request: bool = True) -> Optional[CT]:
        """:meth:`take_idle`, with :attr:`lock` held by the caller."""
        if self._idle and not self._closed:
            c = self._idle.pop()
            now = time.monotonic()
            c.out_since = now
            if count_request:
                self._stats["requests_num"] += 1
                if self._returns:
                    self._note_reuse_locked(now)
            return c.conn
        return None

    def keep_locked(self, conn: CT) -> bool:
        """With :attr:`lock` held: put ``conn`` back among the idle connections if
        that is all :meth:`putconn` would do (a clean connection of this open
        pool, nobody waiting, nothing owed to the broker). False if it did
        nothing: then call :meth:`putconn` once the lock is released."""
        c = self._all.get(id(conn))
        client = self._client
        if (c is None or c.conn is not conn or c.out_since is None or self._waiting or self._closed
                or client is None or self._reset is not None or c.created <= self._drained_at
                or not self.connector.is_idle(conn)
                # calm: no call (every return of a connection comes here)
                or not (client.session.calm or client.keeps(self._broker_pool, c.lease))):
            return False
        t = time.monotonic()
        if t >= c.expires:
            return False
        c.out_since = None
        c.returned = t
        self._idle.append(c)
        self._returns.append(t)
        return True

    def count(self, stat: str, value: float = 1) -> None:
        """Add ``value`` to the counter ``stat`` of :meth:`get_stats` (e.g. a drop-in's
        ``usage_ms``)."""
        with self._lock:
            self._stats[stat] = self._stats.get(stat, 0) + value

    def idle_connections(self) -> List[CT]:
        """The idle connections, the one idle longest first (a snapshot)."""
        with self._lock:
            return [c.conn for c in self._idle]

    def idle_since(self) -> List[float]:
        """When each idle connection came back (``time.monotonic()``), in the
        order of :meth:`idle_connections`."""
        with self._lock:
            return [c.returned for c in self._idle]

    def discard(self, conn: CT, reason: str, kind: Optional["Retire"] = None,
                now: bool = False) -> None:
        """Take back ``conn`` (from :meth:`getconn`) and retire it instead of keeping
        it: closed, and its lease given back once the server has seen the close;
        in this thread if ``now``, else by the janitor. ``reason`` is logged,
        ``kind`` (default :attr:`Retire.ROUTINE`) says how it is counted."""
        self._return(conn, (reason, kind or Retire.ROUTINE), now=now)

    def expire_idle(self, max_idle: float, keep: Optional[int] = None) -> None:
        """Retire now the idle connections that have been idle for ``max_idle``
        seconds or more, keeping ``keep`` connections (default ``min_size``) open
        (the janitor does it too, but only every so often)."""
        now = time.monotonic()
        with self._lock:
            expired: List[_Conn] = []
            keep = len(self._all) - (self.min_size if keep is None else keep)
            while self._idle and keep > 0 and now - self._idle[0].returned >= max_idle:
                expired.append(self._take_idle_out_locked(Retire.ROUTINE.value))
                keep -= 1
        if expired:
            self._close_and_release(expired)

    def has_waiters(self) -> bool:
        """True while callers wait for a connection here."""
        return bool(self._waiting)

    def resize(self, min_size: int, max_size: Optional[int]) -> None:
        """Change ``min_size`` and ``max_size``; the janitor opens (or, as they go
        idle, retires) connections to match."""
        if min_size < 0 or (max_size is not None and max_size < max(1, min_size)):
            raise ValueError("max_size must be >= min_size and >= 1")
        with self._lock:
            self.min_size, self.max_size = min_size, max_size
            if not self._closed:
                self._start_janitor_locked()
                self._cond.notify_all()
            self._grow_locked()

    def drain(self) -> None:
        """Replace every connection: the idle ones are closed now, those in use
        when they come back; the janitor opens new ones for ``min_size``."""
        with self._lock:
            self._drained_at = time.monotonic()
        self.clear_idle()

    def close_everything(self) -> None:
        """Close the pool and every connection, including those in use (for
        psycopg2.pool's closeall()), so every lease goes back: the broker has
        them when this returns, unless it does not answer within a second."""
        self.close_at_exit()
        self._flush()

    def close_at_exit(self) -> None:
        """:meth:`close_everything` without waiting for the broker to confirm the
        releases: at interpreter exit (when only daemon threads can still hold a
        connection) the bye that follows makes it drop them all."""
        self._shut(timeout=1.0)
        with self._lock:
            left = list(self._all.values())
            self._all.clear()
            self._closing += len(left)
        if left:
            self._close_and_release(left)

    def after_fork_in_child(self) -> None:
        """In a forked child: forget every inherited connection without closing it
        (that would end the parent's sessions) and start afresh."""
        inherited = list(self._all.values())
        closed = self._closed
        for c in inherited:
            closing.forget_in_child(c.conn, c.fd)
        _inherited_graveyard.extend(c.conn for c in inherited)
        self._init_state()
        self._closed = closed
        track_pool(self, not closed)
        # No thread here: this hook also runs in the child of subprocess's
        # preexec_fn, just before exec. The janitor restarts on first use.
        self._revive = not closed and self.min_size > 0


# Connections inherited by a forked child: kept referenced so that nothing
# finalizes them (their descriptors already point at a dead socket).
_inherited_graveyard: List[Any] = []

# The least time an idle connection is kept while others wait for a slot, when
# this pool's callers come back sooner than a move costs (_hold_idle). On the
# 2-core development machine a move cost 15-30 ms of slot time under load; giving
# back after 50 ms, about the light processes' pause in bench/fleet.py's skewed
# load, pays for the move and the idle time both (2,091 tx/s against 2,325
# keeping for 100 ms).
HOLD_IDLE_FLOOR = 0.1
# The fraction of a move's cost an idle connection is kept while others wait
# when this pool's next caller is predicted to come later than a move back costs
# (_hold_idle). Small: trusting the prediction is where the gain is (skewed fleet:
# 2,990 tx/s giving back at once vs 2,320 keeping for HOLD_IDLE_FLOOR).
HOLD_IDLE_TRUST = 0.1
# How long a lease asked ahead of need (PoolCore._ask_ahead_locked) is kept for
# the next caller before it goes back: a burst of callers finding no idle
# connection comes within milliseconds of each other, and while nobody else
# waits in the pool a slot kept free costs nobody anything (the moment someone
# does, it goes back at once).
AHEAD_HOLD = 0.1
# An ask-ahead unanswered this long is withdrawn (its answer was lost).
AHEAD_STALE = 5.0
_RECALLED = "recalled by the broker"


def keep_idle_for(gap: float, cost: float) -> float:
    """Seconds to keep an idle connection while others wait for a slot, given
    how long this pool's connections wait for their next user (``gap``, as
    predicted) and what giving the slot back and getting one again costs here
    (``cost``). See :meth:`PoolCore._hold_idle`."""
    if gap > cost:
        return HOLD_IDLE_TRUST * cost
    return min(1.0, max(HOLD_IDLE_FLOOR, cost))


class Retire(enum.Enum):
    """Why a connection leaves the pool, as counted in :meth:`PoolCore.get_stats`
    (the value is the counter): ROUTINE (lifetime, idle, closing, drain: logged at
    DEBUG), BAD (handed back unusable: INFO), BROKEN (found broken in the pool,
    e.g. by a ``check``: INFO), RECALLED (the broker wanted the slot), LOST (its
    lease expired at the broker; the client already warned)."""

    ROUTINE = "connections_closed"
    BAD = "returns_bad"
    BROKEN = "connections_lost"
    RECALLED = "leases_recalled"
    LOST = "leases_lost"


_STAT_COUNTERS = (
    "requests_num", "requests_queued", "requests_wait_ms", "requests_errors",
    "usage_ms", "returns_bad", "connections_num", "connections_ms", "connections_errors",
    "connections_lost", "connections_closed", "leases_recalled", "leases_yielded",
    "leases_lost", "leases_ahead",
)
