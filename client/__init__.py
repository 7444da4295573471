"""poolbroker_client: what applications import.

``ConnectionPool`` is a psycopg_pool-style pool whose connections are leased from a
poolbroker broker, so every process of an application shares one PostgreSQL
connection budget. Connections are ordinary direct psycopg2 connections; for
psycopg 3 (and asyncio) use :mod:`poolbroker_client.compat.psycopg_pool`, and for
other drivers :func:`lease` / :func:`alease`.
"""

import logging

from .errors import BrokerError, PoolClosed, PoolError, PoolTimeout, TooManyRequests
from .leasing import Lease, alease, lease
from .pool import ConnectionPool

logging.getLogger("poolbroker_client").addHandler(logging.NullHandler())

__all__ = ["BrokerError", "ConnectionPool", "Lease", "PoolClosed", "PoolError", "PoolTimeout",
           "TooManyRequests", "alease", "lease"]
