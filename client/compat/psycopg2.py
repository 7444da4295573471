"""Drop-in for :mod:`psycopg2.pool`, with the broker's budget added.

Change ``from psycopg2.pool import ThreadedConnectionPool`` to
``from poolbroker_client.compat.psycopg2 import ThreadedConnectionPool``; nothing
else. The same signatures (``minconn, maxconn, *args, **kwargs``, with ``args`` and
``kwargs`` for ``psycopg2.connect``), keys, ``putconn(close=True)``, ``closeall()``,
``closed``, ``minconn``, ``maxconn`` and error messages.

What differs, on purpose:

* every connection lives inside a lease of the broker's budget. ``maxconn`` is
  still this pool's own cap ("connection pool exhausted" at once, as before); when
  the *global* budget is full, ``getconn`` waits up to ``timeout`` seconds (default
  30) for a lease and then raises :class:`PoolTimeout`, a :class:`PoolError`;
* idle connections beyond ``minconn`` are kept while the budget allows (psycopg2
  closes them on every return, psycopg2 issue #563), and given back when the broker
  recalls them or after ``max_idle`` (600 s);
* ``minconn`` connections are opened at construction as far as the budget has
  room; when it is momentarily full the rest are opened on demand instead of
  failing the constructor (a bad DSN still raises at once, as before). Like
  psycopg2.pool, nothing reopens connections to keep ``minconn`` afterwards;
* both pools are thread-safe (psycopg2's ``SimpleConnectionPool`` is not).

Extra keyword arguments ``broker=``, ``pool=``, ``timeout=`` are taken by the pool
and never passed to ``psycopg2.connect``; ``broker`` defaults to
``$POOLBROKER_URL`` and ``pool`` to ``$POOLBROKER_POOL``, then ``"default"``.
"""

from __future__ import annotations

import itertools
import threading
from typing import Any, Dict, Hashable, List, Optional, Tuple

from ..errors import PoolError, PoolTimeout
from ..pickling import Configured
from ..pool import ConnectionPool

__all__ = ["AbstractConnectionPool", "PoolError", "PoolTimeout", "SimpleConnectionPool",
           "ThreadedConnectionPool"]

POOL_KEYWORDS = ("broker", "pool", "timeout")
_PENDING = object()  # a key whose connection is being fetched by another thread


def split_connect_args(args: Tuple[Any, ...], kwargs: Dict[str, Any]
                       ) -> Tuple[str, Dict[str, Any], Dict[str, Any]]:
    """Split ``psycopg2.connect``-style arguments into (dsn, connect kwargs, pool
    options). The pool options never reach ``psycopg2.connect``."""
    kwargs = dict(kwargs)
    options = {k: kwargs.pop(k) for k in POOL_KEYWORDS if k in kwargs}
    names = ("dsn", "connection_factory", "cursor_factory")
    if len(args) > len(names):
        raise TypeError(f"psycopg2.connect takes at most {len(names)} positional arguments")
    for name, value in zip(names, args):
        if name in kwargs:
            raise TypeError(f"got multiple values for argument {name!r}")
        kwargs[name] = value
    dsn = kwargs.pop("dsn", None) or ""
    return dsn, kwargs, options


class AbstractConnectionPool(Configured):
    """Base class, like ``psycopg2.pool.AbstractConnectionPool``."""

    def __init__(self, minconn: int, maxconn: int, *args: Any, **kwargs: Any) -> None:
        self.minconn = int(minconn)
        self.maxconn = int(maxconn)
        self.closed = False
        dsn, connect_kwargs, options = split_connect_args(args, kwargs)
        self._args = args
        self._kwargs = {k: v for k, v in kwargs.items() if k not in POOL_KEYWORDS}
        self._used: Dict[Hashable, Any] = {}
        self._rused: Dict[int, Hashable] = {}
        self._keys = itertools.count(1)  # psycopg2.pool's keys: 1, 2, 3, ...
        self._leased = ConnectionPool(
            # min_size 0: psycopg2.pool opens minconn at construction only; keeping
            # them warm forever would hold leases a busier process could use
            dsn, kwargs=connect_kwargs, min_size=0, max_size=max(1, self.maxconn),
            timeout=float(options.get("timeout", 30.0)),
            broker=options.get("broker"), pool=options.get("pool"),
            name=f"{type(self).__name__}-{id(self):x}")
        # our books are kept under the leased pool's lock: one lock per get and put
        self._lock = self._leased.lock
        self._filled = threading.Condition(self._lock)  # a key being fetched is filled
        # like psycopg2.pool, open minconn now: a bad DSN fails the constructor;
        # if the budget is full, the rest are opened on demand
        self._leased.prefill(self.minconn)

    @property
    def _pool(self) -> List[Any]:
        """The idle connections (psycopg2.pool keeps them in this list)."""
        return self._leased.idle_connections()

    def _getconn(self, key: Optional[Hashable] = None) -> Any:
        """Get a free connection, or the one assigned to ``key``."""
        self._lock.acquire()  # not ``with``: about 80 ns less on CPython 3.11 (the hot path)
        try:
            if self.closed:
                raise PoolError("connection pool is closed")
            if key is None:
                key = next(self._keys)  # not a method, as in psycopg2.pool: a call less
            if key in self._used:  # (a caller's key may be one we generate, too)
                while self._used.get(key, None) is _PENDING:
                    self._filled.wait()
                    if self.closed:
                        raise PoolError("connection pool is closed")
                if key in self._used:
                    return self._used[key]
            if len(self._used) >= self.maxconn:
                raise PoolError("connection pool exhausted")
            conn = self._leased.take_idle_locked()  # the hot path: no waiting, no broker
            if conn is not None:
                self._used[key] = conn
                self._rused[id(conn)] = key
                return conn
            self._used[key] = _PENDING  # holds the slot while we wait for the budget
        finally:
            self._lock.release()
        try:
            conn = self._leased.getconn()
        except BaseException:
            with self._lock:
                self._used.pop(key, None)
                self._filled.notify_all()
            raise
        with self._lock:
            self._used[key] = conn
            self._rused[id(conn)] = key
            self._filled.notify_all()
        return conn

    def _putconn(self, conn: Any = None, key: Optional[Hashable] = None,
                 close: bool = False) -> None:
        """Put away a connection; with ``close``, close it (and give its lease back)."""
        self._lock.acquire()  # not ``with``: about 80 ns less on CPython 3.11 (the hot path)
        try:
            if self.closed:
                raise PoolError("connection pool is closed")
            if conn is None:
                conn = self._used.get(key) if key is not None else None
                if conn is None or conn is _PENDING:
                    raise PoolError("trying to put unkeyed connection")
            if key is None:
                key = self._rused.pop(id(conn), None)
                if key is None:
                    raise PoolError("trying to put unkeyed connection")
            else:
                self._rused.pop(id(conn), None)
            self._used.pop(key, None)
            if not close and self._leased.keep_locked(conn):  # the hot path
                return
        finally:
            self._lock.release()
        if close:  # closed before we return, like psycopg2's pools
            self._leased.discard(conn, "putconn(close=True)", now=True)
        else:
            self._leased.putconn(conn)

    def _closeall(self) -> None:
        with self._lock:
            if self.closed:
                raise PoolError("connection pool is closed")
            self.closed = True
            self._used.clear()
            self._rused.clear()
            self._filled.notify_all()
        # like psycopg2.pool: connections in use are closed too
        self._leased.close_everything()

    def __repr__(self) -> str:
        return (f"<{type(self).__name__} minconn={self.minconn} maxconn={self.maxconn} "
                f"used={len(self._used)} {'closed' if self.closed else 'open'} "
                f"leasing from {self._leased.broker} pool {self._leased.pool!r}>")


class SimpleConnectionPool(AbstractConnectionPool):
    """Like ``psycopg2.pool.SimpleConnectionPool`` (thread-safe here)."""

    getconn = AbstractConnectionPool._getconn
    putconn = AbstractConnectionPool._putconn
    closeall = AbstractConnectionPool._closeall


class ThreadedConnectionPool(AbstractConnectionPool):
    """Like ``psycopg2.pool.ThreadedConnectionPool``."""

    # the methods themselves, not wrappers: a call less on the hot path
    getconn = AbstractConnectionPool._getconn
    putconn = AbstractConnectionPool._putconn

    def closeall(self) -> None:
        """Close every connection, in use or not; the pool is closed afterwards."""
        self._closeall()
