"""ConnectionPool: a psycopg_pool-style pool of psycopg2 connections, each inside
a lease of the broker's budget.

It is the driver-independent :class:`~poolbroker_client.core.PoolCore` with the
psycopg2 connector. For psycopg 3 connections (and asyncio) use
:mod:`poolbroker_client.compat.psycopg_pool`.
"""

from __future__ import annotations

from typing import Any, Callable, Dict, Optional

import psycopg2.extensions

from .connectors import Psycopg2Connector
from .core import PoolCore
from .pickling import Configured


class ConnectionPool(Configured, PoolCore[psycopg2.extensions.connection]):
    """A pool of psycopg2 connections inside the broker's budget.

    :param conninfo: libpq connection string (or URL) for ``psycopg2.connect``.
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
    :param kwargs: extra keyword arguments for ``psycopg2.connect``.
    :param configure: called with each new connection before first use.
    :param reset: called with each connection handed back (after any rollback).
    :param name: the pool's name in logs and stats; default ``pool-N``.
    :param open: open at once (default); otherwise call :meth:`open`.
    :param close_timeout: seconds to wait for the server to see a connection
        close before its lease goes back unconfirmed.
    :param lease_ahead: ask for the next lease while a caller connects, so that
        the next caller finding no idle connection does not wait for the broker
        (see :class:`~poolbroker_client.core.PoolCore`). Off by default: the
        spare lease is a slot counted at the broker with no connection (granted
        only from room to spare, for up to 100 ms).

    Use it like psycopg_pool::

        with ConnectionPool("dbname=app", min_size=1, max_size=5) as pool:
            with pool.connection() as conn:
                with conn.cursor() as cur:
                    cur.execute("SELECT 1")
    """

    def __init__(
        self,
        conninfo: str = "",
        *,
        broker: Optional[str] = None,
        pool: Optional[str] = None,
        min_size: int = 0,
        max_size: Optional[int] = None,
        timeout: float = 30.0,
        max_idle: float = 600.0,
        max_lifetime: float = 3600.0,
        kwargs: Optional[Dict[str, Any]] = None,
        configure: Optional[Callable[[psycopg2.extensions.connection], None]] = None,
        reset: Optional[Callable[[psycopg2.extensions.connection], None]] = None,
        name: Optional[str] = None,
        open: bool = True,
        close_timeout: float = 10.0,
        lease_ahead: bool = False,
    ) -> None:
        super().__init__(
            conninfo, connector=Psycopg2Connector(), broker=broker, pool=pool,
            min_size=min_size, max_size=max_size, timeout=timeout, max_idle=max_idle,
            max_lifetime=max_lifetime, kwargs=kwargs, configure=configure, reset=reset,
            name=name, open=open, close_timeout=close_timeout, lease_ahead=lease_ahead)
