"""Connectors: what the pool core needs to know about one database driver.

The pool core (:mod:`poolbroker_client.core`) never imports a driver. It opens,
inspects, rolls back and closes connections through a :class:`Connector`:

* :class:`Psycopg2Connector` for psycopg2 (the default of
  :class:`poolbroker_client.ConnectionPool` and the psycopg2 drop-ins);
* :class:`PsycopgConnector` for psycopg 3's ``psycopg.Connection``;
* :class:`AsyncPsycopgConnector` for ``psycopg.AsyncConnection``: connecting is
  awaited (:meth:`AsyncPsycopgConnector.aconnect`), while closing and inspecting
  are plain calls, so the pool's janitor thread can retire an async connection
  without touching the event loop.

Every connector closes a connection by closing libpq's connection (the
Terminate message goes out at once); the core then waits for the server to close
its end before the lease goes back (:mod:`poolbroker_client.closing`).
"""

from __future__ import annotations

import asyncio
import enum
from typing import Any, Dict, Generic, Optional, Tuple, Type, TypeVar

import psycopg2.extensions  # a runtime dependency; psycopg 3 is imported only when used

CT = TypeVar("CT")


class Status(enum.Enum):
    """Where a connection stands, as the pool sees it."""

    IDLE = "idle"  # ready for the next user
    INTRANS = "intrans"  # in a transaction (or a failed one): roll back first
    ACTIVE = "active"  # a query is running: unusable
    BROKEN = "broken"  # closed, or the connection to the server is lost


class Connector(Generic[CT]):
    """One driver, seen from the pool core. Subclass it for another driver."""

    #: the driver's name in logs and errors
    name = "driver"

    def connect(self, conninfo: str, kwargs: Dict[str, Any]) -> CT:
        """Open a connection (blocking)."""
        raise NotImplementedError

    def status(self, conn: CT) -> Status:
        """The connection's state (no I/O)."""
        raise NotImplementedError

    def is_idle(self, conn: CT) -> bool:
        """``status(conn) is Status.IDLE``, as fast as the driver allows (it is on
        every return of a connection)."""
        return self.status(conn) is Status.IDLE

    def rollback(self, conn: CT) -> None:
        """Roll back the transaction in progress (blocking)."""
        raise NotImplementedError

    def backend(self, conn: CT) -> Tuple[int, Optional[str], Optional[str]]:
        """The server process id, role and database of an open connection (no I/O)."""
        raise NotImplementedError

    def close(self, conn: CT) -> None:
        """Close the connection now (no waiting for the server)."""
        raise NotImplementedError

    def fileno(self, conn: CT) -> int:
        """The connection's socket descriptor."""
        return int(conn.fileno())  # type: ignore[attr-defined]

    def application_name(self, conninfo: str) -> Optional[str]:
        """The ``application_name`` set in ``conninfo``, if any."""
        return None

    def checked_out(self, conn: CT, pool: Any) -> None:
        """A connection leaves the pool for a user (``pool`` is the user's pool)."""

    def checked_in(self, conn: CT) -> None:
        """A connection came back to the pool."""


class Psycopg2Connector(Connector[psycopg2.extensions.connection]):
    """psycopg2: ``psycopg2.connect(conninfo, **kwargs)``."""

    name = "psycopg2"

    def __init__(self) -> None:
        import psycopg2
        import psycopg2.extensions as ext

        self._psycopg2 = psycopg2
        self._ext = ext
        self._idle = ext.TRANSACTION_STATUS_IDLE
        self._statuses = {
            ext.TRANSACTION_STATUS_IDLE: Status.IDLE,
            ext.TRANSACTION_STATUS_INTRANS: Status.INTRANS,
            ext.TRANSACTION_STATUS_INERROR: Status.INTRANS,
            ext.TRANSACTION_STATUS_ACTIVE: Status.ACTIVE,
        }

    def connect(self, conninfo: str, kwargs: Dict[str, Any]) -> Any:
        return self._psycopg2.connect(conninfo, **kwargs)

    def status(self, conn: Any) -> Status:
        if conn.closed:
            return Status.BROKEN
        return self._statuses.get(conn.get_transaction_status(), Status.BROKEN)

    def is_idle(self, conn: Any) -> bool:
        # closed or broken: libpq's PQtransactionStatus says UNKNOWN, never IDLE
        return conn.get_transaction_status() == self._idle

    def rollback(self, conn: Any) -> None:
        conn.rollback()

    def backend(self, conn: Any) -> Tuple[int, Optional[str], Optional[str]]:
        return conn.get_backend_pid(), conn.info.user, conn.info.dbname

    def close(self, conn: Any) -> None:
        conn.close()

    def application_name(self, conninfo: str) -> Optional[str]:
        try:
            name: Optional[str] = self._ext.parse_dsn(conninfo).get("application_name")
            return name
        except self._psycopg2.ProgrammingError:
            return None


class PsycopgConnector(Connector[CT]):
    """psycopg 3: ``connection_class.connect(conninfo, **kwargs)``
    (``psycopg.Connection`` unless another class is given)."""

    name = "psycopg"

    def __init__(self, connection_class: Optional[Type[CT]] = None) -> None:
        import psycopg
        from psycopg import pq

        self._psycopg = psycopg
        self.connection_class: Any = connection_class or psycopg.Connection
        self._statuses = {
            pq.TransactionStatus.IDLE: Status.IDLE,
            pq.TransactionStatus.INTRANS: Status.INTRANS,
            pq.TransactionStatus.INERROR: Status.INTRANS,
            pq.TransactionStatus.ACTIVE: Status.ACTIVE,
        }

    def connect(self, conninfo: str, kwargs: Dict[str, Any]) -> CT:
        conn: CT = self.connection_class.connect(conninfo, **kwargs)
        return conn

    def status(self, conn: Any) -> Status:
        if conn.closed:
            return Status.BROKEN
        return self._statuses.get(conn.info.transaction_status, Status.BROKEN)

    def rollback(self, conn: Any) -> None:
        conn.rollback()

    def backend(self, conn: Any) -> Tuple[int, Optional[str], Optional[str]]:
        info = conn.info
        return info.backend_pid, info.user, info.dbname

    def close(self, conn: Any) -> None:
        # libpq's own close: the same as psycopg's close() (which is a coroutine
        # on AsyncConnection, and hands the connection back to its pool instead
        # when close_returns is set)
        conn.pgconn.finish()

    def application_name(self, conninfo: str) -> Optional[str]:
        try:
            name = self._psycopg.conninfo.conninfo_to_dict(conninfo).get("application_name")
        except self._psycopg.ProgrammingError:
            return None
        return None if name is None else str(name)

    def checked_out(self, conn: Any, pool: Any) -> None:
        # psycopg's connections look at ``_pool``: set, ``with conn:`` ends the
        # transaction without closing, and close() with close_returns hands the
        # connection back (psycopg_pool sets it the same way)
        conn._pool = pool

    def checked_in(self, conn: Any) -> None:
        conn._pool = None


class AsyncPsycopgConnector(PsycopgConnector[CT]):
    """psycopg 3's ``AsyncConnection`` (or the given class): :meth:`aconnect` is
    awaited in the pool's event loop; :meth:`connect` (for the janitor thread,
    keeping ``min_size``) runs the same coroutine in that loop and waits."""

    name = "psycopg (async)"

    def __init__(self, connection_class: Optional[Type[CT]] = None) -> None:
        import psycopg

        super().__init__(connection_class or psycopg.AsyncConnection)  # type: ignore[arg-type]
        self.loop: Optional[asyncio.AbstractEventLoop] = None

    async def aconnect(self, conninfo: str, kwargs: Dict[str, Any]) -> CT:
        conn: CT = await self.connection_class.connect(conninfo, **kwargs)
        return conn

    def connect(self, conninfo: str, kwargs: Dict[str, Any]) -> CT:
        loop = self.loop
        if loop is None or loop.is_closed():
            raise RuntimeError("the async pool's event loop is gone")
        timeout = float(kwargs.get("connect_timeout") or 30) + 1
        return asyncio.run_coroutine_threadsafe(
            self.aconnect(conninfo, kwargs), loop).result(timeout)

    async def arollback(self, conn: Any) -> None:
        await conn.rollback()

    def rollback(self, conn: Any) -> None:
        # never called from the event loop: a connection in a transaction is
        # rolled back by the async pool itself (arollback) before the core sees it
        raise RuntimeError("an async connection is rolled back with arollback()")
