"""Counting server connections the way the server sees them: pg_stat_activity."""

from __future__ import annotations

import threading
from typing import Dict, List

import psycopg2


class Sampler:
    """Counts server connections per application_name every ``interval`` seconds
    from its own admin connection, and keeps the maximum seen."""

    def __init__(self, dsn: str, tags: List[str], interval: float = 0.01,
                 limit: int = 0) -> None:
        self.dsn, self.tags, self.interval = dsn, tags, interval
        self.max: Dict[str, int] = dict.fromkeys(tags, 0)
        self.max_total = 0
        self.samples = 0
        self.errors = 0
        # with a limit: the rows of the first samples above it, for the diagnosis
        self.limit = limit
        self.violations: list = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        conn = None
        while not self._stop.is_set():
            try:
                if conn is None or conn.closed:
                    conn = psycopg2.connect(self.dsn, application_name="pbt-sampler",
                                            connect_timeout=2)
                    conn.autocommit = True
                with conn.cursor() as cur:
                    # the tag is what comes before a lease tag ("/pb...") if any
                    cur.execute("SELECT split_part(application_name, '/pb', 1) AS tag, "
                                "count(*) FROM pg_stat_activity "
                                "WHERE split_part(application_name, '/pb', 1) = ANY(%s) "
                                "GROUP BY 1", (self.tags,))
                    counts = dict(cur.fetchall())
                    if self.limit and sum(counts.values()) > self.limit \
                            and len(self.violations) < 5:
                        cur.execute("SELECT now(), pid, application_name, backend_start, state "
                                    "FROM pg_stat_activity WHERE split_part(application_name, "
                                    "'/pb', 1) = ANY(%s) ORDER BY backend_start", (self.tags,))
                        self.violations.append([[str(v) for v in row] for row in cur.fetchall()])
            except psycopg2.Error:
                # the server restarts (chaos tests): nobody can be connected meanwhile
                self.errors += 1
                conn = None
                self._stop.wait(0.05)
                continue
            for tag in self.tags:
                self.max[tag] = max(self.max[tag], counts.get(tag, 0))
            self.max_total = max(self.max_total, sum(counts.values()))
            self.samples += 1
            self._stop.wait(self.interval)
        if conn is not None:
            conn.close()

    def __enter__(self) -> "Sampler":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join(5)
