"""poolbroker_client.sqlalchemy: engines whose connections are leased. Core and ORM
queries unchanged, threads and several processes within a small budget counted in
pg_stat_activity, connections reused across checkouts (not one per checkout)."""

import os
import signal
from concurrent.futures import ThreadPoolExecutor

import psycopg2
import pytest
import sqlalchemy.exc
from sqlalchemy import text

from poolbroker_client import PoolError, PoolTimeout
from poolbroker_client.sqlalchemy import create_engine, leased_pool

from helpers import HERE, Sampler, Worker, count_backends, http_get, new_tag, start_gunicorn

pytestmark = pytest.mark.integration

DRIVERS = ["psycopg2", "psycopg"]


def sa_url(pg, driver, tag):
    return (f"postgresql+{driver}://postgres@127.0.0.1:{pg.port}/postgres"
            f"?application_name={tag}")


@pytest.fixture
def table(pg):
    name = f"sa_items_{new_tag().replace('-', '_')}"
    with psycopg2.connect(pg.dsn) as conn, conn.cursor() as cur:
        cur.execute(f"CREATE TABLE {name} (id serial PRIMARY KEY, worker int)")
    conn.close()
    yield name
    with psycopg2.connect(pg.dsn) as conn, conn.cursor() as cur:
        cur.execute(f"DROP TABLE {name}")
    conn.close()


@pytest.mark.parametrize("driver", DRIVERS)
def test_processes_and_threads_share_the_budget(pg, broker_factory, table, driver):
    broker = broker_factory({"default": 3})
    tag = new_tag()
    cfg = dict(mode="sqlalchemy", dsn=pg.dsn, broker=broker.url, sa_url=sa_url(pg, driver, tag),
               table=table, threads=6, iterations=25)
    with Sampler(pg.dsn, [tag]) as sampler:
        workers = [Worker(cfg) for _ in range(3)]
        results = [w.result() for w in workers]
    for result in results:
        assert result["ok"] == 150 and result["errors"] == 0, result
        # checkouts reuse the pool's connections instead of one connect each
        assert result["stats"]["connections_num"] < 30, result["stats"]
    assert sampler.max[tag] <= 3, f"server saw {sampler.max[tag]} connections, budget 3"
    with psycopg2.connect(pg.dsn) as conn, conn.cursor() as cur:  # the ORM's inserts landed
        cur.execute(f"SELECT count(*), count(DISTINCT worker) FROM {table}")
        assert cur.fetchone() == (3 * 75, 3)
    conn.close()
    assert broker.wait_leased(0, 2) == 0


@pytest.mark.parametrize("driver", DRIVERS)
def test_a_checkin_goes_back_to_the_pool_and_rolls_back(pg, broker, driver):
    tag = new_tag()
    engine = create_engine(sa_url(pg, driver, tag), broker=broker.url, max_size=1, timeout=1)
    try:
        with engine.connect() as conn:
            first = conn.execute(text("SELECT pg_backend_pid()")).scalar()
            conn.execute(text("CREATE TEMP TABLE t (x int)"))  # left uncommitted
        with engine.connect() as conn:
            assert conn.execute(text("SELECT pg_backend_pid()")).scalar() == first
            # SQLAlchemy rolled back at checkin: the table is gone, the session kept
            assert conn.execute(text("SELECT to_regclass('pg_temp.t')")).scalar() is None
            # max_size 1: a second checkout waits, and times out as QueuePool's do
            with pytest.raises(sqlalchemy.exc.TimeoutError) as info:
                engine.connect()
            assert isinstance(info.value.__cause__, PoolTimeout)
        assert count_backends(pg.dsn, tag) == broker.leased() == 1
    finally:
        leased_pool(engine).close()
    assert broker.wait_leased(0, 2) == 0


def test_what_cannot_be_leased_is_refused_clearly(pg, broker):
    with pytest.raises(PoolError, match="not supported"):
        create_engine("sqlite:///x.db", broker=broker.url)
    with pytest.raises(TypeError, match="pool_size"):
        create_engine(sa_url(pg, "psycopg2", "x"), broker=broker.url, pool_size=5)


@pytest.mark.parametrize("driver", DRIVERS)
def test_a_sqlalchemy_app_under_gunicorn_stays_within_the_budget(pg, broker_factory, driver):
    """3 workers x 4 threads, 300 requests from 32 clients, budget 2."""
    broker = broker_factory({"default": 2})
    tag = new_tag()
    path = os.pathsep.join([os.path.dirname(HERE), os.path.join(HERE, "integration")])
    env = {**os.environ, "PB_SA_URL": sa_url(pg, driver, tag), "POOLBROKER_URL": broker.url,
           "PYTHONPATH": path}
    proc, url = start_gunicorn(env, "sa_app:app", "-w", "3", "--threads", "4")
    try:
        with Sampler(pg.dsn, [tag]) as sampler:
            with ThreadPoolExecutor(32) as ex:
                results = list(ex.map(http_get, [url] * 300))
    finally:
        proc.send_signal(signal.SIGTERM)
        out, _ = proc.communicate(timeout=30)
    assert len(results) == 300 and len({r["worker"] for r in results}) >= 2
    assert sampler.max[tag] <= 2, f"server saw {sampler.max[tag]} connections, budget 2"
    assert "Traceback" not in out, out[-3000:]
    assert broker.wait_leased(0, 2) == 0
