"""Drop-in for `psycopg_pool <https://www.psycopg.org/psycopg3/docs/api/pool.html>`_
(psycopg 3), with the broker's budget added.

Change ``from psycopg_pool import ConnectionPool`` to
``from poolbroker_client.compat.psycopg_pool import ConnectionPool``; nothing else.
``ConnectionPool``, ``AsyncConnectionPool``, ``NullConnectionPool``,
``AsyncNullConnectionPool``, ``PoolTimeout``, ``PoolClosed`` and
``TooManyRequests`` take psycopg_pool 3.3's arguments with its defaults, and hand
out psycopg 3's own connections (``psycopg.Connection``,
``psycopg.AsyncConnection``, or the ``connection_class`` given)::

    from poolbroker_client.compat.psycopg_pool import AsyncConnectionPool

    async with AsyncConnectionPool("dbname=app", min_size=1, max_size=10) as pool:
        async with pool.connection() as conn:
            await conn.execute("SELECT 1")

What differs, on purpose:

* every connection lives inside a lease of the broker's budget (``broker=``,
  default ``$POOLBROKER_URL``; ``pool=``, default ``$POOLBROKER_POOL`` then
  ``"default"``). ``max_size`` is still this pool's own cap; when the *global*
  budget is full, ``getconn`` waits (up to ``timeout``) for a lease;
* an idle connection is given back to the broker when others wait for the budget
  (after what moving it costs), or when the broker recalls it, not only after
  ``max_idle``;
* a connection is closed, and its lease given back only once the server has seen
  it close (so the budget holds in ``pg_stat_activity``);
* the async pools never block the event loop: a wait for a lease is awaited;
  their background work (closing, keeping ``min_size``) runs on a thread that
  hands connects and ``configure`` calls to the pool's event loop;
* ``conninfo`` and ``kwargs`` may be functions, as in psycopg_pool, but not
  coroutine functions; ``num_workers`` is accepted and unused (one background
  thread per pool); ``run_task``, ``schedule_task`` and ``worker`` (psycopg_pool's
  task queue) do not exist;
* the errors are poolbroker's (subclasses of both psycopg's ``OperationalError``,
  like psycopg_pool's, and :class:`poolbroker_client.PoolError`); ``get_stats()``
  has psycopg_pool's keys (zeros included) and the lease figures.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import threading
import time
import warnings
from contextlib import asynccontextmanager, contextmanager, suppress
from typing import (
    Any,
    AsyncIterator,
    Awaitable,
    Callable,
    Dict,
    Generic,
    Iterator,
    Optional,
    Tuple,
    Type,
    TypeVar,
    Union,
    cast,
)

import psycopg

from .. import errors, threads
from ..connectors import AsyncPsycopgConnector, PsycopgConnector, Status
from ..core import PoolCore, Retire, Waiter
from ..pickling import Configured

__all__ = ["AsyncConnectionPool", "AsyncNullConnectionPool", "ConnectionPool",
           "NullConnectionPool", "PoolClosed", "PoolTimeout", "TooManyRequests"]

log = logging.getLogger("poolbroker_client")

CT = TypeVar("CT", bound="psycopg.Connection[Any]")
ACT = TypeVar("ACT", bound="psycopg.AsyncConnection[Any]")
_CONNECTION: Any = psycopg.Connection
_ASYNC_CONNECTION: Any = psycopg.AsyncConnection


# Both bases define ``diag`` (psycopg2's and psycopg's diagnostics); a pool error
# comes from no server message, so neither has anything to say there.
class PoolTimeout(errors.PoolTimeout, psycopg.OperationalError):  # type: ignore[misc]
    """The pool couldn't provide a connection in acceptable time."""


class PoolClosed(errors.PoolClosed, psycopg.OperationalError):  # type: ignore[misc]
    """Attempt to get a connection from a closed pool."""


class TooManyRequests(errors.TooManyRequests,  # type: ignore[misc]
                      psycopg.OperationalError):
    """Too many requests in the queue waiting for a connection from the pool."""


_ERRORS: Dict[type, type] = {errors.PoolTimeout: PoolTimeout, errors.PoolClosed: PoolClosed,
                             errors.TooManyRequests: TooManyRequests}
_names = itertools.count(1)


def _translated(exc: BaseException) -> BaseException:
    """The core's error as this module's class (the same message)."""
    for core_class, ours in _ERRORS.items():
        if isinstance(exc, core_class) and not isinstance(exc, ours):
            return cast(BaseException, ours(str(exc)))
    return exc


class _Base(Configured):
    """What the sync and async pools share: arguments, sizes, stats, names."""

    _null = False

    def __init__(self, conninfo: Union[str, Callable[[], str]], *, connector: Any,
                 kwargs: Any, min_size: int, max_size: Optional[int], open: Optional[bool],
                 configure: Any, check: Any, reset: Any, name: Optional[str],
                 close_returns: bool, timeout: float, max_waiting: int, max_lifetime: float,
                 max_idle: float, reconnect_timeout: float, reconnect_failed: Any,
                 num_workers: int, broker: Optional[str], pool: Optional[str],
                 lease_ahead: bool = False, core_configure: Any = None,
                 core_reset: Any = None) -> None:
        min_size, max_size = self._check_size(min_size, max_size)
        self.conninfo = conninfo
        self.kwargs = kwargs
        self.connection_class = connector.connection_class
        self.name = name or f"pool-{next(_names)}"
        self.close_returns = close_returns
        self.num_workers = num_workers
        self._check = check
        self._configure = configure
        self._reset = reset
        self._reconnect_failed = reconnect_failed
        self._connector = connector
        self._opened = False
        self._open_implicit = False
        self._core = PoolCore(
            self._resolve_conninfo, connector=connector, kwargs=self._resolve_kwargs,
            broker=broker, pool=pool, min_size=min_size,
            max_size=max_size or None,  # 0: a null pool without a cap
            timeout=timeout, max_idle=max_idle, max_lifetime=max_lifetime,
            configure=core_configure, reset=core_reset, name=self.name, open=False,
            max_waiting=max_waiting, reconnect_timeout=reconnect_timeout,
            reconnect_failed=lambda _core: self._call_reconnect_failed(),
            lease_ahead=lease_ahead)
        if open is None:
            open = self._open_implicit = True
        self._open_at_init = open

    # psycopg_pool's attributes ------------------------------------------------

    @property
    def min_size(self) -> int:
        return self._core.min_size

    @property
    def max_size(self) -> int:
        return self._core.max_size or 0

    @property
    def timeout(self) -> float:
        return self._core.timeout

    @timeout.setter
    def timeout(self, value: float) -> None:
        self._core.timeout = value

    @property
    def max_waiting(self) -> int:
        return self._core.max_waiting

    @property
    def max_lifetime(self) -> float:
        return self._core.max_lifetime

    @property
    def max_idle(self) -> float:
        return self._core.max_idle

    @property
    def reconnect_timeout(self) -> float:
        return self._core.reconnect_timeout

    @property
    def closed(self) -> bool:
        """True if the pool is closed (or not open yet)."""
        return self._core.closed

    @property
    def broker(self) -> str:
        """The broker's endpoint."""
        return self._core.broker

    @property
    def pool(self) -> str:
        """The broker pool (budget) this pool leases from."""
        return self._core.pool

    def get_stats(self) -> Dict[str, int]:
        """psycopg_pool's figures (``pool_min``, ``pool_size``, ``requests_num``,
        ...) and the lease figures (see :meth:`poolbroker_client.ConnectionPool.get_stats`)."""
        return cast(Dict[str, int], self._core.get_stats())

    def pop_stats(self) -> Dict[str, int]:
        """Like :meth:`get_stats`, and reset the counters."""
        return cast(Dict[str, int], self._core.pop_stats())

    def __repr__(self) -> str:
        return (f"<{type(self).__module__}.{type(self).__name__} {self.name!r} "
                f"at 0x{id(self):x} leasing from {self.broker} pool {self.pool!r}>")

    # helpers -----------------------------------------------------------------

    def _check_size(self, min_size: int, max_size: Optional[int]) -> Tuple[int, int]:
        if max_size is None:
            max_size = min_size
        if self._null:
            if min_size != 0:
                raise ValueError("null pools must have min_size = 0")
            if max_size < min_size:
                raise ValueError("max_size must be greater or equal than min_size")
            return min_size, max_size
        if min_size < 0:
            raise ValueError("min_size cannot be negative")
        if max_size < min_size:
            raise ValueError("max_size must be greater or equal than min_size")
        if min_size == max_size == 0:
            raise ValueError("if min_size is 0 max_size must be greater than 0")
        return min_size, max_size

    def _resolve_conninfo(self) -> str:
        conninfo = self.conninfo() if callable(self.conninfo) else self.conninfo
        return conninfo or ""

    def _resolve_kwargs(self) -> Dict[str, Any]:
        kwargs = self.kwargs() if callable(self.kwargs) else self.kwargs
        return dict(kwargs or {})

    def _call_reconnect_failed(self) -> None:
        if self._reconnect_failed is not None:
            result = self._reconnect_failed(self)
            loop = getattr(self._connector, "loop", None)
            if asyncio.iscoroutine(result) and loop is not None:
                asyncio.run_coroutine_threadsafe(result, loop)

    def _check_reopen(self) -> None:
        if self._core.closed and self._opened:
            raise PoolClosed("pool has already been opened/closed and cannot be reused")

    def _check_open_getconn(self) -> None:
        if self._core.closed:
            if self._opened:
                raise PoolClosed(f"the pool {self.name!r} is already closed")
            raise PoolClosed(f"the pool {self.name!r} is not open yet")
        if self._open_implicit:
            self._open_implicit = False
            self._warn_implicit_open()

    def _warn_implicit_open(self) -> None:
        warnings.warn(
            f"the default for the {type(self).__name__} 'open' parameter will become "
            "'False' in a future release. Please use open={True|False} explicitly, or use "
            f"the pool as context manager using: `with {type(self).__name__}(...) as pool: "
            "...`", DeprecationWarning, stacklevel=3)

    def _check_pool_putconn(self, conn: Any) -> None:
        pool = getattr(conn, "_pool", None)
        if pool is self:
            return
        msg = f"it comes from pool {pool.name!r}" if pool else "it doesn't come from any pool"
        raise ValueError(f"can't return connection to pool {self.name!r}, {msg}: {conn}")

    def _count_usage(self, t0: float) -> None:
        self._core.count("usage_ms", int(1000.0 * (time.monotonic() - t0)))


class ConnectionPool(_Base, Generic[CT]):
    """psycopg_pool's ``ConnectionPool``, with every connection inside a lease of
    the broker's budget. Arguments as psycopg_pool 3.3's, plus ``broker``,
    ``pool`` and ``lease_ahead`` (see :class:`poolbroker_client.ConnectionPool`)."""

    def __init__(
        self,
        conninfo: Union[str, Callable[[], str]] = "",
        *,
        connection_class: Type[CT] = _CONNECTION,
        kwargs: Union[Dict[str, Any], Callable[[], Dict[str, Any]], None] = None,
        min_size: int = 4,
        max_size: Optional[int] = None,
        open: Optional[bool] = None,
        configure: Optional[Callable[[CT], None]] = None,
        check: Optional[Callable[[CT], None]] = None,
        reset: Optional[Callable[[CT], None]] = None,
        name: Optional[str] = None,
        close_returns: bool = False,
        timeout: float = 30.0,
        max_waiting: int = 0,
        max_lifetime: float = 60 * 60.0,
        max_idle: float = 10 * 60.0,
        reconnect_timeout: float = 5 * 60.0,
        reconnect_failed: Optional[Callable[["ConnectionPool[Any]"], None]] = None,
        num_workers: int = 3,
        broker: Optional[str] = None,
        pool: Optional[str] = None,
        lease_ahead: bool = False,
    ) -> None:
        super().__init__(
            conninfo, connector=PsycopgConnector(connection_class), kwargs=kwargs,
            min_size=min_size, max_size=max_size, open=open, configure=configure,
            check=check, reset=reset, name=name, close_returns=close_returns,
            timeout=timeout, max_waiting=max_waiting, max_lifetime=max_lifetime,
            max_idle=max_idle, reconnect_timeout=reconnect_timeout,
            reconnect_failed=reconnect_failed, num_workers=num_workers, broker=broker,
            pool=pool, lease_ahead=lease_ahead, core_configure=configure, core_reset=reset)
        if self._open_at_init:
            self._open()

    def open(self, wait: bool = False, timeout: float = 30.0) -> None:
        """Open the pool: start keeping ``min_size`` connections and accept
        clients; with ``wait``, see :meth:`wait`. A closed pool cannot be reopened."""
        self._open()
        if wait:
            self.wait(timeout)

    def _open(self) -> None:
        self._check_reopen()
        self._core.open()
        self._opened = True

    def wait(self, timeout: float = 30.0) -> None:
        """Wait until ``min_size`` connections are open; if that takes longer than
        ``timeout``, close the pool and raise :class:`PoolTimeout`."""
        self._check_open_getconn()
        try:
            self._core.wait(timeout)
        except errors.PoolTimeout as exc:
            self.close()
            raise PoolTimeout(f"pool initialization incomplete after {timeout} sec: "
                              f"{exc}") from None

    @contextmanager
    def connection(self, timeout: Optional[float] = None) -> Iterator[CT]:
        """A connection for a ``with`` block: committed on success, rolled back on
        error, returned to the pool either way."""
        conn = self.getconn(timeout=timeout)
        t0 = time.monotonic()
        try:
            with conn:
                yield conn
        finally:
            self.putconn(conn)
            self._count_usage(t0)

    def getconn(self, timeout: Optional[float] = None) -> CT:
        """A connection; hand it back with :meth:`putconn`. Waits up to ``timeout``
        (default: the pool's) for a connection or a lease, then
        :class:`PoolTimeout`; :class:`TooManyRequests` at once if ``max_waiting``
        callers wait already. With ``check``, a connection that fails it is
        discarded and another one tried."""
        if timeout is None:
            timeout = self.timeout
        deadline = time.monotonic() + timeout
        self._check_open_getconn()
        delay = 0.0
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                raise PoolTimeout(f"couldn't get a connection after {timeout:.2f} sec")
            try:
                conn = cast(CT, self._core.getconn(left))
            except errors.PoolError as exc:
                raise _translated(exc) from None
            if self._check is None or self._passes_check(conn):
                self._connector.checked_out(conn, self)
                return conn
            # like psycopg_pool: back off before the next try, up to the deadline
            delay = min(max(delay * 2, 0.05), 1.0, max(0.0, deadline - time.monotonic()))
            time.sleep(delay)

    def _passes_check(self, conn: CT) -> bool:
        assert self._check is not None
        try:
            self._check(conn)
            return True
        except Exception as exc:
            log.info("%s: connection failed check: %s", self.name, exc)
            self._core.discard(conn, f"failed check: {exc}", Retire.BROKEN)
            return False
        except BaseException:
            self._core.putconn(conn)
            raise

    def putconn(self, conn: CT) -> None:
        """Return a connection from :meth:`getconn` (a transaction left open is
        rolled back; a broken one is replaced)."""
        self._check_pool_putconn(conn)
        self._connector.checked_in(conn)
        if self._null and not self._core.has_waiters():
            broken = self._connector.status(conn) is Status.BROKEN
            self._core.discard(conn, "null pool: closed on return",
                               Retire.BAD if broken else Retire.ROUTINE, now=True)
            return
        self._core.putconn(conn)

    def close(self, timeout: float = 5.0) -> None:
        """Close the pool: waiting clients get :class:`PoolClosed`, idle connections
        are closed (their leases given back), those in use when returned."""
        self._core.close(timeout)

    def __enter__(self) -> "ConnectionPool[CT]":
        self._open_implicit = False
        self.open()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def resize(self, min_size: int, max_size: Optional[int] = None) -> None:
        """Change the pool's size while it runs."""
        min_size, max_size = self._check_size(min_size, max_size)
        log.info("resizing %r to min_size=%s max_size=%s", self.name, min_size, max_size)
        self._core.resize(min_size, max_size or None)

    def check(self) -> None:
        """Check every idle connection now (:meth:`check_connection`): the broken
        ones are discarded and replaced."""
        for _ in range(self._core.idle_leases()):
            conn = self._core.take_idle(count_request=False)
            if conn is None:
                break
            try:
                self.check_connection(conn)
            except Exception as exc:
                log.warning("%s: discarding broken connection: %s", self.name, exc)
                self._core.discard(conn, f"broken: {exc}", Retire.BROKEN)
            else:
                self._core.putconn(conn)

    @staticmethod
    def check_connection(conn: CT) -> None:
        """Raise unless ``conn`` works (an empty query); usable as ``check=``."""
        if conn.autocommit:
            conn.execute("")
        else:
            conn.autocommit = True
            try:
                conn.execute("")
            finally:
                with suppress(Exception):
                    conn.autocommit = False

    def drain(self) -> None:
        """Replace every connection: idle ones now, those in use when returned."""
        self._core.drain()

    def reconnect_failed(self) -> None:
        """Called when no connection could be opened for ``reconnect_timeout``."""
        if self._reconnect_failed is not None:
            self._reconnect_failed(self)


class NullConnectionPool(ConnectionPool[CT]):
    """psycopg_pool's ``NullConnectionPool``: no idle connections; each
    ``getconn`` connects (inside a lease), each ``putconn`` closes, unless a
    client waits for it."""

    _null = True

    def __init__(self, conninfo: Union[str, Callable[[], str]] = "", *,
                 min_size: int = 0, **kwargs: Any) -> None:
        super().__init__(conninfo, min_size=min_size, **kwargs)

    def wait(self, timeout: float = 30.0) -> None:
        """Open one connection (and close it) to see that the database works; if
        that fails within ``timeout``, close the pool and raise :class:`PoolTimeout`."""
        self._check_open_getconn()
        try:
            conn = self._core.getconn(timeout)
        except errors.PoolError as exc:
            self.close()
            raise PoolTimeout(f"pool initialization incomplete after {timeout} sec: "
                              f"{exc}") from None
        self._core.discard(conn, "null pool: wait() done", now=True)

    def check(self) -> None:
        """Nothing to check: a null pool keeps no connections."""


class AsyncConnectionPool(_Base, Generic[ACT]):
    """psycopg_pool's ``AsyncConnectionPool``, with every connection inside a
    lease of the broker's budget. Arguments as psycopg_pool 3.3's (``configure``,
    ``check``, ``reset`` and ``reconnect_failed`` are coroutine functions), plus
    ``broker``, ``pool`` and ``lease_ahead``. Waiting never blocks the event loop."""

    def __init__(
        self,
        conninfo: Union[str, Callable[[], str]] = "",
        *,
        connection_class: Type[ACT] = _ASYNC_CONNECTION,
        kwargs: Union[Dict[str, Any], Callable[[], Dict[str, Any]], None] = None,
        min_size: int = 4,
        max_size: Optional[int] = None,
        open: Optional[bool] = None,
        configure: Optional[Callable[[ACT], Awaitable[None]]] = None,
        check: Optional[Callable[[ACT], Awaitable[None]]] = None,
        reset: Optional[Callable[[ACT], Awaitable[None]]] = None,
        name: Optional[str] = None,
        close_returns: bool = False,
        timeout: float = 30.0,
        max_waiting: int = 0,
        max_lifetime: float = 60 * 60.0,
        max_idle: float = 10 * 60.0,
        reconnect_timeout: float = 5 * 60.0,
        reconnect_failed: Optional[Callable[["AsyncConnectionPool[Any]"], Any]] = None,
        num_workers: int = 3,
        broker: Optional[str] = None,
        pool: Optional[str] = None,
        lease_ahead: bool = False,
    ) -> None:
        connector: AsyncPsycopgConnector[ACT] = AsyncPsycopgConnector(connection_class)
        super().__init__(
            conninfo, connector=connector, kwargs=kwargs, min_size=min_size,
            max_size=max_size, open=open, configure=configure, check=check, reset=reset,
            name=name, close_returns=close_returns, timeout=timeout,
            max_waiting=max_waiting, max_lifetime=max_lifetime, max_idle=max_idle,
            reconnect_timeout=reconnect_timeout, reconnect_failed=reconnect_failed,
            num_workers=num_workers, broker=broker, pool=pool, lease_ahead=lease_ahead,
            # the janitor thread opens connections for min_size: it runs configure
            # in the pool's loop and waits for it there
            core_configure=None if configure is None else self._configure_from_thread)
        self._aconnector = connector
        if self._open_at_init:
            if open:  # explicit: psycopg_pool warns at once, implicit at first use
                self._warn_open_async()
            self._open()

    def _warn_implicit_open(self) -> None:
        self._warn_open_async()

    def _warn_open_async(self) -> None:
        warnings.warn(
            f"opening the async pool {type(self).__name__} in the constructor is deprecated "
            "and will not be supported anymore in a future release. Please use `await "
            f"pool.open()`, or use the pool as context manager using: `async with "
            f"{type(self).__name__}(...) as pool: `...", RuntimeWarning, stacklevel=3)

    def _bind_loop(self) -> asyncio.AbstractEventLoop:
        loop = asyncio.get_running_loop()
        if self._aconnector.loop is not loop:
            self._aconnector.loop = loop
        return loop

    def _open(self) -> None:
        self._check_reopen()
        with suppress(RuntimeError):  # no loop running yet: bound at first await
            self._bind_loop()
        self._core.open()
        self._opened = True

    def _configure_from_thread(self, conn: ACT) -> None:
        loop = self._aconnector.loop
        assert loop is not None and self._configure is not None
        asyncio.run_coroutine_threadsafe(self._configure(conn), loop).result(self.timeout)

    async def open(self, wait: bool = False, timeout: float = 30.0) -> None:
        """Open the pool (in the event loop it will be used from); with ``wait``,
        see :meth:`wait`. A closed pool cannot be reopened."""
        self._open()
        self._bind_loop()
        if wait:
            await self.wait(timeout)

    async def wait(self, timeout: float = 30.0) -> None:
        """Wait until ``min_size`` connections are open; if that takes longer than
        ``timeout``, close the pool and raise :class:`PoolTimeout`."""
        self._check_open_getconn()
        loop = self._bind_loop()
        try:
            await loop.run_in_executor(None, self._core.wait, timeout)
        except errors.PoolTimeout as exc:
            await self.close()
            raise PoolTimeout(f"pool initialization incomplete after {timeout} sec: "
                              f"{exc}") from None

    @asynccontextmanager
    async def connection(self, timeout: Optional[float] = None) -> AsyncIterator[ACT]:
        """A connection for an ``async with`` block: committed on success, rolled
        back on error, returned to the pool either way."""
        conn = await self.getconn(timeout=timeout)
        t0 = time.monotonic()
        try:
            async with conn:
                yield conn
        finally:
            await self.putconn(conn)
            self._count_usage(t0)

    async def getconn(self, timeout: Optional[float] = None) -> ACT:
        """A connection; hand it back with :meth:`putconn`. Awaits up to ``timeout``
        (default: the pool's) a connection or a lease, then :class:`PoolTimeout`;
        :class:`TooManyRequests` at once if ``max_waiting`` clients wait already."""
        if timeout is None:
            timeout = self.timeout
        deadline = time.monotonic() + timeout
        self._check_open_getconn()
        delay = 0.0
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                raise PoolTimeout(f"couldn't get a connection after {timeout:.2f} sec")
            try:
                conn = await self._getconn_unchecked(left)
            except errors.PoolError as exc:
                raise _translated(exc) from None
            if self._check is None or await self._passes_check(conn):
                self._connector.checked_out(conn, self)
                return conn
            delay = min(max(delay * 2, 0.05), 1.0, max(0.0, deadline - time.monotonic()))
            await asyncio.sleep(delay)

    async def _getconn_unchecked(self, timeout: float) -> ACT:
        loop = self._bind_loop()
        start = time.monotonic()
        served = loop.create_future()

        def settle() -> None:
            if not served.done():
                served.set_result(None)

        def wake() -> None:  # any thread, under the pool's lock: must not block
            with suppress(RuntimeError):  # the loop is closed: nobody waits any more
                loop.call_soon_threadsafe(settle)

        got = self._core.checkout(start, timeout, wake)
        if not isinstance(got, Waiter):
            return cast(ACT, got)
        try:
            await asyncio.wait_for(served, max(0.0, got.deadline - time.monotonic()))
        except asyncio.TimeoutError:
            pass  # finish_wait decides: served at the last moment, or a timeout
        except BaseException:  # cancelled: what served us goes back
            self._core.abandon(got)
            raise
        conn, lease = self._core.finish_wait(got, start, timeout)
        if lease is None:
            return cast(ACT, conn)
        conn = await self._open_leased(loop, lease, got.deadline, got.granted_at)
        self._core.note_acquired(got, start)
        return conn

    async def _open_leased(self, loop: asyncio.AbstractEventLoop, lease: int,
                           deadline: float, granted_at: float) -> ACT:
        t0 = time.monotonic()
        conn: Optional[ACT] = None
        fd: Optional[int] = None
        try:
            # no connection on a stale lease (waiting for the broker: not on the loop)
            if self._core.in_doubt(lease, granted_at):
                await loop.run_in_executor(None, self._core.check_fresh, lease, granted_at,
                                           deadline)
            conninfo, kwargs = self._core.connect_args(deadline, lease)
            conn = await self._aconnector.aconnect(conninfo, kwargs)
            fd = await loop.run_in_executor(None, self._core.adopt, conn, lease, granted_at,
                                            deadline)
            if self._configure is not None:
                await self._configure(conn)
                self._core.check_configured(conn)
        except BaseException:
            # closing waits for the server: on a thread, and not awaited (this
            # task may be cancelled); the lease goes back once the server has seen it
            threads.start(threading.Thread(target=self._core.open_failed,
                                           args=(lease, conn, fd), daemon=True,
                                           name=f"poolbroker-{self.name}-connect-failed"))
            raise
        return cast(ACT, self._core.add_opened(conn, lease, fd, t0, for_caller=True))

    async def _passes_check(self, conn: ACT) -> bool:
        assert self._check is not None
        try:
            await self._check(conn)
            return True
        except Exception as exc:
            log.info("%s: connection failed check: %s", self.name, exc)
            self._core.discard(conn, f"failed check: {exc}", Retire.BROKEN)
            return False
        except BaseException:
            self._core.discard(conn, "check interrupted", Retire.ROUTINE)
            raise

    async def putconn(self, conn: ACT) -> None:
        """Return a connection from :meth:`getconn` (a transaction left open is
        rolled back; a broken one is replaced)."""
        self._check_pool_putconn(conn)
        self._connector.checked_in(conn)
        retire = await self._prepare_returned(conn)
        if retire is None and self._null and not self._core.has_waiters():
            retire = ("null pool: closed on return", Retire.ROUTINE)
        if retire is not None:
            self._core.discard(conn, *retire)
            return
        self._core.putconn(conn)

    async def _prepare_returned(self, conn: ACT) -> Optional[Tuple[str, Retire]]:
        """Roll back and reset (awaited here, so that the core, which cannot await,
        finds the connection idle): why to discard it instead, if anything."""
        status = self._connector.status(conn)
        if status is Status.INTRANS:
            log.warning("%s: rolling back returned connection: %s", self.name, conn)
            try:
                await conn.rollback()
            except Exception as exc:
                return f"rollback failed: {exc}", Retire.BAD
        elif status is not Status.IDLE:
            return f"returned {status.value}", Retire.BAD
        if self._reset is not None:
            try:
                await self._reset(conn)
            except Exception as exc:
                return f"reset() failed: {exc}", Retire.BAD
            if self._connector.status(conn) is not Status.IDLE:
                return "reset() left it unusable", Retire.BAD
        return None

    async def close(self, timeout: float = 5.0) -> None:
        """Close the pool: waiting clients get :class:`PoolClosed`, idle connections
        are closed (their leases given back), those in use when returned."""
        loop = asyncio.get_running_loop()
        await loop.run_in_executor(None, self._core.close, timeout)

    async def __aenter__(self) -> "AsyncConnectionPool[ACT]":
        self._open_implicit = False
        await self.open()
        return self

    async def __aexit__(self, *exc: Any) -> None:
        await self.close()

    async def resize(self, min_size: int, max_size: Optional[int] = None) -> None:
        """Change the pool's size while it runs."""
        min_size, max_size = self._check_size(min_size, max_size)
        log.info("resizing %r to min_size=%s max_size=%s", self.name, min_size, max_size)
        self._core.resize(min_size, max_size or None)

    async def check(self) -> None:
        """Check every idle connection now (:meth:`check_connection`): the broken
        ones are discarded and replaced."""
        for _ in range(self._core.idle_leases()):
            conn = self._core.take_idle(count_request=False)
            if conn is None:
                break
            try:
                await self.check_connection(conn)
            except Exception as exc:
                log.warning("%s: discarding broken connection: %s", self.name, exc)
                self._core.discard(conn, f"broken: {exc}", Retire.BROKEN)
            else:
                self._core.putconn(conn)

    @staticmethod
    async def check_connection(conn: ACT) -> None:
        """Raise unless ``conn`` works (an empty query); usable as ``check=``."""
        if conn.autocommit:
            await conn.execute("")
        else:
            await conn.set_autocommit(True)
            try:
                await conn.execute("")
            finally:
                with suppress(Exception):
                    await conn.set_autocommit(False)

    async def drain(self) -> None:
        """Replace every connection: idle ones now, those in use when returned."""
        await asyncio.get_running_loop().run_in_executor(None, self._core.drain)

    async def reconnect_failed(self) -> None:
        """Called when no connection could be opened for ``reconnect_timeout``."""
        if self._reconnect_failed is not None:
            result = self._reconnect_failed(self)
            if asyncio.iscoroutine(result):
                await result


class AsyncNullConnectionPool(AsyncConnectionPool[ACT]):
    """psycopg_pool's ``AsyncNullConnectionPool``: no idle connections."""

    _null = True

    def __init__(self, conninfo: Union[str, Callable[[], str]] = "", *,
                 min_size: int = 0, **kwargs: Any) -> None:
        super().__init__(conninfo, min_size=min_size, **kwargs)

    async def wait(self, timeout: float = 30.0) -> None:
        """Open one connection (and close it) to see that the database works; if
        that fails within ``timeout``, close the pool and raise :class:`PoolTimeout`."""
        self._check_open_getconn()
        try:
            conn = await self._getconn_unchecked(timeout)
        except errors.PoolError as exc:
            await self.close()
            raise PoolTimeout(f"pool initialization incomplete after {timeout} sec: "
                              f"{exc}") from None
        self._core.discard(conn, "null pool: wait() done")

    async def check(self) -> None:
        """Nothing to check: a null pool keeps no connections."""
