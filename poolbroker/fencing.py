"""Fencing: end the backends of expired leases before their slots are granted again.

A process that stops heartbeating (SIGSTOP, a long GC pause, a partition) still has
open server connections. With ``--fence-dsn`` the broker keeps such leases counted,
terminates their backends with ``pg_terminate_backend`` and frees the slots only once
the backends have left ``pg_stat_activity`` (termination is asynchronous).

A backend is identified by the tag ``/pb<broker id>:<lease id>`` at the end of its
``application_name`` (clients add it when the broker says it fences; the broker id
stays the same across restarts of the same broker). A reported pid whose backend
does not carry the tag belongs to someone else now (pids are reused): left alone.

After a restart, before its grace period ends, the broker *sweeps*: it terminates
every backend with its tag whose lease it does not know (a holder frozen across the
restart, or one that never came back), so that nothing granted afterwards can add
to connections nobody accounts for. Backends of other brokers are never touched.
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


def tag_prefix(broker_id: str) -> str:
    return f"/pb{broker_id}:"


class Fencer:
    """One thread with one admin connection. Jobs in: ("fence", leases) or
    ("sweep", known lease ids); results out on ``done``: ("fenced", lease ids) or
    ("swept", None)."""

    def __init__(self, dsn: str, broker_id: str, on_done: Callable[[], None]) -> None:
        self.dsn = dsn
        self.prefix = tag_prefix(broker_id)
        self.on_done = on_done
        self.done: "queue.Queue[tuple]" = queue.Queue()
        self._jobs: "queue.Queue[Optional[tuple]]" = queue.Queue()
        self._conn = None
        self._thread = threading.Thread(target=self._run, name="poolbroker-fencer",
                                        daemon=True)
        self._thread.start()

    def submit(self, leases: List[list]) -> None:
        """``leases``: [lease id, reported backend pid (0 if none), pool]."""
        self._jobs.put(("fence", leases))

    def sweep(self, known: List[int]) -> None:
        """Terminate our tagged backends whose lease is not in ``known``."""
        self._jobs.put(("sweep", known))

    def stop(self) -> None:
        self._jobs.put(None)
        self._thread.join(5)

    def _run(self) -> None:
        while True:
            job = self._jobs.get()
            if job is None:
                return
            kind, payload = job
            delay = 0.5
            while True:
                try:
                    if kind == "fence":
                        self._fence(payload)
                    else:
                        self._sweep(payload)
                    break
                except psycopg2.Error as exc:
                    # the slots stay counted meanwhile: safe, only smaller
                    log.error("%s failed (%s); retrying in %.1fs", kind, str(exc).strip(),
                              delay)
                    self._drop_conn()
                    time.sleep(delay)
                    delay = min(delay * 2, 10.0)
            if kind == "fence":
                self.done.put(("fenced", [lease for lease, _, _ in payload]))
            else:
                self.done.put(("swept", None))
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

    def _tagged(self, cur) -> List[tuple]:
        """(pid, lease id) of every backend carrying our tag."""
        cur.execute("SELECT pid, application_name FROM pg_stat_activity "
                    "WHERE application_name LIKE %s", (f"%{self.prefix}%",))
        found = []
        for pid, name in cur.fetchall():
            lease = name.rsplit(self.prefix, 1)[-1]
            if lease.isdigit():
                found.append((pid, int(lease)))
        return found

    def _terminate_and_wait(self, cur, pids: List[int], what: str) -> None:
        t0 = time.monotonic()
        if pids:
            cur.execute("SELECT pg_terminate_backend(pid) FROM unnest(%s::int[]) AS pid",
                        (pids,))
        # termination is asynchronous: wait until the server no longer lists them
        while pids:
            cur.execute("SELECT count(*) FROM pg_stat_activity WHERE pid = ANY(%s)", (pids,))
            if cur.fetchone()[0] == 0:
                break
            if time.monotonic() - t0 > 60:
                log.error("%s: backends still present after 60s; still waiting", what)
                t0 = time.monotonic()
            time.sleep(POLL)
        log.warning("%s: %d backend(s) terminated in %.0f ms", what, len(pids),
                    (time.monotonic() - t0) * 1000)

    def _fence(self, job: List[list]) -> None:
        leases = {lease for lease, _, _ in job}
        reported = {pid for _, pid, _ in job if pid}
        cur = self._cursor()
        victims = [(pid, lease) for pid, lease in self._tagged(cur) if lease in leases]
        for pid, lease in victims:
            if pid not in reported:
                log.warning("fencing: backend %d carries the tag of lease %d but its pid was "
                            "never reported; terminating it anyway", pid, lease)
        self._terminate_and_wait(cur, [pid for pid, _ in victims],
                                 f"fenced {len(job)} expired lease(s)")

    def _sweep(self, known: List[int]) -> None:
        cur = self._cursor()
        known_set = set(known)
        victims = [pid for pid, lease in self._tagged(cur) if lease not in known_set]
        self._terminate_and_wait(cur, victims, "restart sweep: backends of unknown leases")
