"""Drop-in for `psycopg2-pool <https://pypi.org/project/psycopg2-pool/>`_ (module
``psycopg2_pool``), with the broker's budget added.

Change ``from psycopg2_pool import ConnectionPool`` to
``from poolbroker_client.compat.psycopg2_pool import ConnectionPool``; nothing
else. Same signature ``ConnectionPool(minconn=1, maxconn=inf, idle_timeout=600,
**connect_kwargs)``, LIFO reuse, idle timeout, broken or closed connections
discarded on get and put, ``clear()``.

What differs, on purpose:

* every connection lives inside a lease of the broker's budget; when the global
  budget is full, ``getconn`` waits up to ``timeout`` seconds (default 30) for a
  lease, then raises :class:`PoolTimeout` (a :class:`PoolError`);
* ``maxconn`` is enforced: the original counts only connections it opened for
  immediate use and loses count once idle ones are reused;
* ``putconn`` refuses a connection that did not come from this pool (the original
  adopts it);
* idle connections are expired by a background thread as well as on
  ``getconn`` (as in the original, one idle longer than ``idle_timeout`` is
  never handed out); ``minconn`` connections are opened in the background
  when the budget is momentarily full at construction;
* ``idle_connections`` and ``return_times`` are snapshots (read them to monitor
  the pool; changing them changes nothing); ``return_times`` holds
  ``time.monotonic()`` values where the original uses ``perf_counter()``;
* the names psycopg2-pool's documentation uses but the package lacks exist:
  ``ThreadedConnectionPool`` and ``close()``;
* ``PoolError`` is poolbroker's, a subclass of ``psycopg2.pool.PoolError``
  (the original's is a plain ``Exception``; ``except PoolError`` works the same).

Extra keyword arguments ``broker=``, ``pool=``, ``timeout=`` are taken by the pool
and never passed to ``psycopg2.connect``.
"""

from __future__ import annotations

import math
import threading
import weakref
from collections import deque
from typing import Any, Deque, Dict, Optional

from psycopg2 import extensions as _ext

from ..core import Retire
from ..errors import PoolError, PoolTimeout
from ..pickling import Configured
from ..pool import ConnectionPool as _LeasedPool
from .psycopg2 import POOL_KEYWORDS

__all__ = ["ConnectionPool", "PoolError", "PoolTimeout", "ThreadSafeConnectionPool",
           "ThreadedConnectionPool"]


class ConnectionPool(Configured):
    """A pool of psycopg2 connections, like ``psycopg2_pool.ConnectionPool``.

    :param minconn: connections opened at once and kept open.
    :param maxconn: this pool's own cap ("connection pool exhausted" beyond it).
    :param idle_timeout: seconds an idle connection is kept; 0 means keep at most
        ``minconn`` idle connections and never expire them.
    :param connect_kwargs: for ``psycopg2.connect`` (``dsn`` defaults to ``""``),
        except ``broker``, ``pool`` and ``timeout``, which are the pool's.
    """

    def __init__(self, minconn: int = 1, maxconn: float = float("inf"),
                 idle_timeout: Optional[float] = 600, **connect_kwargs: Any) -> None:
        options = {k: connect_kwargs.pop(k) for k in POOL_KEYWORDS if k in connect_kwargs}
        self.minconn = minconn
        self.maxconn = maxconn
        self.idle_timeout = idle_timeout
        connect_kwargs.setdefault("dsn", "")
        self.connect_kwargs = connect_kwargs
        self.connections_in_use: "weakref.WeakSet[Any]" = weakref.WeakSet()
        self._lock = threading.Lock()
        self._reserved = 0  # getconn calls waiting for a connection
        kwargs = dict(connect_kwargs)
        dsn = kwargs.pop("dsn")
        self._leased = _LeasedPool(
            dsn, kwargs=kwargs, min_size=0,
            max_size=None if math.isinf(maxconn) else max(1, int(maxconn)),
            max_idle=float(idle_timeout) if idle_timeout else math.inf,
            timeout=float(options.get("timeout", 30.0)),
            broker=options.get("broker"), pool=options.get("pool"),
            name=f"{type(self).__name__}-{id(self):x}")
        # like the original, open minconn now (a bad DSN raises here), unless the
        # budget is full; only then does the background keep minconn (started
        # earlier, it would open extra connections alongside these)
        self._leased.prefill(int(minconn))
        self._leased.keep_min_size(int(minconn))

    @property
    def idle_connections(self) -> Deque[Any]:
        """The idle connections, the one idle longest first (a snapshot)."""
        return deque(self._leased.idle_connections())

    @property
    def return_times(self) -> Dict[Any, float]:
        """When each idle connection came back (``time.monotonic()``; a snapshot)."""
        return dict(zip(self._leased.idle_connections(), self._leased.idle_since()))

    def getconn(self) -> Any:
        """Get a connection: an idle one (last in, first out), or a new one inside a
        lease. :class:`PoolError` "connection pool exhausted" if ``maxconn``
        connections are in use; :class:`PoolTimeout` if the global budget stays
        full for ``timeout`` seconds. Broken idle connections are discarded."""
        with self._lock:
            if len(self.connections_in_use) + self._reserved >= self.maxconn:
                raise PoolError("connection pool exhausted")
            self._reserved += 1
        try:
            if self.idle_timeout:  # like the original: never hand out a stale one
                self._leased.expire_idle(float(self.idle_timeout), keep=0)
            while True:
                conn = self._leased.getconn()
                if conn.closed or conn.get_transaction_status() != _ext.TRANSACTION_STATUS_IDLE:
                    self._leased.discard(conn, "broken when taken from the pool", Retire.BROKEN)
                    continue
                break
            self.connections_in_use.add(conn)
            return conn
        finally:
            with self._lock:
                self._reserved -= 1

    def putconn(self, conn: Any) -> None:
        """Return a connection (even a closed one). A transaction left open is
        rolled back; a broken or closed connection is discarded."""
        self.connections_in_use.discard(conn)
        if self.idle_timeout == 0 and len(self._leased.idle_connections()) >= self.minconn:
            self._leased.discard(conn, "idle_timeout=0 and minconn idle already", now=True)
        else:
            self._leased.putconn(conn)

    def clear(self) -> None:
        """Close and discard every idle connection now (whatever ``minconn`` and
        ``idle_timeout`` say)."""
        self._leased.clear_idle()

    def close(self) -> None:
        """Close the pool: idle connections now, those in use when returned."""
        self._leased.close()

    @property
    def closed(self) -> bool:
        return self._leased.closed

    def __repr__(self) -> str:
        return (f"<{type(self).__name__} minconn={self.minconn} maxconn={self.maxconn} "
                f"in_use={len(self.connections_in_use)} leasing from {self._leased.broker}>")


class ThreadSafeConnectionPool(ConnectionPool):
    """Like ``psycopg2_pool.ThreadSafeConnectionPool`` (every pool here is
    thread-safe; ``lock`` is kept for code that uses it)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.lock = threading.RLock()


#: The name psycopg2-pool's documentation uses.
ThreadedConnectionPool = ThreadSafeConnectionPool
