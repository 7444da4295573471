"""poolbroker_client.django: a small Django project under gunicorn (3 workers x 4
threads) on a budget of 2, with psycopg 3 and with psycopg2. Every request closes
its connection (CONN_MAX_AGE = 0): it goes back to the worker's pool, so the
server sees few sessions, never more than the budget."""

import os
import signal
from concurrent.futures import ThreadPoolExecutor

import psycopg2
import pytest

from helpers import HERE, Sampler, http_get, new_tag, start_gunicorn

pytestmark = pytest.mark.integration


@pytest.fixture
def table(pg):
    name = f"dj_items_{new_tag().replace('-', '_')}"
    with psycopg2.connect(pg.dsn) as conn, conn.cursor() as cur:
        cur.execute(f"CREATE TABLE {name} (id serial PRIMARY KEY, worker int)")
    conn.close()
    yield name
    with psycopg2.connect(pg.dsn) as conn, conn.cursor() as cur:
        cur.execute(f"DROP TABLE {name}")
    conn.close()


@pytest.mark.parametrize("driver", ["psycopg", "psycopg2"])
def test_a_django_project_under_gunicorn_stays_within_the_budget(
        pg, broker_factory, table, driver):
    broker = broker_factory({"default": 2})
    tag = new_tag()
    paths = [os.path.dirname(HERE), os.path.join(HERE, "integration")]
    if driver == "psycopg2":
        paths.insert(0, os.path.join(HERE, "integration", "hide_psycopg"))
    env = {**os.environ, "PB_PG_PORT": str(pg.port), "PB_BROKER": broker.url,
           "PB_TAG": tag, "PB_TABLE": table, "PYTHONPATH": os.pathsep.join(paths),
           "DJANGO_SETTINGS_MODULE": "djproject.settings"}
    env.pop("POOLBROKER_URL", None)  # the broker comes from OPTIONS
    proc, url = start_gunicorn(env, "djproject.wsgi:application", "-w", "3", "--threads", "4")
    try:
        with Sampler(pg.dsn, [tag]) as sampler:
            with ThreadPoolExecutor(32) as ex:
                results = list(ex.map(http_get, [url + "?write=1"] * 300))
    finally:
        proc.send_signal(signal.SIGTERM)
        out, _ = proc.communicate(timeout=30)
    assert "Traceback" not in out, out[-3000:]
    assert len(results) == 300 and {r["driver"] for r in results} == {driver}
    assert len({r["worker"] for r in results}) >= 2
    assert sampler.max[tag] <= 2, f"server saw {sampler.max[tag]} connections, budget 2"
    # Django closed its connection after every request; the server saw a handful of
    # sessions (a new one only when a slot moved between workers), not 300
    sessions = len({r["backend"] for r in results})
    assert sessions < 100, sessions
    with psycopg2.connect(pg.dsn) as conn, conn.cursor() as cur:
        cur.execute(f"SELECT count(*) FROM {table}")
        assert cur.fetchone()[0] == 300
    conn.close()
    assert broker.wait_leased(0, 2) == 0
    print(f"\n{driver}: 300 requests, {sessions} server sessions, max {sampler.max[tag]}")
