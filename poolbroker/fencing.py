"""Fencing: end the backends of expired leases before their slots are granted again.

A process that stops heartbeating (SIGSTOP, a long GC pause, a partition) still has
open server connections. With ``--fence-dsn`` the broker keeps such leases counted,
terminates their backends with ``pg_terminate_backend`` and frees the slots only once
the backends have left ``pg_stat_activity`` (termination is asynchronous).

A backend is identified by the tag ``/pb<broker id>:<lease id>`` at the end of its
``application_name`` (clients add it when the broker says it fences; the broker id
stays the same across restarts of the same broker), and by what its client reported
when it connected: the backend pid, the role and the database. Any database user can
put any tag in its own ``application_name``, so a tag alone is never enough when more
is known: a backend whose pid, role or database differs from the report is left
alone (pids are reused, and an impostor may be a session we must not touch).

After a restart, before its grace period ends, the broker *sweeps*: it terminates
every backend with its tag whose lease it does not know (a holder frozen across the
restart, or one that never came back), in the (role, database) pairs its leases used,
so that nothing granted afterwards can add to connections nobody accounts for.

The fencer never stops: every error is logged and counted, the thread restarts, a
job that fails is retried with backoff, and a backend that does not go within
``wait_limit`` is reported loudly (``fence_stuck`` in ``poolbroker status``) while its
lease stays counted; that is safe, the pool is only smaller.
"""

from __future__ import annotations

import logging
import queue
import re
import threading
import time
from typing import Any, Callable, Dict, List, Optional, Set, Tuple

import psycopg2

log = logging.getLogger("poolbroker")

POLL = 0.02
_LEASE_DIGITS = re.compile(r"[0-9]{1,19}", re.ASCII)  # '²'.isdigit() is True: not here
# connect errors that retrying cannot fix: the broker refuses to start with them
_FATAL = ("authentication failed", "does not exist", "no pg_hba.conf entry",
          "permission denied", "password", "invalid")

Job = Tuple[str, Any]


class FenceConfigError(ValueError):
    """``--fence-dsn`` cannot work: the broker must not start with it."""


def tag_prefix(broker_id: str) -> str:
    return f"/pb{broker_id}:"


def lease_of(application_name: str, prefix: str) -> Optional[int]:
    """The lease id in a tagged ``application_name``, or None (strict ASCII digits)."""
    if prefix not in application_name:
        return None
    text = application_name.rsplit(prefix, 1)[-1]
    return int(text) if _LEASE_DIGITS.fullmatch(text) else None


def check_dsn(dsn: str) -> None:
    """Connect once with the fence DSN and check that its role may terminate other
    sessions. Raises :class:`FenceConfigError` for what retrying cannot fix (a bad
    DSN, a wrong password, a missing role or database, too few privileges); logs a
    warning and returns if the database is merely unreachable now."""
    try:
        conn = psycopg2.connect(dsn, application_name="poolbroker-fencer", connect_timeout=5)
    except psycopg2.ProgrammingError as exc:
        raise FenceConfigError(f"--fence-dsn is not a valid connection string: "
                               f"{str(exc).strip()}") from None
    except psycopg2.OperationalError as exc:
        text = str(exc).strip()
        if any(word in text for word in _FATAL):
            raise FenceConfigError(f"--fence-dsn cannot connect: {text}") from None
        log.warning("fencing: the database is not reachable yet (%s); fencing will retry "
                    "when it is needed", text)
        return
    try:
        with conn.cursor() as cur:
            cur.execute("SELECT current_user, rolsuper OR pg_has_role(current_user, "
                        "'pg_signal_backend', 'MEMBER') FROM pg_roles "
                        "WHERE rolname = current_user")
            row = cur.fetchone()
            user, allowed = row if row else ("?", False)
    finally:
        conn.close()
    if not allowed:
        raise FenceConfigError(
            f"--fence-dsn connects as {user}, which may not terminate other sessions: "
            f"GRANT pg_signal_backend TO {user} (or use a superuser)")


class Fencer:
    """One supervised thread with one admin connection. Jobs in: ("fence", leases)
    or ("sweep", (known lease ids, scopes)); results out on ``done``: ("fenced",
    lease ids) or ("swept", None)."""

    def __init__(self, dsn: str, broker_id: str, on_done: Callable[[], None], *,
                 wait_limit: float = 30.0) -> None:
        self.dsn = dsn
        self.prefix = tag_prefix(broker_id)
        self.on_done = on_done
        self.wait_limit = wait_limit
        self.done: "queue.Queue[tuple]" = queue.Queue()
        self._jobs: "queue.Queue[Optional[Job]]" = queue.Queue()
        self._later: List[Tuple[float, int, Job]] = []  # retries: (when, tries, job)
        self._current: Optional[Job] = None
        self._conn: Any = None
        self._stopping = False
        # figures for status (read by the broker's loop; ints are safe to share)
        self.terminated = 0
        self.errors = 0
        self.stuck = 0
        self._thread = threading.Thread(target=self._supervise, name="poolbroker-fencer",
                                         daemon=True)
        self._thread.start()

    def submit(self, leases: List[list]) -> None:
        """``leases``: [lease id, backend pid (0 if never reported), pool, role, db]."""
        self._jobs.put(("fence", leases))

    def sweep(self, known: List[int], scopes: List[Tuple[str, str]]) -> None:
        """Terminate our tagged backends whose lease is not in ``known``, in the
        (role, database) pairs ``scopes`` (any, if none are known)."""
        self._jobs.put(("sweep", (known, scopes)))

    def stats(self) -> Dict[str, int]:
        return {"fence_terminated": self.terminated, "fence_errors": self.errors,
                "fence_stuck": self.stuck}

    def stop(self) -> None:
        self._stopping = True
        self._jobs.put(None)
        self._thread.join(5)

    # ------------------------------------------------------------- the thread

    def _supervise(self) -> None:
        delay = 0.5
        while not self._stopping:
            try:
                self._serve()
                return
            except Exception:  # a bug, or a surprise from the driver: never die
                self.errors += 1
                log.exception("fencer failed (%d error(s) so far); restarting it in %.1fs",
                              self.errors, delay)
                if self._current is not None:  # the job in hand is retried, not lost
                    self._later.append((time.monotonic() + delay, 1, self._current))
                    self._current = None
                self._drop_conn()
                time.sleep(delay)
                delay = min(delay * 2, 10.0)

    def _next_job(self) -> Tuple[int, Optional[Job]]:
        """(tries so far, the next job due); (0, None) when asked to stop."""
        while True:
            now = time.monotonic()
            self._later.sort(key=lambda item: item[0])
            if self._later and self._later[0][0] <= now:
                _, tries, job = self._later.pop(0)
                return tries, job
            wait = self._later[0][0] - now if self._later else None
            try:
                return 0, self._jobs.get(timeout=wait)
            except queue.Empty:
                continue

    def _serve(self) -> None:
        while True:
            tries, job = self._next_job()
            if job is None:
                return
            self._current = job
            try:
                left = self._fence(job[1]) if job[0] == "fence" else self._sweep(*job[1])
            except psycopg2.Error as exc:
                # the slots stay counted meanwhile: safe, only smaller
                self.errors += 1
                self._drop_conn()
                left = job
                log.error("fencing: %s failed (%s)", job[0], str(exc).strip())
            self._current = None
            if left is not None:
                delay = min(0.5 * 2 ** tries, 30.0)
                log.error("fencing: %s not finished; retrying in %.1fs", left[0], delay)
                self._later.append((time.monotonic() + delay, tries + 1, left))

    def _cursor(self) -> Any:
        if self._conn is None or self._conn.closed:
            self._conn = psycopg2.connect(self.dsn, application_name="poolbroker-fencer",
                                          connect_timeout=5)
            self._conn.autocommit = True
        return self._conn.cursor()

    def _drop_conn(self) -> None:
        try:
            if self._conn is not None:
                self._conn.close()
        except Exception:
            pass
        self._conn = None

    def _tagged(self, cur: Any) -> List[Tuple[int, int, str, str]]:
        """(pid, lease id, role, database) of every backend carrying our tag."""
        cur.execute("SELECT pid, application_name, usename, datname FROM pg_stat_activity "
                    "WHERE application_name LIKE %s",
                    ("%" + self.prefix.replace("%", r"\%").replace("_", r"\_") + "%",))
        found = []
        for pid, name, user, db in cur.fetchall():
            lease = lease_of(name or "", self.prefix)
            if lease is not None:
                found.append((pid, lease, user or "", db or ""))
        return found

    def _terminate_and_wait(self, cur: Any, pids: List[int], what: str) -> Set[int]:
        """Terminate ``pids`` and wait (at most ``wait_limit``) until the server no
        longer lists them. Returns the pids still there."""
        t0 = time.monotonic()
        for pid in pids:
            try:
                cur.execute("SELECT pg_terminate_backend(%s)", (pid,))
                if cur.fetchone()[0]:
                    self.terminated += 1
            except psycopg2.Error as exc:  # not ours to end (a superuser's, say)
                log.error("fencing: could not terminate backend %d: %s", pid,
                          str(exc).strip())
        left = set(pids)
        while left:
            cur.execute("SELECT pid FROM pg_stat_activity WHERE pid = ANY(%s)", (list(left),))
            left = {row[0] for row in cur.fetchall()}
            if not left or time.monotonic() - t0 > self.wait_limit:
                break
            time.sleep(POLL)
        if left:
            self.stuck += 1
            log.error("FENCING STUCK: %s: backend(s) %s still present after %.0fs; their "
                      "leases stay counted (the pool is smaller until they go)", what,
                      sorted(left), self.wait_limit)
        elif pids:
            log.warning("%s: %d backend(s) terminated in %.0f ms", what, len(pids),
                        (time.monotonic() - t0) * 1000)
        return left

    def _fence(self, job: List[list]) -> Optional[Job]:
        """Terminate the backends of ``job``'s leases; report the leases whose
        backends are gone. Returns what is left to do, or None."""
        wanted = {entry[0]: entry for entry in job}
        cur = self._cursor()
        victims: Dict[int, int] = {}  # pid -> lease
        for pid, lease, user, db in self._tagged(cur):
            entry = wanted.get(lease)
            if entry is None:
                continue
            _, reported_pid, _, reported_user, reported_db = entry
            if (reported_pid and pid != reported_pid) or \
                    (reported_user and user != reported_user) or \
                    (reported_db and db != reported_db):
                log.warning("fencing: backend %d carries the tag of lease %d but is not the "
                            "session its client reported (pid %s, %s@%s): left alone", pid,
                            lease, reported_pid or "?", reported_user or "?",
                            reported_db or "?")
                continue
            victims[pid] = lease
        left = self._terminate_and_wait(cur, sorted(victims),
                                        f"fenced {len(job)} expired lease(s)")
        stuck_leases = {victims[pid] for pid in left}
        done = [lease for lease in wanted if lease not in stuck_leases]
        if done:
            self.done.put(("fenced", done))
            self.on_done()
        rest = [wanted[lease] for lease in wanted if lease in stuck_leases]
        return ("fence", rest) if rest else None

    def _sweep(self, known: List[int], scopes: List[Tuple[str, str]]) -> Optional[Job]:
        cur = self._cursor()
        known_set, in_scope = set(known), {tuple(s) for s in scopes}
        victims = [pid for pid, lease, user, db in self._tagged(cur)
                   if lease not in known_set and (not in_scope or (user, db) in in_scope)]
        left = self._terminate_and_wait(cur, victims,
                                        "restart sweep: backends of unknown leases")
        if left:
            # Granting nothing until they go would stop the whole budget for
            # backends we cannot end: go on, loudly (fence_stuck counts it).
            log.error("restart sweep: granting although backend(s) %s did not go",
                      sorted(left))
        self.done.put(("swept", None))
        self.on_done()
        return None
