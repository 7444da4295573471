"""A WSGI app for the gunicorn tests: ``/`` runs a short query; ``/sleep`` writes
the worker's pid to ``$PB_PID_FILE`` and runs ``pg_sleep(60)`` (a worker to kill
in the middle of a query)."""

import json
import os

from poolbroker_client import ConnectionPool

pool = ConnectionPool(os.environ["PB_DSN"], timeout=30)


def app(environ, start_response):
    with pool.connection() as conn:
        with conn.cursor() as cur:
            if environ.get("PATH_INFO") == "/sleep":
                with open(os.environ["PB_PID_FILE"], "w") as f:
                    f.write(str(os.getpid()))
                cur.execute("SELECT pg_sleep(60)")
            cur.execute("SELECT pg_backend_pid()")
            backend = cur.fetchone()[0]
    body = json.dumps({"worker": os.getpid(), "backend": backend}).encode()
    start_response("200 OK", [("Content-Type", "application/json"),
                              ("Content-Length", str(len(body)))])
    return [body]
