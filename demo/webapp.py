"""The demo web app (also used by the gunicorn test). The pool is created at import,
so with ``gunicorn --preload`` it exists before the workers are forked; the master
even uses it once, so the workers inherit a pool that has a connection."""

import json
import os

from poolbroker_client import ConnectionPool

pool = ConnectionPool(os.environ["PB_DSN"], timeout=30, name="web")

with pool.connection() as _conn:  # used in the master before fork
    _conn.cursor().execute("SELECT 1")


def app(environ, start_response):
    with pool.connection() as conn:
        with conn.cursor() as cur:
            cur.execute("SELECT pg_backend_pid(), pg_sleep(0.005)")
            backend = cur.fetchone()[0]
    body = json.dumps({"worker": os.getpid(), "backend": backend}).encode()
    start_response("200 OK", [("Content-Type", "application/json"),
                              ("Content-Length", str(len(body)))])
    return [body]
