"""gunicorn integration: a worker that dies without exiting cleanly (SIGKILL,
gunicorn's worker timeout, the OOM killer) gives its leases back at once.

As a complete config::

    gunicorn -c python:poolbroker_client.gunicorn app:app

or, with your own config file, import the hook into it::

    # gunicorn.conf.py
    from poolbroker_client.gunicorn import child_exit

gunicorn calls ``child_exit`` in the master after it has reaped a worker. The
hook tells the broker (``$POOLBROKER_URL``) that the worker exited; the broker
accepts it only for a client that named this master as its parent. With
``poolbroker serve --fence-dsn`` the dead worker's leases are fenced at once:
a backend still running its last query is ended, and each slot is free once
its backend has left ``pg_stat_activity`` (a fraction of a second instead of the
TTL). Without fencing the broker cannot see the server, so the leases stay
counted until the TTL as before (the report says so in the master's log).

Nothing else is set: workers, bind, timeouts come from the command line or
gunicorn's defaults. A worker that exits cleanly has already given its leases
back; its report finds nothing to do.
"""

from __future__ import annotations

import logging
import os
import socket
import time
from typing import Any, Optional

from poolbroker.asking import request

log = logging.getLogger("poolbroker_client")

#: Seconds the master waits for the broker's answer to one report.
REPORT_TIMEOUT = 1.0

#: After a report the broker did not answer, seconds during which no report is
#: tried (a master reaping many workers must not wait a second for each).
QUIET_AFTER_FAILURE = 10.0

_failed_at: Optional[float] = None


def report_exit(pid: int, *, broker: Optional[str] = None,
                timeout: float = REPORT_TIMEOUT) -> str:
    """Tell the broker that this process's child ``pid`` has exited, and return
    the broker's answer (what it did with the child's leases). ``broker``
    defaults to ``$POOLBROKER_URL``. Raises ``TimeoutError`` if the broker does
    not answer, ``RuntimeError`` if it refuses, ``ValueError`` without an address."""
    url = broker or os.environ.get("POOLBROKER_URL") or ""
    if not url:
        raise ValueError("no broker address: pass broker=... or set POOLBROKER_URL")
    answer = request(url, "exited", timeout, pid=pid, host=socket.gethostname(),
                     parent=os.getpid())
    message: str = answer["message"]
    return message


def child_exit(server: Any, worker: Any) -> None:
    """gunicorn's ``child_exit`` hook (in the master, after ``worker`` exited):
    report the exit to the broker. Never raises: a master must keep running."""
    global _failed_at
    out = getattr(server, "log", None) or log  # gunicorn's error log, where operators look
    now = time.monotonic()
    if _failed_at is not None and now - _failed_at < QUIET_AFTER_FAILURE:
        return
    try:
        message = report_exit(worker.pid)
    except Exception as exc:
        _failed_at = now
        out.warning("could not report the exit of worker %s to the broker (%s); its leases "
                    "come back when its heartbeats stop (the TTL). No reports for %.0fs",
                    worker.pid, exc, QUIET_AFTER_FAILURE)
        return
    _failed_at = None
    if message.startswith("no client"):
        out.debug("worker %s exit reported: %s", worker.pid, message)
    else:
        out.warning("worker %s exited without giving its leases back: %s", worker.pid,
                    message)
