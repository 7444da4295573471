"""The backend's ``DatabaseWrapper`` (see :mod:`poolbroker_client.django`)."""

from __future__ import annotations

import threading
from typing import Any, Dict, Optional, Tuple

from django.db.backends.postgresql import base as postgresql

from ..connectors import Psycopg2Connector, PsycopgConnector
from ..core import PoolCore

# Django's own modules, for its backend loader
DatabaseClient = postgresql.DatabaseClient
DatabaseCreation = postgresql.DatabaseCreation
DatabaseFeatures = postgresql.DatabaseFeatures
DatabaseIntrospection = postgresql.DatabaseIntrospection
DatabaseOperations = postgresql.DatabaseOperations
DatabaseSchemaEditor = postgresql.DatabaseSchemaEditor

#: OPTIONS keys that are poolbroker's, not the driver's
OUR_OPTIONS = ("broker", "pool")

# (alias, broker, pool) -> this process's pool: every thread's wrapper shares it
_pools: Dict[Tuple[str, Optional[str], Optional[str]], PoolCore[Any]] = {}
_pools_lock = threading.Lock()


class Driver:
    """What the wrapper sees as its ``Database`` module: the driver itself
    (psycopg2 or psycopg, for its errors and types), but ``connect()`` takes a
    connection from the pool. Django's own connection logic (isolation level,
    time zone, role, autocommit) then runs on it as on a new one."""

    def __init__(self, driver: Any, key: Tuple[str, Optional[str], Optional[str]]) -> None:
        self._driver = driver
        self._key = key

    def __getattr__(self, name: str) -> Any:
        return getattr(self._driver, name)

    def connect(self, **params: Any) -> Any:
        return self.pool(params).getconn()

    def pool(self, params: Optional[Dict[str, Any]] = None) -> PoolCore[Any]:
        """The pool for this alias, made with Django's connection parameters at
        the first connect."""
        with _pools_lock:
            pool = _pools.get(self._key)
            if pool is None:
                if params is None:
                    raise LookupError("no connection was made yet")
                alias, broker, name = self._key
                connector: Any = (PsycopgConnector() if postgresql.is_psycopg3
                                  else Psycopg2Connector())
                pool = _pools[self._key] = PoolCore(
                    "", connector=connector, broker=broker, pool=name, kwargs=dict(params),
                    name=f"django-{alias}")
            return pool


class DatabaseWrapper(postgresql.DatabaseWrapper):
    """Django's PostgreSQL ``DatabaseWrapper`` over poolbroker's leased pool."""

    connection: Any  # the driver's connection while this thread has one, else None

    def __init__(self, settings_dict: Dict[str, Any], *args: Any, **kwargs: Any) -> None:
        options = dict(settings_dict.get("OPTIONS") or {})
        ours = {key: options.pop(key, None) for key in OUR_OPTIONS}
        super().__init__({**settings_dict, "OPTIONS": options}, *args, **kwargs)
        self.Database = Driver(postgresql.Database, (self.alias, ours["broker"], ours["pool"]))

    @property
    def pool(self) -> None:
        """Django's own pooling (5.1+, ``OPTIONS["pool"] = True``) is off: the
        connections are poolbroker's."""
        return None

    def _close(self) -> None:
        # back to the pool, not to the server (putconn rolls back what is open)
        if self.connection is not None:
            with self.wrap_database_errors:
                self.Database.pool().putconn(self.connection)
            # no longer ours, even if Django keeps the wrapper in an atomic block
            self.connection = None
