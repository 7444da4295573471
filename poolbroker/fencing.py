"""Fencing: end the backends of expired leases before their slots are granted again.

A process that stops heartbeating (SIGSTOP, a long GC pause, a partition) still has
open server connections. With ``--fence-dsn`` the broker keeps such leases counted,
terminates their backends with ``pg_terminate_backend`` and frees the slots only once
the backends have left ``pg_stat_activity`` (termination is asynchronous).

A backend is identified by the tag ``/pb<lease id>`` at the end of its
``application_name`` (clients add it when the broker says it fences), cross-checked
with the backend pid the client reported: a reported pid whose backend does not
carry the tag belongs to someone else now (pids are reused) and is left alone.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from typing import Callable, List, Optional

import psycopg2

log = logging.getLogger("poolbroker")

POLL = 0.02


def tag_for(lease: int) -> str:
    return f"/pb{lease}"


class Fencer:
    """One thread with one admin connection; jobs in, fenced lease ids out."""

    def __init__(self, dsn: str, on_done: Callable[[], None]) -> None:
        self.dsn = dsn
        self.on_done = on_done
        self.done: "queue.Queue[List[int]]" = queue.Queue()
        self._jobs: "queue.Queue[Optional[List[list]]]" = queue.Queue()
        self._conn = None
        self._thread = threading.Thread(target=self._run, name="poolbroker-fencer",
                                        daemon=True)
        self._thread.start()

    def submit(self, leases: List[list]) -> None:
        """``leases``: [lease id, reported backend pid (0 if none), pool]."""
        self._jobs.put(leases)

    def stop(self) -> None:
        self._jobs.put(None)
        self._thread.join(5)

    def _run(self) -> None:
        while True:
            job = self._jobs.get()
            if job is None:
                return
            delay = 0.5
            while True:
                try:
                    self._fence(job)
                    break
                except psycopg2.Error as exc:
                    # the slots stay counted meanwhile: safe, only smaller
                    log.error("fencing %d lease(s) failed (%s); retrying in %.1fs",
                              len(job), str(exc).strip(), delay)
                    self._drop_conn()
                    time.sleep(delay)
                    delay = min(delay * 2, 10.0)
            self.done.put([lease for lease, _, _ in job])
            self.on_done()

    def _cursor(self):
        if self._conn is None or self._conn.closed:
            self._conn = psycopg2.connect(self.dsn, application_name="poolbroker-fencer")
            self._conn.autocommit = True
        return self._conn.cursor()

    def _drop_conn(self) -> None:
        try:
            if self._conn is not None:
                self._conn.close()
        except Exception:
            pass
        self._conn = None

    def _fence(self, job: List[list]) -> None:
        t0 = time.monotonic()
        tags = {tag_for(lease): (lease, pid) for lease, pid, _ in job}
        patterns = [f"%{tag}" for tag in tags]
        cur = self._cursor()
        cur.execute("SELECT pid, application_name FROM pg_stat_activity "
                    "WHERE application_name LIKE ANY(%s)", (patterns,))
        victims = [(pid, name) for pid, name in cur.fetchall()]
        reported = {pid for _, pid in tags.values() if pid}
        for pid, name in victims:
            if pid not in reported:
                log.warning("fencing: backend %d carries tag %s but its pid was never "
                            "reported; terminating it anyway", pid, name[-20:])
        if victims:
            cur.execute("SELECT pg_terminate_backend(pid) FROM unnest(%s::int[]) AS pid",
                        ([pid for pid, _ in victims],))
        # termination is asynchronous: wait until the server no longer lists them
        while True:
            cur.execute("SELECT count(*) FROM pg_stat_activity "
                        "WHERE application_name LIKE ANY(%s)", (patterns,))
            if cur.fetchone()[0] == 0:
                break
            if time.monotonic() - t0 > 60:
                log.error("fencing: backends still present after 60s; still waiting")
                t0 = time.monotonic()
            time.sleep(POLL)
        log.warning("fenced %d expired lease(s): %d backend(s) terminated in %.0f ms",
                    len(job), len(victims), (time.monotonic() - t0) * 1000)
