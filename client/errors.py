"""Exceptions raised by poolbroker_client.

They subclass :class:`psycopg2.pool.PoolError`, so code written for psycopg2.pool
that catches ``PoolError`` keeps working. Database errors (bad password, no such
database) are not wrapped: the psycopg2 error itself reaches the caller.
"""

from __future__ import annotations

import psycopg2.pool


class PoolError(psycopg2.pool.PoolError):
    """Base class of every error the pool raises itself."""


class PoolTimeout(PoolError):
    """No connection within the timeout: the budget is full, or the broker does not
    answer. The message says which, and names the broker and pool."""


class PoolClosed(PoolError):
    """The pool is closed."""


class TooManyRequests(PoolError):
    """Too many callers wait already (the pool's ``max_waiting``)."""


class BrokerError(PoolError):
    """The broker refused a request (``code`` says why, e.g. ``unknown_pool``)."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code
