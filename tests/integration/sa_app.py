"""A Flask/SQLAlchemy-style WSGI app for the gunicorn test: one engine at module level
(from ``$PB_SA_URL``; the broker from ``$POOLBROKER_URL``), queries in the handler,
written as for plain SQLAlchemy but for the import."""

import json
import os

from sqlalchemy import text

from poolbroker_client.sqlalchemy import create_engine

engine = create_engine(os.environ["PB_SA_URL"])


def app(environ, start_response):
    with engine.begin() as conn:
        backend = conn.execute(
            text("SELECT pg_backend_pid() FROM (SELECT pg_sleep(0.005)) AS s")).scalar()
    body = json.dumps({"worker": os.getpid(), "backend": backend}).encode()
    start_response("200 OK", [("Content-Type", "application/json"),
                              ("Content-Length", str(len(body)))])
    return [body]
