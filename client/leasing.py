"""Leases without a pool, for code that manages its own connections.

::

    import asyncpg
    import poolbroker_client

    async def handler():
        async with poolbroker_client.alease("default", timeout=5) as slot:
            conn = await asyncpg.connect(DSN)
            slot.attach(conn)            # closed, and waited for, on the way out
            return await conn.fetchval("SELECT 1")

The synchronous form is the same with ``with poolbroker_client.lease(...)``. A
lease is one slot of the broker's budget; open at most one server connection
inside it. Attach that connection (or its socket, or the socket's descriptor) so
that leaving the block closes it and gives the lease back only once the server has
seen it close: the budget then holds on the server too. Without an attachment the
lease goes back as soon as the block ends: close your connection before that.
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import logging
import os
import threading
import time
from typing import Any, AsyncIterator, List, Optional, Tuple

from . import closing
from .errors import BrokerError, PoolError, PoolTimeout
from .leases import LeaseClient, LeaseRequest, settings

log = logging.getLogger("poolbroker_client")

#: Seconds to wait for the server to see an attached connection close.
CLOSE_TIMEOUT = 10.0


class Lease:
    """One slot of the budget, held for the duration of a ``with`` block."""

    def __init__(self, lease_id: int, pool: str, client: LeaseClient) -> None:
        self.id = lease_id
        self.pool = pool
        self._client = client
        self._attached: List[Tuple[Any, Optional[int]]] = []
        client.checked_out(lease_id, time.monotonic())  # in use for the whole block

    def attach(self, conn: Any) -> None:
        """Tie a connection to this lease: a DB-API or asyncpg connection, a
        socket, or a descriptor. On leaving the block it is closed (connections)
        and the lease is given back once the server has closed its end."""
        fd = _descriptor(conn)
        if fd is None:
            raise PoolError(f"lease {self.id}: cannot find the socket of {type(conn).__name__}; "
                            "attach its socket or descriptor instead")
        self._attached.append((conn, os.dup(fd)))

    def __repr__(self) -> str:
        return f"<Lease {self.id} pool={self.pool!r}>"


def _descriptor(conn: Any) -> Optional[int]:
    if isinstance(conn, int):
        return conn
    for get in (lambda: conn.fileno(),  # psycopg2, psycopg 3, sockets
                # asyncpg: its transport's socket (no public accessor)
                lambda: conn._transport.get_extra_info("socket").fileno()):
        try:
            fd = get()
            if isinstance(fd, int) and fd >= 0:
                return fd
        except Exception:
            continue
    return None


def _failure(error: BaseException, pool: str, url: str, timeout: float) -> BaseException:
    if isinstance(error, BrokerError) and error.code == "timeout":
        return PoolTimeout(f"no lease in pool {pool!r} after {timeout:g}s (broker {url}): "
                           f"{error}")
    return error


def _release(slot: Lease) -> None:
    """Close what is attached, wait for the server to see it, give the lease back."""
    slot._client.checked_in(slot.id)
    # connections and sockets are closed here (an async close was awaited before);
    # a bare descriptor is the caller's to close
    items = [(None if isinstance(conn, int) or _async_close(conn) else conn, fd)
             for conn, fd in slot._attached]
    late = closing.close_and_wait(items, CLOSE_TIMEOUT) if items else []
    late_fds = [items[i][1] for i in late]
    for fd in late_fds[1:]:  # one lease, one connection: the rest is not counted
        if fd is not None:
            os.close(fd)
    slot._client.give_back(slot.id, late_fds[0] if late_fds else None)


def _async_close(conn: Any) -> bool:
    close = getattr(conn, "close", None)
    return close is not None and inspect.iscoroutinefunction(close)


def lease(pool: Optional[str] = None, *, broker: Optional[str] = None,
          timeout: float = 30.0) -> "LeaseBlock":
    """Hold one slot of ``pool``'s budget for a ``with`` block.

    :param pool: the broker pool; default ``$POOLBROKER_POOL``, then ``"default"``.
    :param broker: the broker's endpoint; default ``$POOLBROKER_URL``.
    :param timeout: seconds to wait for a slot, then :class:`PoolTimeout`.

    Yields a :class:`Lease` (``.id``, ``.pool``, ``.attach(conn)``)."""
    return LeaseBlock(pool, broker, timeout)


class LeaseBlock:
    """What :func:`lease` returns: a context manager, used once, whose ``with``
    waits for the slot and gives it back at the end."""

    __slots__ = ("pool", "url", "timeout", "_slot")

    def __init__(self, pool: Optional[str], broker: Optional[str], timeout: float) -> None:
        self.pool, self.url = settings(pool, broker)
        self.timeout = timeout
        self._slot: Optional[Lease] = None

    def __enter__(self) -> Lease:
        if self._slot is not None:
            raise RuntimeError("this lease() is in use: call lease() for each block")
        pool, timeout = self.pool, self.timeout
        deadline = time.monotonic() + timeout
        client = LeaseClient.for_url(self.url)
        # a lock held until the answer comes: lighter than an Event (one per lease)
        answered = threading.Lock()
        answered.acquire()
        answer: List[Tuple[Optional[int], Optional[BaseException]]] = []

        def on_answer(req: LeaseRequest, lease_id: Optional[int],
                      error: Optional[BaseException]) -> None:
            answer.append((lease_id, error))
            answered.release()

        req = client.acquire(pool, timeout, on_answer, lead=True)
        client.serve_until(lambda: bool(answer), deadline)  # sent, and answered, here
        if not answered.acquire(timeout=max(0.0, deadline - time.monotonic())) \
                and client.cancel(req):
            raise PoolTimeout(f"no lease in pool {pool!r} after {timeout:g}s "
                              f"({client.describe_broker()})")
        if not answer:  # the answer won the race with cancel: it is arriving
            answered.acquire()
        lease_id, error = answer[0]
        if error is not None:
            raise _failure(error, pool, self.url, timeout)
        assert lease_id is not None
        self._slot = Lease(lease_id, pool, client)
        return self._slot

    def __exit__(self, *exc: Any) -> None:
        slot, self._slot = self._slot, None
        if slot is not None:
            _release(slot)


@contextlib.asynccontextmanager
async def alease(pool: Optional[str] = None, *, broker: Optional[str] = None,
                 timeout: float = 30.0) -> AsyncIterator[Lease]:
    """:func:`lease` for ``async with``: waiting for the slot, and for the server
    to see an attached connection close, never blocks the event loop. An
    attached connection whose ``close()`` is a coroutine (asyncpg, psycopg 3's
    AsyncConnection) is awaited."""
    pool, url = settings(pool, broker)
    client = LeaseClient.for_url(url)
    loop = asyncio.get_running_loop()
    future: "asyncio.Future[Tuple[Optional[int], Optional[BaseException]]]" = \
        loop.create_future()

    def settle(value: Tuple[Optional[int], Optional[BaseException]]) -> None:
        if not future.done():
            future.set_result(value)

    def on_answer(req: LeaseRequest, lease_id: Optional[int],
                  error: Optional[BaseException]) -> None:
        loop.call_soon_threadsafe(settle, (lease_id, error))

    req = client.acquire(pool, timeout, on_answer)
    try:
        lease_id, error = await asyncio.wait_for(asyncio.shield(future), timeout)
    except (asyncio.TimeoutError, asyncio.CancelledError) as exc:
        if client.cancel(req):
            if isinstance(exc, asyncio.CancelledError):
                raise
            raise PoolTimeout(f"no lease in pool {pool!r} after {timeout:g}s "
                              f"({client.describe_broker()})") from None
        lease_id, error = await future  # the answer won the race: take it, then decide
        if isinstance(exc, asyncio.CancelledError):
            if lease_id is not None:
                client.release(lease_id)
            raise
    if error is not None:
        raise _failure(error, pool, url, timeout)
    assert lease_id is not None
    slot = Lease(lease_id, pool, client)
    try:
        yield slot
    finally:
        for conn, _ in slot._attached:
            if _async_close(conn):
                try:
                    await conn.close()
                except Exception:
                    log.warning("lease %d: closing the attached connection failed; its "
                                "socket is shut down instead", slot.id, exc_info=True)
                    closing.cut(_descriptor(conn) or -1)
        await loop.run_in_executor(None, _release, slot)
