"""SQLAlchemy engines whose connections are leased from the broker.

::

    from poolbroker_client.sqlalchemy import create_engine

    engine = create_engine("postgresql+psycopg2://app@db/app")   # or postgresql+psycopg
    with engine.begin() as conn:
        conn.execute(text("INSERT ..."))

The engine's pool is this process's poolbroker pool: a checkout is a
``getconn()``, a checkin a ``putconn()`` (after SQLAlchemy's rollback), so idle
connections are shared with the rest of the fleet through the broker instead of
sitting in SQLAlchemy's ``QueuePool``. Queries, sessions and the ORM are
unchanged. ``postgresql`` and ``postgresql+psycopg2`` URLs use
:class:`poolbroker_client.ConnectionPool` (psycopg2); ``postgresql+psycopg`` uses
the same pool over psycopg 3 connections.
SQLAlchemy is the optional extra ``poolbroker[sqlalchemy]``.
"""

from __future__ import annotations

from typing import Any, Dict, Optional

import sqlalchemy
import sqlalchemy.exc
from sqlalchemy.engine import URL, Engine, make_url
from sqlalchemy.pool import NullPool

from .connectors import PsycopgConnector
from .core import PoolCore
from .errors import PoolError, PoolTimeout
from .pool import ConnectionPool


class LeasedPool(NullPool):
    """SQLAlchemy's pool for an engine from :func:`create_engine`: every checkout
    takes a connection from the poolbroker pool (through the engine's creator)
    and every checkin gives it back there instead of closing it. A connection
    SQLAlchemy invalidates (a disconnect) is closed and its lease released."""

    def _close_connection(self, connection: Any, *, terminate: bool = False) -> None:
        # SQLAlchemy closes a connection here when it is checked in (NullPool
        # keeps nothing) or invalidated (terminate); ours goes back to the pool.
        # _creator is the callable given to create_engine (SQLAlchemy 1.4 to 2.1).
        checkout = self._creator
        if not isinstance(checkout, Checkout):
            super()._close_connection(connection, terminate=terminate)
            return
        if terminate:
            try:
                connection.close()
            except Exception:
                pass  # broken already; putconn below releases its lease either way
        checkout.pool.putconn(connection)


class Checkout:
    """The engine's creator: a connection from the poolbroker pool. A checkout
    that times out raises ``sqlalchemy.exc.TimeoutError``, as QueuePool's does
    (the poolbroker error, which says why, is its ``__cause__``)."""

    def __init__(self, pool: Any) -> None:
        self.pool = pool

    def __call__(self) -> Any:
        try:
            return self.pool.getconn()
        except PoolTimeout as exc:
            raise sqlalchemy.exc.TimeoutError(str(exc)) from exc


def create_engine(url: "str | URL", *, broker: Optional[str] = None,
                  pool: Optional[str] = None, max_size: Optional[int] = None,
                  timeout: float = 30.0, **kwargs: Any) -> Engine:
    """``sqlalchemy.create_engine`` whose connections are leased.

    :param url: a SQLAlchemy URL: ``postgresql://``, ``postgresql+psycopg2://`` or
        ``postgresql+psycopg://``; its connection arguments are SQLAlchemy's
        (``connect_args`` are added to them).
    :param broker: the broker's endpoint; default ``$POOLBROKER_URL``.
    :param pool: the broker pool to lease from; default ``$POOLBROKER_POOL``,
        then ``"default"``.
    :param max_size: the most connections this process holds (default: the
        pool's own default); ``pool_size`` and ``max_overflow`` do not apply.
    :param timeout: seconds a checkout waits for a connection before
        ``sqlalchemy.exc.TimeoutError`` (as with QueuePool's ``pool_timeout``).
    :param kwargs: anything else ``sqlalchemy.create_engine`` takes (``echo``,
        ``isolation_level``, ``future``...), but ``poolclass`` and ``creator``.

    The poolbroker pool behind the engine is :func:`leased_pool` ``(engine)``
    (``get_stats()``, ``close()``); ``engine.dispose()`` keeps it, and it closes
    at exit like every pool.
    """
    for name in ("poolclass", "creator", "pool", "pool_size", "max_overflow"):
        if name in kwargs:
            raise TypeError(f"create_engine: {name!r} cannot be set: the engine's pool is "
                            "poolbroker's (use max_size and timeout)")
    parsed = make_url(url)
    driver = parsed.get_driver_name()
    if parsed.get_backend_name() != "postgresql" or driver not in ("psycopg2", "psycopg"):
        raise PoolError(f"create_engine: {parsed.drivername!r} is not supported: use "
                        "postgresql:// or postgresql+psycopg2:// (psycopg2), or "
                        "postgresql+psycopg:// (psycopg 3)")
    # SQLAlchemy turns the URL into the driver's connect() arguments
    probe = sqlalchemy.create_engine(parsed, poolclass=NullPool)
    try:
        cargs, cparams = probe.dialect.create_connect_args(parsed)
    finally:
        probe.dispose()
    params: Dict[str, Any] = {**cparams, **kwargs.pop("connect_args", {})}
    dsn = cargs[0] if cargs else ""
    sizes: Dict[str, Any] = {} if max_size is None else {"max_size": max_size}
    leased: Any
    if driver == "psycopg2":
        leased = ConnectionPool(dsn, broker=broker, pool=pool, timeout=timeout,
                                kwargs=params, **sizes)
    else:
        leased = PoolCore(dsn, connector=PsycopgConnector(), broker=broker, pool=pool,
                          timeout=timeout, kwargs=params, **sizes)
    return sqlalchemy.create_engine(parsed, creator=Checkout(leased), poolclass=LeasedPool,
                                    **kwargs)


def leased_pool(engine: Engine) -> Any:
    """The poolbroker pool behind an engine made by :func:`create_engine` (for
    ``get_stats()``, ``close()``)."""
    checkout = getattr(engine.pool, "_creator", None)
    if not isinstance(checkout, Checkout):
        raise PoolError("this engine was not made by poolbroker_client.sqlalchemy")
    return checkout.pool
